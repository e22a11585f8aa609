"""PalettePipeline on tiny models trained for two steps by the real trainer (16 px, T = 50): conditions per task,
restoration that keeps known pixels bit for bit under every sampler, seeds and batching, K samples per input,
the one-pass regression baseline, panoramas grown tile by tile, task checks and evaluation degradations.

`palette_run` is shared with tests/e2e/test_restore_cli.py: each kind of model is trained once per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pakhsh.cli import main
from pakhsh.data.builtin.shapes import ShapesDataset
from pakhsh.pipelines import SampleSettings
from pakhsh.pipelines.palette import PalettePipeline
from pakhsh.tasks import TASK_NAMES, apply_mask, box_masks, center_mask, jpeg_compress, to_luma, uncrop_canvas
from pakhsh.tasks.uncrop import known_region

SIZE = 16
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "sde-dpm++2m")

_MODEL = {"image_size": SIZE, "in_channels": 3, "out_channels": 3, "cond_channels": 4, "model_channels": 16,
          "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], "dropout": 0.0, "num_groups": 8}
# multi: fixed, non-default task settings, so `degrade` can be seen to use the model's own
KINDS = {
    "multi": {"task": {"name": "multi", "mask": "boxes", "uncrop_side": "left", "uncrop_fraction": 0.25,
                       "jpeg_quality": [7, 7]}, "num_classes": 4},
    "colorize": {"task": {"name": "colorize"}, "num_classes": None},
    "regression": {"task": {"name": "inpaint", "mask": "center"}, "num_classes": None, "objective": "regression"},
}


def palette_config(kind: str) -> dict:
    spec = KINDS[kind]
    cfg = {
        "name": f"tiny_palette_{kind}",
        "data": {"name": "shapes", "image_size": SIZE, "length": 64},
        "model": {**_MODEL, "num_classes": spec["num_classes"]},
        "diffusion": {"num_steps": 50, "schedule": "cosine"},
        "task": spec["task"],
        "train": {"steps": 2, "batch_size": 8, "log_every": 1, "save_every": 2, "sample_every": 0,
                  "mixed_precision": "no", "device": "cpu", "num_preview": 2, "preview_steps": 2},
    }
    if "objective" in spec:
        cfg["objective"] = spec["objective"]
    return cfg


def palette_run(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    """A run folder of a tiny Palette model of `kind` (see KINDS), trained through `pakhsh train` once per session."""
    root = tmp_path_factory.getbasetemp() / "palette_runs"
    run = root / kind
    if (run / "checkpoints" / "LATEST").is_file():
        return run
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / f"{kind}.yaml"
    cfg.write_text(yaml.safe_dump(palette_config(kind)))
    assert main(["train", str(cfg), "--out", str(run), "-q"]) == 0
    assert (run / "checkpoints" / "LATEST").is_file()
    return run


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> PalettePipeline:
    return PalettePipeline.from_pretrained(palette_run(tmp_path_factory, "multi"), device="cpu")


@pytest.fixture(scope="module")
def colorize(tmp_path_factory) -> PalettePipeline:
    return PalettePipeline.from_pretrained(palette_run(tmp_path_factory, "colorize"), device="cpu")


@pytest.fixture(scope="module")
def regression(tmp_path_factory) -> PalettePipeline:
    return PalettePipeline.from_pretrained(palette_run(tmp_path_factory, "regression"), device="cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    ds = ShapesDataset(split="test", size=SIZE)
    return torch.stack([ds[i]["image"] for i in range(4)])  # (4, 3, 16, 16) in [-1, 1]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny convolutions: more threads only wait for each other (after conftest's 2)


def fast(sampler: str = "ddim") -> SampleSettings:
    return SampleSettings(sampler, steps=3)


def known(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.expand_as(like) < 0.5


# ---------------------------------------------------------------------------------------------- the models
def test_trained_models_are_what_the_configs_say(multi, colorize, regression) -> None:
    assert (multi.trained_task, multi.num_classes, multi.objective, multi.size) == ("multi", 4, "diffusion", SIZE)
    assert (colorize.trained_task, colorize.num_classes, colorize.objective) == ("colorize", None, "diffusion")
    assert (regression.trained_task, regression.objective) == ("inpaint", "regression")
    assert multi.task_config.uncrop_side == "left" and multi.task_config.jpeg_quality == (7, 7)


# ---------------------------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("task", TASK_NAMES)
def test_prepare_shapes_and_task_label(multi, images, task) -> None:
    cond = multi.prepare(images, task, quality=10)
    assert set(cond) == {"cond_image", "mask", "y"}
    assert cond["cond_image"].shape == (4, 3, SIZE, SIZE) and cond["cond_image"].dtype == torch.float32
    assert cond["mask"].shape == (4, 1, SIZE, SIZE) and cond["mask"].dtype == torch.float32
    assert set(cond["mask"].unique().tolist()) <= {0.0, 1.0}
    assert cond["y"].dtype == torch.long and cond["y"].tolist() == [TASK_NAMES.index(task)] * 4


def test_single_task_model_gets_no_label(colorize, images) -> None:
    cond = colorize.prepare(images, "colorize")
    assert set(cond) == {"cond_image", "mask"}


def test_prepare_colorize_is_grey_with_everything_generated(colorize, images) -> None:
    cond = colorize.prepare(images, "colorize")
    c = cond["cond_image"]
    assert torch.equal(c[:, 0], c[:, 1]) and torch.equal(c[:, 1], c[:, 2])
    assert torch.equal(c, to_luma(images))
    assert not torch.equal(c, images)  # the shapes are coloured: grey is a real change
    assert torch.equal(cond["mask"], torch.ones(4, 1, SIZE, SIZE))


@pytest.mark.parametrize("shape", [(1, SIZE, SIZE), (1, 1, SIZE, SIZE), (4, 1, SIZE, SIZE)])
def test_prepare_inpaint_with_a_given_mask(multi, images, shape) -> None:
    m = torch.zeros(4, 1, SIZE, SIZE)
    m[0, :, 2:9, 3:12] = 1.0
    m[1:, :, 5:, :4] = 1.0
    m = m[:1].reshape(shape) if shape[0] == 1 else m
    cond = multi.prepare(images, "inpaint", mask=m)
    mask = cond["mask"]
    assert torch.equal(mask, m.reshape(-1, 1, SIZE, SIZE).expand(4, 1, SIZE, SIZE))
    c = cond["cond_image"]
    hole = ~known(mask, c)
    assert (c[hole] == 0).all()
    assert torch.equal(c[~hole], images[~hole])


def test_prepare_inpaint_condition_is_the_training_one_bit_for_bit(multi, images) -> None:
    m = center_mask(SIZE, SIZE)
    c = multi.prepare(images, "inpaint", mask=m)["cond_image"]
    assert not torch.signbit(c[~known(m.expand(4, 1, SIZE, SIZE), c)]).any()  # Degraded: masked pixels are 0.0
    bad = images.clone()
    bad[:, :, SIZE // 2, SIZE // 2] = float("nan")  # inside the centre hole
    assert torch.isfinite(multi.prepare(bad, "inpaint", mask=m)["cond_image"]).all()


@pytest.mark.parametrize("kind", ["center", "boxes", "freeform"])
def test_prepare_inpaint_generated_masks(multi, images, kind) -> None:
    a = multi.prepare(images, "inpaint", mask_kind=kind, seed=3)
    b = multi.prepare(images, "inpaint", mask_kind=kind, seed=3)
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["cond_image"], b["cond_image"])
    m = a["mask"]
    assert 0 < m.mean() < 1 and set(m.unique().tolist()) == {0.0, 1.0}
    if kind == "center":
        assert torch.equal(m, center_mask(SIZE, SIZE).expand(4, 1, SIZE, SIZE))
    if kind == "boxes":
        assert torch.equal(m, box_masks(4, SIZE, SIZE, torch.Generator().manual_seed(3)))
    if kind != "center":
        assert not torch.equal(m, multi.prepare(images, "inpaint", mask_kind=kind, seed=4)["mask"])
    with pytest.raises(ValueError, match="--mask stars"):
        multi.prepare(images, "inpaint", mask_kind="stars")


@pytest.mark.parametrize("side, fraction", [("right", 0.25), ("left", 0.25), ("top", 0.5), ("bottom", 0.25),
                                            ("all", 0.25)])
def test_prepare_uncrop_band_on_the_chosen_side(multi, images, side, fraction) -> None:
    cond = multi.prepare(images, "uncrop", side=side, fraction=fraction)
    m = cond["mask"][:, 0]
    band = round(fraction * SIZE)
    expect = torch.zeros(SIZE, SIZE)
    if side == "right":
        expect[:, SIZE - band :] = 1
    elif side == "left":
        expect[:, :band] = 1
    elif side == "top":
        expect[:band] = 1
    elif side == "bottom":
        expect[SIZE - band :] = 1
    else:
        expect.fill_(1)
        expect[band : SIZE - band, band : SIZE - band] = 0
    assert torch.equal(m, expect.expand(4, SIZE, SIZE))
    c = cond["cond_image"]
    assert (c[~known(cond["mask"], c)] == 0).all()
    canvas, _ = uncrop_canvas(images, side, fraction)  # the whole image squeezed into the known part
    assert torch.equal(c, canvas)
    rows, cols = known_region(SIZE, SIZE, side, fraction)
    assert not torch.equal(c[..., rows, cols], images[..., rows, cols])  # resized, not cropped


def test_prepare_jpeg_with_and_without_quality(multi, images) -> None:
    as_is = multi.prepare(images, "jpeg")
    assert torch.equal(as_is["cond_image"], images)  # the input is taken as already compressed
    q = multi.prepare(images, "jpeg", quality=10)
    assert not torch.equal(q["cond_image"], images)
    assert torch.equal(q["cond_image"], jpeg_compress(images, 10))
    for cond in (as_is, q):
        assert torch.equal(cond["mask"], torch.ones(4, 1, SIZE, SIZE))


# ---------------------------------------------------------------------------------------------- restore
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_restore_keeps_known_pixels_exactly(multi, images, sampler) -> None:
    m = torch.zeros(4, 1, SIZE, SIZE)
    m[:, :, 4:12, 3:10] = 1.0
    inpaint = multi.prepare(images, "inpaint", mask=m)
    out = multi.restore(inpaint, fast(sampler), progress=False)
    assert out.shape == images.shape and out.dtype == torch.float32 and out.abs().max() <= 1
    keep = known(m, out)
    assert torch.equal(out[keep], images[keep])  # the user's own pixels, bit for bit
    assert not (out[~keep] == 0).all()  # the hole was generated, not left as the condition's zeros

    uncrop = multi.prepare(images, "uncrop", side="right", fraction=0.25)
    out = multi.restore(uncrop, fast(sampler), progress=False)
    keep = known(uncrop["mask"], out)
    assert torch.equal(out[keep], uncrop["cond_image"][keep])
    assert not (out[~keep] == 0).all()


def test_restore_seeds(multi, images) -> None:
    cond = multi.prepare(images, "inpaint", mask_kind="center")
    for sampler in ("ddpm", "sde-dpm++2m"):
        a = multi.restore(cond, fast(sampler), seed=5, progress=False)
        b = multi.restore(cond, fast(sampler), seed=5, progress=False)
        c = multi.restore(cond, fast(sampler), seed=6, progress=False)
        assert torch.equal(a, b)
        hole = ~known(cond["mask"], a)
        assert not torch.equal(a[hole], c[hole])


class PerImage(torch.nn.Module):
    """A Palette-shaped network whose output for one image depends on that image alone, elementwise: batching
    cannot change a single bit, so any difference between batch sizes would come from the noise streams."""

    def forward(self, x, t, concat=None, y=None):
        y_term = 0.0 if y is None else y.float().view(-1, 1, 1, 1) / 10
        return torch.tanh(x * 0.5 + concat[:, :3] * 0.3 - concat[:, 3:] * 0.2 + t.float().view(-1, 1, 1, 1) / 1000
                          + y_term)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_restore_does_not_depend_on_batch_size(multi, images, sampler) -> None:
    from pakhsh.pipelines import ResolvedModel

    loaded = ResolvedModel(PerImage(), multi.loaded.diffusion, (3, SIZE, SIZE), Path("."), "pakhsh", num_classes=4,
                           null_class=4, config=multi.config)
    pipe = PalettePipeline(loaded, device="cpu")
    cond = pipe.prepare(images[:3], "inpaint", mask_kind="boxes")
    one = pipe.restore(cond, fast(sampler), samples=2, seed=1, batch_size=1, progress=False)
    assert one.shape == (6, 3, SIZE, SIZE)
    for bs in (4, 6, 64):  # uneven batches, one batch
        assert torch.equal(pipe.restore(cond, fast(sampler), samples=2, seed=1, batch_size=bs, progress=False), one)
    # and the trained UNet: the same noise, only the convolutions' float rounding may differ between batch sizes
    cond = multi.prepare(images, "colorize")
    one = multi.restore(cond, fast(sampler), samples=2, seed=1, batch_size=1, progress=False)
    three = multi.restore(cond, fast(sampler), samples=2, seed=1, batch_size=3, progress=False)
    torch.testing.assert_close(three, one, rtol=0, atol=1e-5)
    assert not torch.equal(one[0::2], one[1::2])


def test_restore_k_samples_per_input_in_rows(multi, images) -> None:
    k = 3
    cond = multi.prepare(images[:2], "inpaint", mask_kind="center")
    out = multi.restore(cond, fast("ddpm"), samples=k, seed=2, progress=False)
    assert out.shape == (2 * k, 3, SIZE, SIZE)
    hole = ~known(cond["mask"][:1], out[:1])[0]
    for n in range(2):
        rows = out[n * k : n * k + k]
        keep = known(cond["mask"][n : n + 1], rows)
        assert torch.equal(rows[keep], images[n : n + 1].expand_as(rows)[keep])  # they restore input n
        for i in range(k):
            for j in range(i + 1, k):
                assert not torch.equal(rows[i][hole], rows[j][hole])  # K different outputs
        # output j draws from stream (seed, j): input n alone, starting at index n*K, gives the same rows
        alone = multi.restore({key: v[n : n + 1] for key, v in cond.items()}, fast("ddpm"), samples=k, seed=2,
                              first_index=n * k, progress=False)
        assert torch.equal(alone, rows)


def count_calls(pipe: PalettePipeline) -> tuple[list[int], object]:
    calls: list[int] = []
    handle = pipe.model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    return calls, handle


def test_diffusion_restore_calls_the_network_once_per_step(multi, images) -> None:
    calls, handle = count_calls(multi)
    try:
        multi.restore(multi.prepare(images, "colorize"), fast("ddim"), batch_size=3, progress=False)
    finally:
        handle.remove()
    assert calls == [3, 3, 3, 1, 1, 1]  # 3 steps for each of the two batches (3 + 1 images)


def test_regression_restore_is_one_pass_and_ignores_the_seed(regression, images) -> None:
    cond = regression.prepare(images, "inpaint", mask_kind="center")
    calls, handle = count_calls(regression)
    try:
        a = regression.restore(cond, fast("ddpm"), seed=0, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert calls == [2, 2]  # one network evaluation per batch, not one per step
    for seed, sampler in ((7, "ddpm"), (123, "sde-dpm++2m")):
        assert torch.equal(regression.restore(cond, fast(sampler), seed=seed, batch_size=2, progress=False), a)
    # other batch sizes may round differently inside the convolutions (~1e-11), nothing more
    torch.testing.assert_close(regression.restore(cond, fast(), seed=9, batch_size=4, progress=False), a)
    k2 = regression.restore(cond, fast(), samples=2, seed=3, batch_size=2, progress=False)
    assert torch.equal(k2[0::2], a) and torch.equal(k2[1::2], a)  # a deterministic map: K copies
    keep = known(cond["mask"], a)
    assert torch.equal(a[keep], images[keep]) and not (a[~keep] == 0).all()


# ---------------------------------------------------------------------------------------------- panorama
def spy_restore(pipe: PalettePipeline, monkeypatch) -> list[tuple[dict, torch.Tensor]]:
    calls: list[tuple[dict, torch.Tensor]] = []
    real = pipe.restore

    def spy(cond, *args, **kwargs):
        out = real(cond, *args, **kwargs)
        calls.append((cond, out))
        return out

    monkeypatch.setattr(pipe, "restore", spy)
    return calls


@pytest.mark.parametrize("width, fraction", [(37, 0.25), (40, 0.5)])
def test_panorama_tiles_agree_where_they_meet(multi, images, monkeypatch, width, fraction) -> None:
    image = images[1:2]
    calls = spy_restore(multi, monkeypatch)
    strip = multi.panorama(image, width, fraction=fraction, settings=fast(), seed=4, progress=False)
    assert strip.shape == (1, 3, SIZE, width)
    assert torch.equal(strip[..., :SIZE], image)  # the first tile is the input, exactly
    band = round(fraction * SIZE)
    assert len(calls) == -(-(width - SIZE) // band)  # tiles after the first
    prev = image
    for k, (cond, tile) in enumerate(calls, start=1):
        assert cond["y"].tolist() == [TASK_NAMES.index("uncrop")]
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., SIZE - band :] = 1
        assert torch.equal(cond["mask"], mask)
        # the tile's known part is the previous tile's right part, copied bit for bit, and kept by restore
        assert torch.equal(cond["cond_image"][..., : SIZE - band], prev[..., band:])
        assert torch.equal(tile[..., : SIZE - band], prev[..., band:])
        assert not (tile[..., SIZE - band :] == 0).all()
        # the strip holds every tile at offset k * band (the last one cropped at `width`)
        seen = strip[..., k * band : k * band + SIZE]
        assert torch.equal(seen, tile[..., : seen.shape[-1]])
        prev = tile
    again = multi.panorama(image, width, fraction=fraction, settings=fast(), seed=4, progress=False)
    assert torch.equal(again, strip)


def test_panorama_width_of_one_tile_is_the_input(multi, images) -> None:
    assert torch.equal(multi.panorama(images[:1], SIZE, settings=fast(), progress=False), images[:1])


def test_panorama_narrower_than_the_model_is_an_error(multi, images) -> None:
    with pytest.raises(ValueError, match=f"--width {SIZE - 1}: must be at least the model's image width {SIZE}"):
        multi.panorama(images[:1], SIZE - 1, settings=fast(), progress=False)


# ---------------------------------------------------------------------------------------------- check_task
def test_check_task(multi, colorize) -> None:
    for task in TASK_NAMES:
        assert multi.check_task(task) == task
    assert multi.check_task("panorama") == "uncrop"
    assert colorize.check_task("colorize") == "colorize"
    with pytest.raises(ValueError, match="not a task") as e:
        multi.check_task("deblur")
    assert "panorama" in str(e.value)


@pytest.mark.parametrize("task, needed", [("inpaint", "inpaint"), ("uncrop", "uncrop"), ("jpeg", "jpeg"),
                                          ("panorama", "uncrop")])
def test_a_single_task_model_refuses_other_tasks(colorize, images, task, needed) -> None:
    with pytest.raises(ValueError) as e:
        colorize.check_task(task)
    msg = str(e.value)
    assert "trained for colorize" in msg and f"not {needed}" in msg and f"--task {task}" in msg
    with pytest.raises(ValueError, match="trained for colorize"):
        if task == "panorama":
            colorize.panorama(images[:1], 2 * SIZE, settings=fast(), progress=False)
        else:
            colorize.prepare(images, task)


def test_an_unconditional_model_is_not_a_palette_model() -> None:
    with pytest.raises(ValueError, match="not an image-to-image \\(Palette\\) model"):
        PalettePipeline.from_pretrained("shapes", device="cpu")


# ---------------------------------------------------------------------------------------------- degrade
def test_degrade_is_seeded_and_uses_the_models_task_settings(multi, colorize, images) -> None:
    inp = multi.degrade(images, "inpaint", seed=11)
    assert torch.equal(inp["mask"], multi.degrade(images, "inpaint", seed=11)["mask"])
    assert torch.equal(inp["cond_image"], multi.degrade(images, "inpaint", seed=11)["cond_image"])
    assert not torch.equal(inp["mask"], multi.degrade(images, "inpaint", seed=12)["mask"])
    # the model was trained with mask: boxes
    assert torch.equal(inp["mask"], box_masks(4, SIZE, SIZE, torch.Generator().manual_seed(11)))
    assert torch.equal(inp["cond_image"], apply_mask(images, inp["mask"]))
    assert inp["y"].tolist() == [1] * 4

    unc = multi.degrade(images, "uncrop", seed=0)  # uncrop_side: left, uncrop_fraction: 0.25
    expect = torch.zeros(4, 1, SIZE, SIZE)
    expect[..., :4] = 1
    assert torch.equal(unc["mask"], expect) and unc["y"].tolist() == [2] * 4
    assert multi.check_task("panorama") == "uncrop"

    jp = multi.degrade(images, "jpeg", seed=0)  # jpeg_quality: [7, 7]
    assert torch.equal(jp["cond_image"], jpeg_compress(images, 7))
    assert torch.equal(jp["cond_image"], multi.degrade(images, "jpeg", seed=99)["cond_image"])

    col = colorize.degrade(images, "colorize", seed=0)
    assert torch.equal(col["cond_image"], to_luma(images)) and "y" not in col
    with pytest.raises(ValueError, match="trained for colorize"):
        colorize.degrade(images, "jpeg")


def test_palette_auto_spacing_is_uniform():
    # the noise-dense default of sde-dpm++2m is for unconditional models; Palette's auto stays uniform
    from pakhsh.pipelines import ImagePipeline, SampleSettings
    from pakhsh.pipelines.palette import PalettePipeline

    s = SampleSettings("sde-dpm++2m", 20)
    assert PalettePipeline.spacing_rule(s) == "uniform"
    assert ImagePipeline.spacing_rule(s) == "noise-dense"
    assert ImagePipeline.spacing_rule(SampleSettings("ddpm", 20)) == "uniform"
    with pytest.raises(ValueError, match="unknown spacing 'karras'"):
        ImagePipeline.spacing_rule(SampleSettings(spacing="karras"))
    # text-to-image resolves "auto" the same way, to uniform for every sampler
    from pakhsh.pipelines.text_to_image import TextToImagePipeline
    from pakhsh.samplers import resolve_spacing

    assert resolve_spacing("auto", "sde-dpm++2m", TextToImagePipeline.AUTO_SPACING) == "uniform"
    assert resolve_spacing("noise-dense", "ddpm", TextToImagePipeline.AUTO_SPACING) == "noise-dense"
