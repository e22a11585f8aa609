"""Inference pipelines, one per system (they compose nets, diffusion maths and samplers)."""

from .base import ResolvedModel, resolve_model, resolve_model_path, shipped_models
from .unconditional import ImagePipeline, PipelineOutput, SampleSettings

__all__ = [
    "ImagePipeline", "PipelineOutput", "ResolvedModel", "SampleSettings", "resolve_model", "resolve_model_path",
    "shipped_models",
]
