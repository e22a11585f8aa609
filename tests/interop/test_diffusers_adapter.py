"""diffusers UNet2DModel as a pakhsh model callable; loading local diffusers folders offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DModel  # noqa: E402

from pakhsh.interop.diffusers import DiffusersUNetAdapter, diffusers_model, load_diffusers_unet  # noqa: E402


def tiny_unet(num_class_embeds: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=16, num_class_embeds=num_class_embeds,
    ).eval()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[UNet2DModel, Path]:
    unet = tiny_unet(num_class_embeds=4)
    folder = tmp_path / "unet"
    unet.save_pretrained(folder)
    return unet, folder


def test_save_load_and_adapter_matches_direct_call(saved: tuple[UNet2DModel, Path]) -> None:
    unet, folder = saved
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_diffusers_unet(folder)
    model = DiffusersUNetAdapter(loaded)
    x = torch.randn(2, 3, 16, 16)  # (B, C, H, W)
    t = torch.tensor([10, 500])
    y = torch.tensor([0, 3])
    with torch.no_grad():
        expected = unet(x, t, class_labels=y).sample
        out = model(x, t, y)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_diffusers_model_shortcut_is_a_callable(saved: tuple[UNet2DModel, Path]) -> None:
    _, folder = saved
    model = diffusers_model(folder)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 16), torch.tensor([3]), torch.tensor([1]))
    assert out.shape == (1, 3, 16, 16)


def test_unconditional_adapter_without_labels() -> None:
    unet = tiny_unet()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([7])
    with torch.no_grad():
        torch.testing.assert_close(DiffusersUNetAdapter(unet)(x, t), unet(x, t).sample, rtol=0, atol=0)


def test_missing_folder_error_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_diffusers_unet(missing)


def test_folder_without_config_error_names_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty_unet"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_unet.*config.json"):
        load_diffusers_unet(empty)


def test_folder_without_weights_error_names_it(saved: tuple[UNet2DModel, Path]) -> None:
    _, folder = saved
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=str(folder)):
        load_diffusers_unet(folder)
