"""Layout tokens for cross-attention: boxes + class labels -> one token per object (layout-to-image).

Latent diffusion (Rombach et al. 2022, sec. 4.3 and appendix) conditions on a layout by turning every bounding
box into a token that the UNet's cross-attention reads, exactly as it reads text tokens. Here a box's four
coordinates (fractions of the image side) go through Fourier features (sin/cos at octave frequencies, plus the
raw values), are concatenated with a learned embedding of the object's class, and an MLP maps the result to a
`dim`-wide token.

A learned "null" token comes first and is always valid. It gives cross-attention a key even when a scene has
no objects (softmax over zero keys would be 0/0 = NaN), and it is what the model sees for "no layout": the
classifier-free-guidance null is a layout whose labels are all -1.

Objects are a set: every object token depends on its own box and label only, so permuting the objects permutes
their tokens and leaves the UNet's output unchanged (cross-attention is order-free; there are no positions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BOX_EPS = 1e-3  # boxes may poke this far outside [0, 1] (rounding of pixel / size) before they are refused


class LayoutEncoder(nn.Module):
    """(boxes (B, N, 4) in [0, 1] as x0, y0, x1, y1, labels (B, N), -1 = no object) -> (tokens, mask).

    tokens: (B, N + 1, dim), token 0 the learned null token, token 1 + i object i (zeros where its label is -1);
    mask: (B, N + 1) bool, True for the null token and every present object. N may be 0 (null token only).
    `max_objects` bounds N (a check on inputs only: no parameter depends on it).
    """

    def __init__(
        self, num_classes: int, dim: int, max_objects: int = 8, fourier_freqs: int = 8, hidden: int = 256
    ) -> None:
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 1), ("dim", dim, 1), ("max_objects", max_objects, 1),
                                 ("fourier_freqs", fourier_freqs, 0), ("hidden", hidden, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"LayoutEncoder {name} must be an integer >= {low}, got {value!r}")
        self.num_classes, self.dim, self.max_objects = num_classes, dim, max_objects
        # Octaves pi * 2^k, k = 0..F-1: the lowest resolves the whole image once, the highest ~1/2^F of it.
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(fourier_freqs, dtype=torch.float32),
                             persistent=False)
        box_features = 4 * (1 + 2 * fourier_freqs)  # raw coordinates + sin and cos per frequency
        self.class_emb = nn.Embedding(num_classes, hidden)
        self.mlp = nn.Sequential(
            nn.Linear(box_features + hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )
        self.null_token = nn.Parameter(torch.randn(dim) * 0.02)

    def fourier(self, boxes: Tensor) -> Tensor:
        """(..., 4) coordinates -> (..., 4 * (1 + 2F)): the raw values, then sin and cos of each at F octaves."""
        angles = boxes[..., None] * self.freqs.to(boxes.dtype)  # (..., 4, F)
        feats = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., 8F)
        return torch.cat([boxes, feats], dim=-1)

    def check(self, boxes: Tensor, labels: Tensor) -> None:
        """Raise a one-line ValueError naming the shape or range when (boxes, labels) are not a valid layout."""
        if not isinstance(boxes, Tensor) or boxes.ndim != 3 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            what = f"{boxes.dtype} {tuple(boxes.shape)}" if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"boxes must be float (B, N, 4) (x0, y0, x1, y1 fractions of the image), got {what}")
        b, n = boxes.shape[:2]
        if (not isinstance(labels, Tensor) or tuple(labels.shape) != (b, n)
                or labels.dtype not in (torch.int32, torch.int64)):
            what = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"box_labels must be integer ({b}, {n}) (B, N) to match boxes, got {what}")
        if n > self.max_objects:
            raise ValueError(f"layout has {n} objects per image, more than max_objects={self.max_objects}")
        if n == 0:
            return
        if bool(((labels < -1) | (labels >= self.num_classes)).any()):
            bad = labels[(labels < -1) | (labels >= self.num_classes)][0].item()
            raise ValueError(f"box_labels must be in [0, {self.num_classes - 1}] or -1 (no object), got {bad}")
        present = boxes[labels >= 0]  # (K, 4): absent rows may hold anything (padding is often -1)
        if present.numel():
            if not bool(torch.isfinite(present).all()):
                raise ValueError("boxes of present objects must be finite, got NaN or inf")
            lo, hi = present.min().item(), present.max().item()
            if lo < -BOX_EPS or hi > 1 + BOX_EPS:
                raise ValueError(f"boxes must be fractions of the image in [0, 1] (x0, y0, x1, y1), got values in "
                                 f"[{lo:.4g}, {hi:.4g}]; divide pixel boxes by the image size")

    def forward(self, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """boxes (B, N, 4) float, labels (B, N) long -> tokens (B, N + 1, dim), mask (B, N + 1) bool."""
        self.check(boxes, labels)
        b, n = labels.shape
        dtype = self.null_token.dtype
        present = labels >= 0  # (B, N)
        # Absent rows are zeroed *before* the MLP too: garbage (or NaN) padding must not reach the gradients.
        safe_boxes = torch.where(present[..., None], boxes.to(dtype), torch.zeros((), dtype=dtype,
                                                                                   device=boxes.device))
        safe_boxes = safe_boxes.clamp(0.0, 1.0)
        cls = self.class_emb(labels.clamp(min=0).long())  # (B, N, hidden)
        objects = self.mlp(torch.cat([self.fourier(safe_boxes), cls.to(dtype)], dim=-1))  # (B, N, dim)
        objects = objects * present[..., None].to(objects.dtype)  # absent -> exactly zero
        null = self.null_token.view(1, 1, -1).expand(b, 1, -1).to(objects.dtype)
        tokens = torch.cat([null, objects], dim=1)  # (B, N + 1, dim)
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=labels.device), present], dim=1)
        return tokens, mask
