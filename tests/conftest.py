"""Shared test fixtures: seeded generators, tiny closed-form models, and the --runslow switch."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import pytest
import torch

from pakhsh.diffusion import GaussianDiffusion, ModelOutput, VarianceType, linear_betas


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


class TrueEpsModel:
    """Knows x_0: returns the exact eps (or x_0 / v) that produced x_t. Called with *training* steps t."""

    def __init__(self, base: GaussianDiffusion, x0: torch.Tensor, learned_var: float | None = None) -> None:
        self.base, self.x0, self.learned_var = base, x0, learned_var
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        self.calls += 1
        abar = self.base.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        x0 = self.x0.expand_as(x_t)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        kind = self.base.model_output
        out = eps if kind == ModelOutput.EPS else x0 if kind == ModelOutput.X0 else abar.sqrt() * eps - (1 - abar).sqrt() * x0
        if self.learned_var is not None:
            out = torch.cat([out, torch.full_like(out, self.learned_var)], dim=1)
        return out


@pytest.fixture
def make_true_model():
    return TrueEpsModel


def tiny_experiment(**sections: dict) -> dict:
    """A tiny experiment config (8x8 shapes, 2-level UNet, T = 50) as a dict; `sections` update its parts."""
    cfg = {
        "name": "tiny",
        "data": {"name": "shapes", "image_size": 8, "length": 64},
        "model": {"image_size": 8, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attention_resolutions": [4], "dropout": 0.1, "num_groups": 8},
        "diffusion": {"num_steps": 50, "schedule": "cosine"},
        "train": {"steps": 10, "batch_size": 8, "log_every": 1, "save_every": 3, "sample_every": 0,
                  "ema_rates": [0.9, 0.99], "device": "cpu", "warmup_steps": 2, "lr": 1e-3,
                  # fp32 whatever the host CPU (auto would pick bf16 on AMX machines); a small final grid
                  "mixed_precision": "no", "num_preview": 4, "preview_steps": 4},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values}
    return cfg


def tiny_diffusion(steps: int = 100, output: str = "eps", variance: str = "fixed_small") -> GaussianDiffusion:
    return GaussianDiffusion(linear_betas(steps), ModelOutput(output), VarianceType(variance))


# image files for the loader tests (tests/data, tests/interop)
def noise(path: Path, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height but that holds almost no data (verifies, never decodes)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# the CLI as a user meets it (tests/e2e)
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code (a return value or argparse's SystemExit) and stderr of `pakhsh ARGV`; never a traceback."""
    from pakhsh.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err
