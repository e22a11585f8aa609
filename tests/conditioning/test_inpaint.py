"""Inpainting with a latent model (conditioning/inpaint.py): the pixel mask max-pooled to latent cells, the known
latents noised by the forward process, the model seeing them outside the mask, the paste-back, and through
TextToImagePipeline.generate(known=...) the known pixels returned exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pakhsh.conditioning.inpaint import KnownLatents, latent_mask
from pakhsh.diffusion import DiffusionConfig, ModelOutput
from pakhsh.interop.stable_diffusion import LatentDiffusionModel
from pakhsh.nets.autoencoder import AutoencoderConfig, AutoencoderKL
from pakhsh.nets.unet import UNet, UNetConfig
from pakhsh.pipelines import SampleSettings
from pakhsh.pipelines.text_to_image import TextToImagePipeline
from pakhsh.samplers.ddim import ddim_sample
from tests.conftest import TrueEpsModel, tiny_diffusion


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread (after conftest's two): the CPU is shared, and runs compared bit for bit use one."""
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ latent_mask
def test_latent_mask_marks_every_cell_with_a_masked_pixel() -> None:
    mask = torch.zeros(3, 1, 16, 16)
    mask[0, 0, 5, 9] = 1  # one pixel: cell (1, 2) of the 4x4 grid
    mask[1, 0, 4:8, 12:16] = 1  # exactly cell (1, 3)
    mask[1, 0, 15, 0] = 1  # and a corner pixel: cell (3, 0)
    got = latent_mask(mask, (4, 4))
    want = torch.zeros(3, 1, 4, 4)
    want[0, 0, 1, 2] = 1
    want[1, 0, 1, 3] = want[1, 0, 3, 0] = 1
    assert torch.equal(got, want)  # image 2: nothing to generate
    # any pixel of a cell is enough, whatever the latent size
    assert torch.equal(latent_mask(mask[:1], (2, 2)), torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]]))  # (5, 9): top right
    assert torch.equal(latent_mask(torch.ones(1, 1, 16, 16), (4, 4)), torch.ones(1, 1, 4, 4))


@pytest.mark.parametrize("shape", [(2, 16, 16), (2, 3, 16, 16), (16, 16)])
def test_latent_mask_refuses_other_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"mask must be \(N, 1, H, W\)"):
        latent_mask(torch.zeros(shape), (4, 4))


# ------------------------------------------------------------------------------------------------ KnownLatents
class Recorder:
    def __init__(self, fn=None) -> None:
        self.fn = fn
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone(), cond))
        return self.fn(x, t, **cond) if self.fn is not None else torch.zeros_like(x)


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(2, 4, 4, 4, generator=g)
    noise = torch.randn(2, 4, 4, 4, generator=g)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 4:12, 4:12] = 1  # centre 2x2 cells
    mask[1, :, 0, 0] = 1  # one pixel: cell (0, 0)
    return z0, noise, mask


def test_known_at_is_the_forward_process_of_the_known_latents() -> None:
    diffusion = tiny_diffusion(100)
    z0, noise, mask = _setup()
    known = KnownLatents(Recorder(), diffusion, z0, mask, noise)
    t = torch.tensor([0, 99])
    abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)[t].view(-1, 1, 1, 1)
    want = (abar.sqrt() * z0.double() + (1 - abar).sqrt() * noise.double()).float()
    torch.testing.assert_close(known.known_at(t), want, rtol=1e-6, atol=1e-6)
    # at t = 0 nearly z0, at t = T - 1 nearly the noise
    assert (known.known_at(t)[0] - z0[0]).abs().max() < 0.15
    assert (known.known_at(t)[1] - noise[1]).abs().max() < 0.15


def test_the_model_sees_the_known_latents_outside_the_mask() -> None:
    diffusion = tiny_diffusion(100)
    z0, noise, mask = _setup(1)
    inner = Recorder()
    known = KnownLatents(inner, diffusion, z0, mask, noise)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([30, 70])
    ctx = torch.randn(2, 3, 8)
    known(x, t, context=ctx)
    (x_in, t_in, cond), = inner.calls
    assert torch.equal(t_in, t) and cond["context"] is ctx
    cells = latent_mask(mask, (4, 4)).expand_as(x).bool()
    assert int(cells.sum()) == 4 * (4 + 1)  # 4 channels x (4 cells of image 0 + 1 cell of image 1)
    assert torch.equal(x_in[cells], x[cells])  # generated cells: the chain's own latents
    assert torch.equal(x_in[~cells], known.known_at(t)[~cells])  # known cells: the noised known latents
    assert not torch.allclose(x_in[~cells], x[~cells])


def test_finish_pastes_the_known_latents_bit_exactly() -> None:
    diffusion = tiny_diffusion(100)
    z0, noise, mask = _setup(2)
    z0 = z0 * 1.2345678  # values that no blend of z and z0 reproduces by accident
    known = KnownLatents(Recorder(), diffusion, z0, mask, noise)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4)) * 3.3
    out = known.finish(z)
    cells = latent_mask(mask, (4, 4)).expand_as(z).bool()
    assert torch.equal(out[~cells], z0[~cells])
    assert torch.equal(out[cells], z[cells])


def test_known_region_through_a_respaced_sampler() -> None:
    """A respaced DDIM run calls the model with training steps: the known cells it is shown are the forward
    process at that training step's abar (not at the respaced index), the generated cells are the chain's own;
    with a model that knows z0 (exact eps) the generated cells end at z0, and finish() pastes z0 elsewhere."""
    base = tiny_diffusion(100, output="eps")
    assert base.model_output == ModelOutput.EPS
    z0, noise, mask = _setup(3)
    inner = Recorder(TrueEpsModel(base, z0))
    known = KnownLatents(inner, base, z0, mask, noise)
    outer = Recorder(known)
    z = ddim_sample(base.respace("10"), outer, noise.clone(), eta=0.0, clip_denoised=False)
    assert [int(t[0]) for _, t, _ in inner.calls] == list(range(99, -1, -11))  # training steps 99, 88, ..., 0
    cells = latent_mask(mask, (4, 4)).expand_as(z0).bool()
    abar = torch.as_tensor(base.alphas_cumprod, dtype=torch.float64)
    for (x_chain, t, _), (x_in, t_in, _) in zip(outer.calls, inner.calls):
        assert torch.equal(t, t_in)
        a = abar[int(t[0])]
        want = (a.sqrt() * z0.double() + (1 - a).sqrt() * noise.double()).float()
        torch.testing.assert_close(x_in[~cells], want[~cells], rtol=1e-5, atol=1e-5)
        assert torch.equal(x_in[cells], x_chain[cells])
    torch.testing.assert_close(z[cells], z0[cells], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(known.finish(z), z0, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ the pipeline
class RecordingUNet(nn.Module):
    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet, self.cfg = unet, unet.cfg
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        self.inputs.append((x.clone(), t.clone()))
        return self.unet(x, t, **cond)


@pytest.fixture(scope="module")
def pipe() -> TextToImagePipeline:
    """An untrained (jittered) latent model on 16x16 images: f=4 autoencoder with scale 0.8, 4x4x4 latents."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=4, in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2),
                           num_res_blocks=1, attention_resolutions=(), num_groups=8, dropout=0.0))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, num_groups=4,
                                          latent_channels=4, scaling_factor=0.8))
    diffusion = DiffusionConfig(num_steps=100, schedule="cosine", model_output=ModelOutput.V)
    return TextToImagePipeline(LatentDiffusionModel(unet, vae.eval(), None, diffusion, (4, 4)), device="cpu")


def _images(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    img = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    mask = torch.zeros(n, 1, 16, 16)
    mask[:, :, 4:12, 2:10] = 1
    return img, mask


def test_generate_keeps_the_known_pixels_exactly(pipe: TextToImagePipeline) -> None:
    img, mask = _images()
    s = SampleSettings("ddim", 3, guidance=1.0)
    out = pipe.generate(["", ""], settings=s, known=(img, mask), batch_size=1, progress=False)
    assert out.shape == img.shape
    keep = (mask == 0).expand_as(img)
    assert torch.equal(out[keep], img[keep])
    assert not torch.allclose(out[~keep], img[~keep], atol=1e-2)  # the masked region is generated
    assert not torch.allclose(out[0][~keep[0]], out[1][~keep[1]], atol=1e-3)  # each image its own noise
    # guidance != 1 and another sampler: the same guarantee
    out2 = pipe.generate(["", ""], settings=SampleSettings("dpm++2m", 2, guidance=2.0), known=(img, mask),
                         progress=False)
    assert torch.equal(out2[keep], img[keep])


def test_an_all_ones_mask_is_plain_generation(pipe: TextToImagePipeline) -> None:
    img, _ = _images()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    s = SampleSettings("ddim", 3, guidance=1.0)
    plain = pipe.generate(["", ""], settings=s, latents=x_T, progress=False)
    all_new = pipe.generate(["", ""], settings=s, latents=x_T, known=(img, torch.ones(2, 1, 16, 16)), progress=False)
    torch.testing.assert_close(all_new, plain, rtol=0, atol=1e-6)
    assert not torch.allclose(plain, img, atol=1e-2)


def test_the_unet_sees_the_noised_encoding_of_the_known_image(pipe: TextToImagePipeline) -> None:
    """Known cells hold sqrt(abar_t) z0 + sqrt(1 - abar_t) x_T, z0 = posterior mean * scaling factor."""
    img, mask = _images(1)
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    rec = RecordingUNet(pipe.unet)
    original = pipe.unet
    pipe.unet = rec
    try:
        pipe.generate("", settings=SampleSettings("ddim", 3, guidance=1.0), latents=x_T, known=(img, mask),
                      progress=False)
    finally:
        pipe.unet = original
    with torch.no_grad():
        z0 = pipe.vae.encode(img).mean * 0.8
    abar = torch.as_tensor(pipe.diffusion.alphas_cumprod, dtype=torch.float64)
    cells = latent_mask(mask, (4, 4)).expand(1, 4, 4, 4).bool()
    assert 0 < int(cells.sum()) < cells.numel()
    assert len(rec.inputs) == 3
    for x_in, t in rec.inputs:
        a = abar[int(t[0])].item()
        want = a ** 0.5 * z0 + (1 - a) ** 0.5 * x_T
        torch.testing.assert_close(x_in[~cells], want[~cells], rtol=1e-4, atol=1e-5)
