"""`pakhsh generate / inpaint / reconstruct` on tiny latent and autoencoder runs as a user meets them: grids of the
right size holding what the pipeline makes, maps and layouts from files, the known pixels kept, PSNR / SSIM, and
one-line errors (exit 2, no traceback) for wrong files, wrong models and wrong commands."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pakhsh.cli import main
from pakhsh.conditioning.layout import layout_from_sample, write_layout
from pakhsh.conditioning.segmap import save_segmap
from pakhsh.data import DataConfig, build_dataset
from pakhsh.data.builtin.shapes import SHAPES
from pakhsh.pipelines import SampleSettings
from pakhsh.pipelines.text_to_image import TextToImagePipeline
from pakhsh.tasks.masks import center_mask
from pakhsh.training.autoencoder import load_autoencoder
from tests.conftest import run_cli
from tests.training.test_autoencoder_training import train
from tests.training.test_latent_training import (  # noqa: F401 (fixtures: pytest finds them by name here)
    EMA_FILE,
    JITTER,
    _caption_cache,
    _one_thread,
    ae_run,
    t2i_run,
    t2i_sets,
    text_run,
)

SIZE = 16  # the tiny runs' image size (latents 4x4)
PAD = 2  # save_grid's padding


@pytest.fixture(scope="module")
def jittered(t2i_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the t2i run's last checkpoint folder with seeded noise on its UNet's (EMA) weights, so that prompt,
    map and layout each visibly change the images (see test_latent_training.jitter_unet)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("jittered") / "step_0000004"
    shutil.copytree(t2i_run / "checkpoints" / "step_0000004", folder)
    ema = load_file(str(folder / EMA_FILE))
    g = torch.Generator().manual_seed(0)
    ema = {k: v + torch.randn(v.shape, generator=g) * JITTER if v.is_floating_point() else v
           for k, v in sorted(ema.items())}
    save_file(ema, str(folder / EMA_FILE))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[EMA_FILE] = (folder / EMA_FILE).stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def scene() -> dict:
    """A two-object shapes test scene at the runs' size (for maps, layouts)."""
    ds = build_dataset(DataConfig(name="shapes", split="test", image_size=SIZE, length=8))
    return next(ds[i] for i in range(len(ds)) if ds[i]["num_objects"] == 2)


def cli(*args: str) -> int:
    return main(["--threads", "1", *args])


def err_line(capsys, code_want: int, *args: str, needles: tuple[str, ...] = ()) -> str:
    """Run `pakhsh ARGS`: exit code_want and one line on stderr (no traceback) holding every needle."""
    code, err = run_cli(["--threads", "1", *args], capsys)
    assert code == code_want, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def grid(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def tile(g: np.ndarray, row: int, col: int, size: int = SIZE) -> np.ndarray:
    top, left = PAD + row * (size + PAD), PAD + col * (size + PAD)
    return g[top:top + size, left:left + size]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) as the grid stores it."""
    return ((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy().astype(int)


def grid_shape(rows: int, cols: int, scale: int = 1) -> tuple[int, int, int]:
    return ((rows * (SIZE + PAD) + PAD) * scale, (cols * (SIZE + PAD) + PAD) * scale, 3)


# ------------------------------------------------------------------------------------------------ generate
def test_generate_writes_a_grid_of_what_the_pipeline_makes(jittered: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    assert cli("generate", "a red circle", "a blue square", "-m", str(jittered), "--steps", "2", "-n", "2",
               "--seed", "3", "--scale", "1", "-q", "-o", str(out)) == 0
    g = grid(out)
    assert g.shape == grid_shape(2, 2)  # a row per prompt, -n images per row
    pipe = TextToImagePipeline.from_pretrained(jittered, device="cpu")
    # the CLI's defaults for pakhsh models: DDIM, guidance 3
    x = pipe.generate(["a red circle", "a red circle", "a blue square", "a blue square"], None,
                      SampleSettings("ddim", 2, guidance=3.0), seed=3, progress=False)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert np.abs(tile(g, r, c) - to_uint8(x[i])).max() <= 1, i
    assert np.abs(tile(g, 0, 0) - tile(g, 0, 1)).max() > 5  # each image its own noise
    assert np.abs(tile(g, 0, 0) - tile(g, 1, 0)).max() > 5  # each row its own prompt
    assert np.ptp(tile(g, 0, 0)) > 10  # an image, not a fill


def test_generate_default_scale_doubles_the_grid(t2i_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    assert cli("generate", "a red circle", "-m", str(t2i_run), "--steps", "2", "-q", "-o", str(out)) == 0
    assert grid(out).shape == grid_shape(1, 1, scale=2)


def test_generate_takes_a_map_and_a_layout_file(jittered: Path, scene: dict, tmp_path: Path) -> None:
    seg_png = save_segmap(tmp_path / "seg.png", scene["segmentation"])
    boxes, labels = layout_from_sample(scene, SIZE)
    layout_json = write_layout(tmp_path / "boxes.json", boxes, labels, SHAPES)
    common = ["-m", str(jittered), "--steps", "2", "--scale", "1", "-q"]
    outs = {}
    for name, extra in {"plain": [], "map": ["--map", str(seg_png)], "layout": ["--layout", str(layout_json)],
                        "both": ["--map", str(seg_png), "--layout", str(layout_json)]}.items():
        outs[name] = tmp_path / f"{name}.png"
        assert cli("generate", "a red circle", *common, *extra, "-o", str(outs[name])) == 0, name
    # the map, the layout and both change the image; the pipeline given the same map and boxes makes the same one
    assert np.abs(grid(outs["map"]) - grid(outs["plain"])).max() > 10
    assert np.abs(grid(outs["layout"]) - grid(outs["plain"])).max() > 10
    assert np.abs(grid(outs["both"]) - grid(outs["map"])).max() > 10
    pipe = TextToImagePipeline.from_pretrained(jittered, device="cpu")
    present = labels >= 0
    x = pipe.generate("a red circle", None, SampleSettings("ddim", 2, guidance=3.0), progress=False,
                      segmap=scene["segmentation"][None], layout=(boxes[present][None], labels[present][None]))
    assert np.abs(tile(grid(outs["both"]), 0, 0) - to_uint8(x[0])).max() <= 1
    # a map or a layout alone needs no prompt
    assert cli("generate", *common, "--map", str(seg_png), "-o", str(tmp_path / "m.png")) == 0
    assert cli("generate", *common, "--layout", str(layout_json), "-o", str(tmp_path / "l.png")) == 0


def test_generate_bad_inputs_are_one_line(t2i_run: Path, text_run: Path, ae_run: Path, scene: dict,
                                          tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "o.png")
    seg_png = str(save_segmap(tmp_path / "seg.png", scene["segmentation"]))
    boxes, labels = layout_from_sample(scene, SIZE)
    layout_json = str(write_layout(tmp_path / "boxes.json", boxes, labels, SHAPES))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{bad")
    t2i, txt = str(t2i_run), str(text_run)
    err_line(capsys, 2, "generate", "x", "-m", str(tmp_path / "nope"), "-o", out, needles=("no model at", "nope"))
    err_line(capsys, 2, "generate", "x", "-m", t2i, "--map", str(tmp_path / "none.png"), "-o", out,
             needles=("--map", "none.png", "no such file"))
    err_line(capsys, 2, "generate", "x", "-m", t2i, "--layout", str(tmp_path / "none.json"), "-o", out,
             needles=("--layout", "no such file"))
    err_line(capsys, 2, "generate", "x", "-m", t2i, "--layout", str(bad_json), "-q", "-o", out,
             needles=("bad.json", "not JSON"))
    err_line(capsys, 2, "generate", "-m", t2i, "-o", out, needles=("give a prompt",))
    err_line(capsys, 2, "generate", "x", "-m", txt, "--map", seg_png, "-q", "-o", out,
             needles=("takes no segmentation map", "text"))
    err_line(capsys, 2, "generate", "x", "-m", txt, "--layout", layout_json, "-q", "-o", out,
             needles=("takes no layout",))
    err_line(capsys, 2, "generate", "x", "-m", "shapes", "-q", "-o", out,
             needles=("not a latent diffusion model", "pakhsh sample"))
    err_line(capsys, 2, "generate", "x", "-m", str(ae_run), "-q", "-o", out,
             needles=("is an autoencoder", "pakhsh reconstruct"))
    err_line(capsys, 2, "generate", "x", "-m", t2i, "--height", "12", "-q", "-o", out,
             needles=("height 12", "multiple of 8"))
    err_line(capsys, 2, "generate", "x", "-m", t2i, "-o", str(tmp_path / "o.xyz"), needles=("unknown image type",))
    assert not list(tmp_path.glob("o.*"))


def test_generate_with_one_step(t2i_run: Path, tmp_path: Path, capsys) -> None:
    code, err = run_cli(["--threads", "1", "generate", "a red circle", "-m", str(t2i_run), "--steps", "1", "-q",
                         "-o", str(tmp_path / "one.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "one.png").is_file()


def test_sample_on_latent_and_autoencoder_models_points_elsewhere(t2i_run: Path, ae_run: Path, capsys) -> None:
    err_line(capsys, 2, "sample", "-m", str(t2i_run), needles=("latent diffusion model", "pakhsh generate"))
    err_line(capsys, 2, "sample", "-m", str(ae_run), needles=("is an autoencoder", "pakhsh reconstruct"))


# ------------------------------------------------------------------------------------------------ inpaint
def test_inpaint_keeps_the_known_pixels(t2i_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "in.png"
    assert cli("inpaint", "data:0", "a red circle", "-m", str(t2i_run), "--steps", "2", "-n", "2", "--scale", "1",
               "-q", "-o", str(out)) == 0
    g = grid(out)
    assert g.shape == grid_shape(1, 3)  # [masked input | 2 outputs]
    hole = center_mask(SIZE, SIZE)[0].bool().numpy()
    assert hole.any() and not hole.all()
    shown, first, second = tile(g, 0, 0), tile(g, 0, 1), tile(g, 0, 2)
    assert (shown[hole] == [255, 0, 255]).all()  # the hole shown in magenta
    image = build_dataset(DataConfig(name="shapes", split="test", image_size=SIZE, length=1))[0]["image"]
    assert np.array_equal(shown[~hole], to_uint8(image)[~hole])  # data:0 is the first test scene
    for out_tile in (first, second):
        assert np.array_equal(out_tile[~hole], shown[~hole])  # known pixels exactly
    assert np.abs(first[hole] - second[hole]).max() > 0  # two different fills


def test_inpaint_with_a_mask_file(t2i_run: Path, tmp_path: Path, capsys) -> None:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[2:7, 9:15] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "in.png"
    assert cli("inpaint", "data:1", "-m", str(t2i_run), "--mask", str(tmp_path / "mask.png"), "--steps", "2",
               "-n", "1", "--scale", "1", "-q", "-o", str(out)) == 0
    g = grid(out)
    hole = mask > 0
    assert (tile(g, 0, 0)[hole] == [255, 0, 255]).all()
    assert np.array_equal(tile(g, 0, 1)[~hole], tile(g, 0, 0)[~hole])

    Image.fromarray(np.zeros((12, 10), dtype=np.uint8)).save(tmp_path / "small.png")
    err_line(capsys, 2, "inpaint", "data:0", "x", "-m", str(t2i_run), "--mask", str(tmp_path / "small.png"), "-q",
             "-o", str(tmp_path / "bad.png"), needles=("10x12", f"{SIZE}x{SIZE}"))
    err_line(capsys, 2, "inpaint", "data:0", "x", "-m", str(t2i_run), "--mask", str(tmp_path / "none.png"),
             "-o", str(tmp_path / "bad.png"), needles=("--mask", "no such file"))
    err_line(capsys, 2, "inpaint", "data:x", "-m", str(t2i_run), "-o", str(tmp_path / "bad.png"),
             needles=("whole number",))
    err_line(capsys, 2, "inpaint", "data:0", "-m", "shapes", "-q", "-o", str(tmp_path / "bad.png"),
             needles=("not a latent diffusion model",))
    assert not (tmp_path / "bad.png").exists()


# ------------------------------------------------------------------------------------------------ reconstruct
def test_reconstruct_prints_psnr_and_ssim_and_writes_pairs(ae_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.png"
    assert cli("reconstruct", "data:4", "-m", str(ae_run), "--scale", "1", "-o", str(out)) == 0
    printed = capsys.readouterr().out
    m = re.search(r"4 image\(s\).*PSNR (-?[\d.]+) dB, SSIM (-?[\d.]+)", printed)
    assert m, printed
    g = grid(out)
    assert g.shape == grid_shape(1, 8)  # 4 pairs [original | reconstruction] in one row of 8

    # what the command measured: the EMA autoencoder's posterior-mean reconstructions of the first 4 test scenes
    ae, _ = load_autoencoder(ae_run)
    ds = build_dataset(DataConfig(name="shapes", split="test", image_size=SIZE, length=4))
    x = torch.stack([ds[i]["image"] for i in range(4)])
    with torch.no_grad():
        recon = ae.decode(ae.encode(x).mean).clamp(-1, 1)
    mse = ((recon.double() - x.double()) ** 2).mean(dim=(1, 2, 3))
    want_psnr = float((10 * torch.log10(4.0 / mse)).mean())
    assert float(m.group(1)) == pytest.approx(want_psnr, abs=0.011)
    assert -1 <= float(m.group(2)) <= 1
    for i in range(4):
        assert np.abs(tile(g, 0, 2 * i) - to_uint8(x[i])).max() <= 1
        assert np.abs(tile(g, 0, 2 * i + 1) - to_uint8(recon[i])).max() <= 1


def test_reconstruct_a_folder_of_images(ae_run: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / name)
    assert cli("reconstruct", str(folder), "-m", str(ae_run), "-o", str(tmp_path / "r.png")) == 0
    printed = capsys.readouterr().out
    assert "2 image(s)" in printed and "PSNR" in printed and "SSIM" in printed
    psnr = float(re.search(r"PSNR (-?[\d.]+)", printed).group(1))
    assert math.isfinite(psnr)


def test_reconstruct_needs_an_autoencoder(t2i_run: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "r.png")
    err_line(capsys, 2, "reconstruct", "data:2", "-m", "shapes", "-o", out, needles=("is not an autoencoder",))
    err_line(capsys, 2, "reconstruct", "data:2", "-m", str(t2i_run), "-o", out, needles=("is not an autoencoder",))
    err_line(capsys, 2, "reconstruct", "data:0", "-m", "shapes", "-o", out, needles=("data:0", ">= 1"))
    err_line(capsys, 2, "reconstruct", str(tmp_path / "none"), "-m", "shapes", "-o", out,
             needles=("no such file or folder",))
    assert not Path(out).exists()


# ------------------------------------------------------------------------------------------------ other commands
def test_export_diffusers_refuses_an_autoencoder(ae_run: Path, tmp_path: Path, capsys) -> None:
    err_line(capsys, 2, "export", str(ae_run), str(tmp_path / "out"), "--format", "diffusers",
             needles=("autoencoder",))
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_export_diffusers_refuses_an_unconditional_latent_model(ae_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "uncond"
    sets = t2i_sets(ae_run, "condition=null", "model.context_dim=null", "model.cond_channels=0",
                    "model.layout_classes=null", "train.steps=1", "train.save_every=1")
    assert train("t2i", run, sets) == 0
    assert cli("generate", "-m", str(run), "", "--steps", "2", "-q", "-o", str(tmp_path / "u.png")) == 0  # usable
    err_line(capsys, 2, "export", str(run), str(tmp_path / "out"), "--format", "diffusers", needles=("latent",))
    assert not (tmp_path / "out" / "model_index.json").exists()


@pytest.mark.parametrize("which", ["ae_run", "t2i_run"])
def test_info_gives_the_image_size_and_the_latents(which: str, request, capsys) -> None:
    run = request.getfixturevalue(which)
    assert cli("info", str(run)) == 0
    data = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data:"))
    assert data.split()[2].startswith(f"{SIZE}x{SIZE}"), data  # the images, not model.image_size
    assert "latents 4x4x4" in data, data
