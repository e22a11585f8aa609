"""unCLIP inference (Ramesh et al. 2022): caption -> CLIP text embedding -> prior -> CLIP image embedding ->
decoder (32x32) -> diffusion upsampler (64x64); also image variations (encode an image, decode with new noise)
and interpolations (slerp between two images' embeddings, decoded with the same noise).

The prior and the decoder checkpoints each carry the frozen CLIP they were trained on (clip.safetensors) and its
fingerprint; a prior and a decoder made on different CLIPs live in different embedding spaces, so loading such a
pair is refused by name. Every image draws its noise from (seed, its index), so an image does not depend on the
batch it was made in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..diffusion import GaussianDiffusion
from ..nets.clip import scale_embedding
from ..samplers import SAMPLERS, ClassifierFreeGuidance, default_spacing
from ..samplers.common import ImageGenerators
from ..samplers.editing import slerp
from .base import pick_device, sampling_autocast

DEFAULT_PRIOR = "unclip_prior"
DEFAULT_DECODER = "unclip_decoder"
DEFAULT_UPSAMPLER = "unclip_upsampler"


@dataclass
class UnclipSettings:
    """Steps and guidance of each stage (defaults: what docs/results/unclip.md measured)."""

    prior_steps: int = 25
    prior_guidance: float = 2.0
    prior_candidates: int = 2  # the paper's trick: draw this many embeddings, keep the one nearest the caption
    decoder_steps: int = 25
    decoder_guidance: float = 3.0
    upsampler_steps: int = 50
    sampler: str = "ddim"  # the prior's and the decoder's
    # ancestral steps for the upsampler: DDIM leaves residual noise in this briefly trained model's outputs
    # (32.1 dB PSNR at 25 DDIM steps against 35.4 dB for 50 ancestral steps on 500 held-out scenes,
    # docs/results/unclip.md)
    upsampler_sampler: str = "ddpm"

    def __post_init__(self) -> None:
        flags = {"prior_candidates": "candidates"}  # the CLI's flag names, for the messages
        for name in ("prior_steps", "decoder_steps", "upsampler_steps", "prior_candidates"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{flags.get(name, name.replace('_', '-'))}={v!r}: must be a whole number >= 1")
        for name in ("prior_guidance", "decoder_guidance"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: must be >= 0")
        for sampler in (self.sampler, self.upsampler_sampler):
            if sampler not in SAMPLERS:
                raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")


def chain(diffusion: GaussianDiffusion, sampler: str, steps: int) -> GaussianDiffusion:
    spacing = default_spacing(sampler, steps, diffusion.num_steps)
    return diffusion.respace(spacing) if spacing else diffusion


def _guided(net: Any, guidance: float, null: dict[str, Any]) -> Any:
    return net if guidance == 1.0 else ClassifierFreeGuidance(net, guidance, null)


def _run(d: GaussianDiffusion, fn: Any, x_T: Tensor, cond: dict[str, Any], gens: ImageGenerators, sampler: str,
         clip_denoised: bool) -> Tensor:
    kwargs: dict[str, Any] = {"eta": 0.0} if sampler == "ddim" else {}
    return SAMPLERS[sampler](d, fn, x_T, cond=cond, generator=gens, clip_denoised=clip_denoised, **kwargs)


@torch.no_grad()
def decode_embeddings(net: Any, diffusion: GaussianDiffusion, image_embed: Tensor, *, seed: int = 0,
                      guidance: float = 3.0, steps: int = 25, sampler: str = "ddim",
                      context: tuple[Tensor, Tensor] | None = None, null_context: dict[str, Tensor] | None = None,
                      first_index: int = 0, x_T: Tensor | None = None) -> Tensor:
    """The decoder: scaled CLIP image embeddings (B, E) (zeros = no embedding) -> images (B, C, H, W) in [-1, 1].

    `context` (tokens (B, L, D), mask (B, L)) is the caption for a decoder trained with captions, `null_context`
    the empty caption's {"context", "context_mask"} (1, ...). Guidance pushes away from the all-null prediction
    (zero embedding and empty caption). Image i's noise comes from (seed, first_index + i) unless x_T is given."""
    m = net.cfg
    dev = next(net.parameters()).device
    b = image_embed.shape[0]
    gens = ImageGenerators.for_images(seed, range(first_index, first_index + b))
    if x_T is None:
        x_T = gens.randn(m.out_channels, m.image_size, m.image_size)
    cond: dict[str, Any] = {"image_embed": image_embed.to(dev).float()}
    null: dict[str, Any] = {"image_embed": torch.zeros(1, image_embed.shape[1], device=dev)}
    if m.context_dim is not None and null_context is not None:  # a caption decoder (with or without embed_tokens)
        tokens, mask = context if context is not None else (null_context["context"].expand(b, -1, -1),
                                                            null_context["context_mask"].expand(b, -1))
        cond.update(context=tokens.to(dev).float(), context_mask=mask.to(dev))
        null.update(context=null_context["context"].to(dev).float(), context_mask=null_context["context_mask"].to(dev))
    d = chain(diffusion, sampler, steps)
    return _run(d, _guided(net, guidance, null), x_T.to(dev), cond, gens, sampler, True).float().cpu()


@torch.no_grad()
def upsample_images(net: Any, diffusion: GaussianDiffusion, cfg: Any, low: Tensor, *, steps: int = 50,
                    sampler: str = "ddpm", seed: int = 0, first_index: int = 0) -> Tensor:
    """A super-resolution model (config `cfg`, task superres): low-resolution images (N, C, h, w) in [-1, 1] ->
    (N, C, scale*h, scale*w), conditioned exactly as in training without the augmentation. Image i's noise comes
    from (seed + 1, first_index + i): another stream than the decoder's, which draws from (seed, i)."""
    from ..conditioning.concat import restore
    from ..tasks.superres import superres_condition

    dev = next(net.parameters()).device
    size = cfg.model.image_size
    cond_image, mask = superres_condition(low.float(), cfg.task.scale, (size, size))
    cond = {"cond_image": cond_image.to(dev), "mask": mask.to(dev)}
    gens = ImageGenerators.for_images(seed + 1, range(first_index, first_index + low.shape[0]))
    x_T = gens.randn(cfg.model.out_channels, size, size).to(dev)
    out = restore(chain(diffusion, sampler, steps), net, cond, x_T, sampler=sampler, generator=gens)
    return out.float().clamp(-1, 1).cpu()


class UnclipPipeline:
    """The whole unCLIP system from its checkpoints; see the module docstring. Build with `from_pretrained`."""

    def __init__(self, prior: Any | None, decoder: Any, upsampler: Any | None, device: str | torch.device = "auto",
                 bf16: bool = False) -> None:
        from ..conditioning.text import TextEncoder

        self.device = pick_device(device)
        self.bf16 = bf16  # autocast around the prior, decoder and upsampler networks; CLIP and text encoder in fp32
        self.prior, self.decoder, self.upsampler = prior, decoder, upsampler
        du = decoder.config.unclip
        if du is None or decoder.config.objective != "diffusion":
            raise ValueError(f"{decoder.path} is not an unCLIP decoder (its config has no unclip section)")
        if prior is not None:
            pu = prior.config.unclip
            if pu is None or prior.config.objective != "prior":
                raise ValueError(f"{prior.path} is not an unCLIP prior (objective={prior.config.objective})")
            if pu.clip_fingerprint != du.clip_fingerprint:
                raise ValueError(f"the prior {prior.path} and the decoder {decoder.path} were trained on different "
                                 f"CLIPs (fingerprints {pu.clip_fingerprint} and {du.clip_fingerprint}): their "
                                 "embeddings do not match; train both on one CLIP (unclip.clip)")
            self.prior_net = prior.model.to(self.device).eval()
            self.prior_diffusion = GaussianDiffusion.from_config(prior.config.diffusion)
        from ..training.unclip import frozen_clip

        self.clip = frozen_clip(decoder.path, du).to(self.device)
        self.text_encoder = TextEncoder(du.text).to(self.device)
        self.decoder_net = decoder.model.to(self.device).eval()
        self.decoder_diffusion = GaussianDiffusion.from_config(decoder.config.diffusion)
        self.decoder_captions = bool(du.caption)
        self._null: dict[str, Tensor] = {}
        if upsampler is not None:
            _check_upsampler(upsampler, decoder)
            self.upsampler_net = upsampler.model.to(self.device).eval()
            self.upsampler_diffusion = GaussianDiffusion.from_config(upsampler.config.diffusion)

    @classmethod
    def from_pretrained(cls, prior: str | Path | None = DEFAULT_PRIOR, decoder: str | Path = DEFAULT_DECODER,
                        upsampler: str | Path | None = DEFAULT_UPSAMPLER, *, device: str | torch.device = "auto",
                        ema: bool = True, bf16: bool = False) -> "UnclipPipeline":
        """Shipped names, run folders or checkpoints of each stage (prior None: variations and interpolations
        only; upsampler None: stop at the decoder's size)."""
        from ..training.checkpoint import load_model, resolve_checkpoint
        from .base import resolve_model_path

        def load(spec: str | Path, what: str) -> Any:
            try:
                path = resolve_model_path(spec)
            except FileNotFoundError:
                raise FileNotFoundError(f"--{what} {spec}: no such folder or shipped model") from None
            return load_model(resolve_checkpoint(path), ema=ema)

        return cls(load(prior, "prior") if prior is not None else None, load(decoder, "decoder"),
                   load(upsampler, "upsampler") if upsampler is not None else None, device, bf16)

    # ------------------------------------------------------------------ embeddings
    @property
    def image_size(self) -> int:
        return int(self.clip.cfg.image_size)

    def _text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        for c in captions:
            if not isinstance(c, str):
                raise ValueError(f"captions must be strings, got {type(c).__name__}")
        emb = self.text_encoder.encode(captions)
        return emb.tokens.to(self.device), emb.mask.to(self.device)

    def null(self) -> dict[str, Tensor]:
        if not self._null:
            tokens, mask = self._text([""])
            self._null = {"context": tokens, "context_mask": mask,
                          "text_embed": scale_embedding(self.clip.encode_text(tokens, mask))}
        return self._null

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str]) -> Tensor:
        """Captions -> scaled CLIP text embeddings (N, E)."""
        tokens, mask = self._text(list(captions))
        return scale_embedding(self.clip.encode_text(tokens, mask))

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """Images (N, C, S, S) in [-1, 1] at the CLIP's size -> scaled CLIP image embeddings (N, E)."""
        s = self.image_size
        if images.ndim != 4 or images.shape[-2:] != (s, s):
            raise ValueError(f"images must be (N, C, {s}, {s}) for this CLIP, got {tuple(images.shape)}")
        return scale_embedding(self.clip.encode_image(images.to(self.device).float()))

    @torch.no_grad()
    def sample_prior(self, captions: Sequence[str], settings: UnclipSettings | None = None, *, seed: int = 0,
                     first_index: int = 0) -> Tensor:
        """Captions -> scaled CLIP image embeddings (N, E) drawn from the prior (guided; best of
        `prior_candidates` by similarity with the caption's text embedding)."""
        s = settings or UnclipSettings()
        captions = list(captions)
        tokens, mask = self._text(captions)
        text_emb = scale_embedding(self.clip.encode_text(tokens, mask))
        null = self.null()
        k, n, e = s.prior_candidates, len(captions), text_emb.shape[1]
        if self.prior is None:
            raise ValueError("no prior loaded: captions need one (--prior)")
        # candidate j of image i draws from (seed + 1000003 j, i): the first candidates do not depend on k
        gens = ImageGenerators([g for i in range(first_index, first_index + n) for j in range(k)
                                for g in ImageGenerators.for_images(seed + 1_000_003 * j, [i]).generators])
        rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731
        cond = {"text_embed": rep(text_emb), "context": rep(tokens), "context_mask": rep(mask)}
        fn = _guided(self.prior_net, s.prior_guidance, {key: null[key] for key in cond})
        d = chain(self.prior_diffusion, s.sampler, s.prior_steps)
        with sampling_autocast(self.device, self.bf16):
            z = _run(d, fn, gens.randn(e).to(self.device), cond, gens, s.sampler, False)
        z = scale_embedding(z.float()).reshape(n, k, e)
        best = (z * text_emb[:, None]).sum(-1).argmax(1)  # (N,)
        return z[torch.arange(n), best]

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def decode(self, image_embed: Tensor, captions: Sequence[str] | None = None,
               settings: UnclipSettings | None = None, *, seed: int = 0, x_T: Tensor | None = None,
               upsample: bool = True, first_index: int = 0) -> Tensor:
        """Embeddings (N, E) (and, for a caption-conditioned decoder, the captions) -> images in [-1, 1]:
        (N, 3, 64, 64) through the upsampler, else at the decoder's size."""
        s = settings or UnclipSettings()
        context = None
        null = self.null() if self.decoder_captions else None
        if captions is not None and self.decoder_captions:
            context = self._text(list(captions))
        with sampling_autocast(self.device, self.bf16):
            x = decode_embeddings(self.decoder_net, self.decoder_diffusion, image_embed, seed=seed,
                                  guidance=s.decoder_guidance, steps=s.decoder_steps, sampler=s.sampler,
                                  context=context, null_context=null, first_index=first_index, x_T=x_T)
        if upsample and self.upsampler is not None:
            x = self.upsample(x, s, seed=seed, first_index=first_index)
        return x

    @torch.no_grad()
    def upsample(self, low: Tensor, settings: UnclipSettings | None = None, *, seed: int = 0,
                 first_index: int = 0) -> Tensor:
        """Low-resolution images (N, C, h, w) -> (N, C, scale*h, scale*w) with the diffusion upsampler."""
        if self.upsampler is None:
            raise ValueError("no upsampler loaded")
        s = settings or UnclipSettings()
        with sampling_autocast(self.device, self.bf16):
            return upsample_images(self.upsampler_net, self.upsampler_diffusion, self.upsampler.config, low,
                                   steps=s.upsampler_steps, sampler=s.upsampler_sampler, seed=seed,
                                   first_index=first_index)

    def generate(self, captions: Sequence[str], settings: UnclipSettings | None = None, *, seed: int = 0,
                 upsample: bool = True, progress: bool = True, batch_size: int = 16) -> Tensor:
        """Captions -> images: prior -> decoder (caption too, if it takes one) -> upsampler."""
        import sys

        from tqdm.auto import tqdm

        captions = list(captions)
        if not captions:
            raise ValueError("no captions given: pass one or more")
        out = []
        with tqdm(total=len(captions), desc="unCLIP: prior -> decoder -> upsampler", unit="img", disable=not progress,
                  dynamic_ncols=True, file=sys.stderr) as bar:
            for start in range(0, len(captions), batch_size):
                part = captions[start:start + batch_size]
                emb = self.sample_prior(part, settings, seed=seed, first_index=start)
                out.append(self.decode(emb, part, settings, seed=seed, upsample=upsample, first_index=start))
                bar.update(len(part))
        return torch.cat(out)

    def variations(self, image: Tensor, n: int, settings: UnclipSettings | None = None, *, seed: int = 0,
                   upsample: bool = True) -> Tensor:
        """One image (1, C, S, S) -> n images decoded from its CLIP embedding with different noise (no caption)."""
        emb = self.image_embeddings(image).expand(n, -1)
        return self.decode(emb, None, settings, seed=seed, upsample=upsample)

    def interpolate(self, a: Tensor, b: Tensor, n: int, settings: UnclipSettings | None = None, *, seed: int = 0,
                    upsample: bool = True) -> Tensor:
        """Two images (1, C, S, S) -> n images along the slerp between their CLIP embeddings, all decoded from
        the same starting noise (the paper's Fig. 4 with its noise held fixed; the whole path is then deterministic
        with DDIM, the default; stochastic samplers and the upsampler draw each image's later noise from its
        index)."""
        if n < 2:
            raise ValueError(f"--steps-between / n={n}: an interpolation needs at least 2 images")
        ea, eb = self.image_embeddings(a), self.image_embeddings(b)
        lams = torch.linspace(0, 1, n)
        emb = torch.cat([scale_embedding(slerp(ea, eb, float(lam))) for lam in lams])
        m = self.decoder_net.cfg
        noise = ImageGenerators.for_images(seed, [0]).randn(m.out_channels, m.image_size, m.image_size)
        return self.decode(emb, None, settings, seed=seed, x_T=noise.expand(n, -1, -1, -1), upsample=upsample)


def _check_upsampler(upsampler: Any, decoder: Any) -> None:
    cfg = upsampler.config
    if cfg.task is None or cfg.task.name != "superres":
        raise ValueError(f"{upsampler.path} is not a super-resolution model (task "
                         f"{cfg.task.name if cfg.task else None}); give one trained with task.name=superres")
    low = cfg.model.image_size // cfg.task.scale
    if low != decoder.config.model.image_size:
        raise ValueError(f"the upsampler {upsampler.path} takes {low}x{low} images but the decoder {decoder.path} "
                         f"makes {decoder.config.model.image_size}x{decoder.config.model.image_size}")
