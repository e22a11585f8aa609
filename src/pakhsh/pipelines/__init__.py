"""Inference pipelines, one per system (they compose nets, diffusion maths and samplers)."""

from .unconditional import ImagePipeline, SampleSettings, resolve_model_path, shipped_models

__all__ = ["ImagePipeline", "SampleSettings", "resolve_model_path", "shipped_models"]
