"""Use diffusers networks as pakhsh models: load a local diffusers-format UNet, call it as `model(x_t, t, y)`.

diffusers is an optional dependency, so it is imported inside the functions that need it. Nothing here touches
the network: folders are read with `local_files_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # only for type hints; importing diffusers at module load would make it mandatory
    from diffusers import UNet2DModel


def _require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("this needs the optional dependency diffusers: pip install 'pakhsh[bench]'") from e
    return diffusers


class DiffusersUNetAdapter(nn.Module):
    """A diffusers `UNet2DModel` as the pakhsh model callable `model(x_t, t, y=None) -> eps`.

    `y` goes to diffusers' `class_labels` (diffusers itself rejects labels for a UNet without a class
    embedding, and a missing label for one with it); the output is the `.sample` tensor, (B, C_out, H, W).
    """

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W), t: (B,) or scalar timesteps, y: (B,) labels or None -> (B, C_out, H, W)."""
        return self.unet(x, t, class_labels=y, return_dict=True).sample


def load_diffusers_unet(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> UNet2DModel:
    """Load a `UNet2DModel` from a local diffusers folder (`config.json` + weights), never from the network.

    Raises FileNotFoundError naming the folder when it or its `config.json` is missing.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers UNet folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder: it has no config.json")
    diffusers = _require_diffusers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(folder), **kwargs)
    except (OSError, EnvironmentError) as e:  # e.g. the weights file is missing
        raise FileNotFoundError(f"could not load a diffusers UNet2DModel from {folder}: {e}") from e
    return unet.to(device).eval()


def diffusers_model(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> DiffusersUNetAdapter:
    """Shortcut: load a local diffusers UNet and wrap it as a pakhsh model callable."""
    return DiffusersUNetAdapter(load_diffusers_unet(path, device=device, dtype=dtype))
