"""Stable Diffusion folders on pakhsh's own nets, samplers and guidance.

A tiny randomly initialised StableDiffusionPipeline (UNet2DConditionModel widths 32/64, AutoencoderKL f = 2, a
2-layer CLIP text model with an offline CLIPTokenizer of 16 tokens, DDIMScheduler) is saved by diffusers with
safetensors and read back both by diffusers and by `load_sd_folder`. Same prompt, same starting latents, same
steps and guidance: `TextToImagePipeline` must give diffusers' images.

What is compared. The scheduler is SD's DDIM config (scaled_linear 0.00085..0.012, clip_sample False, "leading"
spacing with steps_offset 1: 10 steps visit 1, 101, ..., 901) except set_alpha_to_one=True: pakhsh's samplers
always end on the x_0 prediction, which is that setting (SD ships False; see pipelines/text_to_image.py). pakhsh
walks the very timesteps the scheduler picks (asserted), with its own DDIM at eta = 0.
Measured on CPU, fp32: images agree to ~3e-6 (asserted 1e-4), the UNet alone to ~2e-6 (asserted 1e-5), the text
context exactly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from pakhsh.interop.stable_diffusion import (  # noqa: E402
    StableDiffusionFolderError,
    load_sd_folder,
    unet_config_from_diffusers,
    unet_state_from_diffusers,
)
from pakhsh.nets.unet import UNet  # noqa: E402
from pakhsh.pipelines.text_to_image import TextToImagePipeline, scheduler_timesteps  # noqa: E402
from pakhsh.pipelines.unconditional import SampleSettings  # noqa: E402
from pakhsh.samplers import SAMPLERS, ClassifierFreeGuidance  # noqa: E402
from tests.tiny_clip import tiny_clip  # noqa: E402

PROMPTS = ["a red circle", "red"]
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8)  # SD 1.x's layout, shrunk: attention at the first level and in the middle
SD_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
               set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")


@pytest.fixture(autouse=True)
def _one_thread(_threads: None) -> Iterator[None]:
    """One torch thread: these nets are tiny, and the test machine is shared with training jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- the tiny folder
def _clip() -> tuple[nn.Module, object]:
    """A CLIPTokenizer written offline (bytes, a few merges, the two specials) and a 2-layer CLIP text model."""
    config, tokenizer = tiny_clip(max_positions=16, model_max_length=16)
    return transformers.CLIPTextModel(config), tokenizer


def _randomize_norms(net: nn.Module, seed: int) -> nn.Module:
    """GroupNorm/LayerNorm start at (1, 0): give them random affine maps so a mix-up of norms would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return net


def _unet(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize_norms(diffusers.UNet2DConditionModel(**{**UNET, **overrides}), seed + 1).eval()


def _pipeline(scheduler_kw: dict) -> object:
    text_encoder, tokenizer = _clip()
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                  layers_per_block=1, sample_size=16)
    return diffusers.StableDiffusionPipeline(
        unet=_unet(), vae=_randomize_norms(vae, 2), text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=diffusers.DDIMScheduler(**scheduler_kw), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _from_disk(folder: Path) -> object:
    """What a user with this folder runs in diffusers."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    _pipeline(SD_DDIM).save_pretrained(str(folder), safe_serialization=True)
    return folder, _from_disk(folder)


@pytest.fixture(scope="module")
def ours(sd: tuple[Path, object]) -> TextToImagePipeline:
    return TextToImagePipeline.from_pretrained(sd[0], device="cpu")


def _theirs(ref, prompts, latents, steps, guidance, negative=None) -> torch.Tensor:
    """diffusers' images, mapped from [0, 1] to our [-1, 1]."""
    out = ref(prompts, negative_prompt=negative, latents=latents, num_inference_steps=steps,
              guidance_scale=guidance, output_type="pt").images
    return out * 2 - 1


def _latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- the mapping
def test_folder_becomes_our_nets_and_diffusion(sd, ours: TextToImagePipeline) -> None:
    m = ours.model
    c = m.unet.cfg
    assert (c.model_channels, c.channel_mult, c.num_res_blocks, c.attention_resolutions) == (32, (1, 2), 1, (8,))
    assert (c.context_dim, c.num_heads, c.num_head_channels, c.num_groups) == (32, 4, -1, 8)
    assert not c.use_scale_shift_norm and not c.use_linear_projection
    assert m.vae.cfg.scaling_factor == pytest.approx(0.18215) and m.vae_factor == 2 and m.latent_size == (8, 8)
    assert (m.timestep_spacing, m.steps_offset, m.clip_denoised) == ("leading", 1, False)
    torch.testing.assert_close(ours.diffusion.betas, sd[1].scheduler.betas.double(), atol=1e-9, rtol=1e-6)


def test_unet_equals_diffusers_unet(sd, ours: TextToImagePipeline) -> None:
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 16, 32, generator=g)
    t = torch.tensor([1, 480, 999])
    with torch.no_grad():
        mine, theirs = ours.unet(x, t, context=ctx), sd[1].unet(x, t, encoder_hidden_states=ctx).sample
    assert (mine - theirs).abs().max() < 1e-5  # measured 1.4e-6


def test_sd2_style_unet_maps_exactly() -> None:
    # SD 2.x: linear projections, one head count per level at a constant head width (64 there, 16 here), deeper
    # transformers; also [sin | cos] time features and upcast_attention (a no-op in fp32).
    ref = _unet(seed=5, use_linear_projection=True, attention_head_dim=[2, 4], transformer_layers_per_block=2,
                flip_sin_to_cos=False, upcast_attention=True)
    cfg, problems = unet_config_from_diffusers(dict(ref.config))
    assert problems == [] and cfg is not None
    assert (cfg.num_head_channels, cfg.transformer_depth, cfg.use_linear_projection) == (16, 2, True)
    net = UNet(cfg)
    state, problems = unet_state_from_diffusers(net, ref.state_dict(), flip_sin_to_cos=False)
    assert problems == []
    net.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(4)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.tensor([3, 777])
    with torch.no_grad():
        assert (net.eval()(x, t, context=ctx) - ref(x, t, encoder_hidden_states=ctx).sample).abs().max() < 1e-5


def test_prompt_context_is_diffusers_encode_prompt(sd, ours: TextToImagePipeline) -> None:
    cond, uncond = sd[1].encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["ci", ""])
    assert torch.equal(ours.text_encoder.encode(PROMPTS).tokens, cond)
    emb = ours.text_encoder.encode(["ci", ""])
    assert torch.equal(emb.tokens, uncond) and emb.mask.all() and emb.tokens.shape == (2, 16, 32)


# ---------------------------------------------------------------------------------------------- images
def test_images_equal_diffusers_with_guidance_and_negative_prompts(sd, ours: TextToImagePipeline) -> None:
    ref, latents, steps = sd[1], _latents(2), 10
    cases = [(7.5, None), (7.5, ["ci", "a red"]), (1.0, None)]
    images = []
    for guidance, negative in cases:
        theirs = _theirs(ref, PROMPTS, latents, steps, guidance, negative)
        settings = SampleSettings("ddim", steps, eta=0.0, guidance=guidance)
        mine = ours.generate(PROMPTS, negative, settings, latents=latents, progress=False)
        assert mine.shape == (2, 3, 16, 16)
        err = (mine - theirs).abs().max().item()
        assert err < 1e-4, (guidance, negative, err)  # measured <= 3e-6
        images.append(mine)
    # what was compared: pakhsh's DDIM at exactly the timesteps diffusers' scheduler walked
    assert ours.chain(settings).timestep_map.tolist() == sorted(ref.scheduler.timesteps.tolist())
    assert ours.chain(settings).timestep_map.tolist() == list(range(1, 1000, 100))
    # and the comparison is not vacuous: guidance and the negative prompt change the images
    assert (images[0] - images[2]).abs().max() > 1e-2 and (images[0] - images[1]).abs().max() > 1e-2


def test_v_prediction_folder_equals_diffusers(sd, tmp_path: Path) -> None:
    folder = tmp_path / "sd-v"
    shutil.copytree(sd[0], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    latents = _latents(1, seed=7)
    theirs = _theirs(_from_disk(folder), PROMPTS[:1], latents, 6, 5.0)
    mine = TextToImagePipeline.from_pretrained(folder, device="cpu").generate(
        PROMPTS[:1], settings=SampleSettings("ddim", 6, guidance=5.0), latents=latents, progress=False)
    assert (mine - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
def test_timesteps_are_the_schedulers(spacing: str, offset: int) -> None:
    for steps in (1, 7, 10, 50, 999, 1000):
        sched = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        sched.set_timesteps(steps)
        if offset and steps == 1000:
            with pytest.raises(ValueError, match="outside 0..999"):  # 999 + 1 is past T (diffusers fails later)
                scheduler_timesteps(spacing, offset, 1000, steps)
            continue
        assert scheduler_timesteps(spacing, offset, 1000, steps) == sorted(sched.timesteps.tolist())


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_guides_text_and_seeds_each_image(ours: TextToImagePipeline, sampler: str) -> None:
    s = SampleSettings(sampler, 3, guidance=4.0)
    prompts = ["a red circle", "ci", ""]
    one_batch = ours.generate(prompts, settings=s, seed=11, batch_size=3, progress=False)
    first = ours.generate(prompts[:1], settings=s, seed=11, progress=False)
    assert one_batch.shape == (3, 3, 16, 16) and torch.isfinite(one_batch).all()
    assert one_batch.abs().max() <= 1
    # image i depends on (seed, i) only: the batch it was drawn in does not matter
    split = ours.generate(prompts, settings=s, seed=11, batch_size=2, progress=False)
    torch.testing.assert_close(split, one_batch, atol=1e-5, rtol=0)
    torch.testing.assert_close(first[0], one_batch[0], atol=1e-5, rtol=0)  # a shorter run: the same first image


def test_guidance_zero_is_the_negative_prompt_and_one_the_prompt(ours: TextToImagePipeline) -> None:
    latents = _latents(1, seed=2)

    def run(prompt, guidance, negative=None):
        return ours.generate([prompt], negative, SampleSettings("ddim", 4, guidance=guidance), latents=latents,
                             progress=False)

    torch.testing.assert_close(run("a red circle", 0.0), run("", 1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(run("a red circle", 0.0, "ci"), run("ci", 1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(run("a red circle", 1.0, "ci"), run("a red circle", 1.0), atol=0, rtol=0)


def test_long_prompt_is_truncated_with_a_notice(ours: TextToImagePipeline) -> None:
    with pytest.warns(UserWarning, match=r"1 of 2 prompt\(s\) longer than 16 tokens were truncated: #1"):
        ours.generate(["red", "a red circle " * 10], settings=SampleSettings("ddim", 1, guidance=1.0),
                      progress=False)


def test_bad_generate_arguments_are_named(ours: TextToImagePipeline) -> None:
    s = SampleSettings("ddim", 2)
    with pytest.raises(ValueError, match=r"latents must be \(2, 4, 8, 8\)"):
        ours.generate(PROMPTS, settings=s, latents=_latents(1), progress=False)
    with pytest.raises(ValueError, match="height 10: must be a positive multiple of 4"):
        ours.generate(PROMPTS, settings=s, height=10, progress=False)
    with pytest.raises(ValueError, match="negative_prompt: give one or 2"):
        ours.generate(PROMPTS, ["a", "b", "c"], settings=s, progress=False)
    with pytest.raises(ValueError, match="steps 1001"):
        ours.generate(PROMPTS, settings=SampleSettings("ddim", 1001), progress=False)
    assert ours.generate(["red"], settings=s, height=24, width=16, progress=False).shape == (1, 3, 24, 16)


def test_padding_masks_of_a_pakhsh_encoder_reach_both_guidance_halves(ours: TextToImagePipeline) -> None:
    # conditioning.text.TextEncoder marks padding with mask=False: the UNet must never see those positions, in the
    # conditional or the unconditional half. Garbage placed there must not change the image.
    from dataclasses import replace

    from pakhsh.conditioning.text import TextEmbedding

    class Padded:
        max_length = 16

        def __init__(self, fill: float) -> None:
            self.fill = fill

        def encode(self, prompts: list[str]) -> TextEmbedding:
            g = torch.Generator().manual_seed(len(prompts[0]))
            tokens = torch.randn(len(prompts), 16, 32, generator=g)
            mask = torch.arange(16) < 3 + len(prompts[0]) % 5  # a few real tokens, the rest padding
            tokens[:, ~mask] = self.fill
            return TextEmbedding(tokens, mask.expand(len(prompts), 16), [False] * len(prompts))

    def run(fill: float) -> torch.Tensor:
        pipe = TextToImagePipeline(replace(ours.model, text_encoder=Padded(fill)), device="cpu")
        return pipe.generate(["a red circle"], settings=SampleSettings("ddim", 3, guidance=5.0), progress=False)

    torch.testing.assert_close(run(0.0), run(1e3), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- guidance over context
def test_guidance_null_context_is_shared_or_per_sample() -> None:
    def model(x, t, context, context_mask):  # output: each sample's mean over its unmasked tokens
        m = context_mask[..., None].float()
        return x * 0 + ((context * m).sum((1, 2)) / (m.sum((1, 2)) * context.shape[2])).view(-1, 1, 1, 1)

    x, t = torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long)
    ctx, mask = torch.full((2, 3, 4), 2.0), torch.ones(2, 3, dtype=torch.bool)
    shared = {"context": torch.zeros(1, 3, 4), "context_mask": torch.ones(1, 3, dtype=torch.bool)}
    assert torch.equal(ClassifierFreeGuidance(model, 3.0, shared)(x, t, context=ctx, context_mask=mask),
                       torch.full((2, 1, 1, 1), 6.0))
    per_sample = {"context": torch.stack([torch.zeros(3, 4), torch.ones(3, 4)]),
                  "context_mask": torch.tensor([[True, False, False], [True, True, True]])}
    out = ClassifierFreeGuidance(model, 3.0, per_sample)(x, t, context=ctx, context_mask=mask)
    assert out.flatten().tolist() == [6.0, 1.0 + 3.0 * (2.0 - 1.0)]
    with pytest.raises(ValueError, match=r"null condition 'context' has shape \(3, 3, 4\).*\(1, 3, 4\) or \(2, 3, 4\)"):
        ClassifierFreeGuidance(model, 3.0, {"context": torch.zeros(3, 3, 4)})(x, t, context=ctx, context_mask=mask)


# ---------------------------------------------------------------------------------------------- bad folders
def _copy(sd, tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(sd[0], folder)
    return folder


def test_missing_and_broken_parts_are_listed_in_one_error(sd, tmp_path: Path) -> None:
    folder = _copy(sd, tmp_path)
    shutil.rmtree(folder / "vae")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file" * 10)
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "rescale_betas_zero_snr": True}))
    with pytest.raises(StableDiffusionFolderError) as info:
        load_sd_folder(folder)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{folder} is not a usable Stable Diffusion folder: ")
    assert f"{folder / 'vae'}/ is missing" in msg
    assert "unet/diffusion_pytorch_model.safetensors is not a readable safetensors file" in msg
    assert "rescale_betas_zero_snr=True is not supported" in msg
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sd_folder(tmp_path / "nowhere")


def test_mismatched_unet_weights_are_named_by_key(sd, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(sd, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["conv_out.bias"]
    state["extra.weight"] = torch.zeros(1)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    state[f"{attn}.to_q.weight"] = state[f"{attn}.to_q.weight"][:16]
    save_file(state, str(weights))
    (folder / "text_encoder" / "model.safetensors").rename(folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(StableDiffusionFolderError) as info:
        load_sd_folder(folder)
    msg = str(info.value)
    assert "lacks conv_out.bias" in msg and "does not use: extra.weight" in msg
    # q, k and v are one fused weight here: the mismatch names all three of theirs
    assert f"{attn}.to_q.weight/{attn}.to_k.weight/{attn}.to_v.weight is (80, 32) but config.json needs (96, 32)" in msg
    assert f"{folder / 'text_encoder' / 'model.safetensors'} is missing" in msg
    # a UNet of another width: every weight mismatches; the message names the first few and counts them
    save_file({k: v.contiguous() for k, v in _unet(block_out_channels=(16, 32)).state_dict().items()}, str(weights))
    with pytest.raises(StableDiffusionFolderError,
                       match=r"time_embedding.linear_1.weight is \(64, 16\) but config.json needs \(128, 32\).*"
                             r"\(195 in all\)"):
        load_sd_folder(folder)


def test_unet_settings_pakhsh_cannot_represent_are_all_named() -> None:
    config = {**dict(_unet().config), "class_embed_type": "timestep", "resnet_time_scale_shift": "scale_shift",
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "in_channels": 9, "mystery": 1}
    cfg, problems = unet_config_from_diffusers(config)
    text = " ".join(problems)
    assert cfg is None
    for named in ("class_embed_type='timestep'", "resnet_time_scale_shift='scale_shift'", "in_channels=9",
                  "unknown setting(s) mystery", "level 0 cross-attends on one side only"):
        assert named in text, named
