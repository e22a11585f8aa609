"""unCLIP's tables on the shapes scenes (docs/results/unclip.md):

    python benchmarks/unclip_tables.py retrieval --num 1000    # the CLIP: retrieval R@1 / R@5 on held-out pairs
    python benchmarks/unclip_tables.py ablation --num 1000     # decoder conditioning (a) / (b) / (c): alignment,
                                                               # CLIP score, FID; + the whole pipeline at 64 px
    python benchmarks/unclip_tables.py reference --num 1000    # the same measures on the real held-out images
    python benchmarks/unclip_tables.py variations --num 1000   # embedding round trip: attributes kept
    python benchmarks/unclip_tables.py upsampler --num 1000    # 32 -> 64 on real images vs bicubic
    python benchmarks/unclip_tables.py grids                   # captions, variations, interpolations

Held-out data: the shapes *test* split (a stream disjoint from training). Alignment: the first `--num` one-object
test captions (metrics.attributes.heldout_prompts); the shipped attribute classifier reads shape, colour, size,
position and background off each image, accuracy = share of images showing the attribute the caption names.
CLIP score: 100 x cos(our CLIP's image embedding of the output, its text embedding of the caption). FID: the
attribute net's and the shapes net's features against 10,000 one-object training scenes rendered at the output
size. The ablation is the paper's Fig. 8 (its "caption" / "text embedding" / "prior image embedding" rows): the
same decoder, always given the caption, with (a) no image embedding (the null), (b) the CLIP *text* embedding in
the image-embedding slot, (c) an image embedding drawn from the prior; plus (d) the real held-out image's own
CLIP embedding (an upper bound no text-to-image system has).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latent_tables import Scorer, _machine, _write  # noqa: E402  (one FID / alignment scorer for both systems)

from pakhsh.data.builtin.shapes import ShapesDataset  # noqa: E402
from pakhsh.imageio import save_grid  # noqa: E402
from pakhsh.metrics.attributes import ATTRIBUTES, CHANCE, heldout_prompts, render_one_object  # noqa: E402
from pakhsh.metrics.retrieval import clip_score, retrieval_recall  # noqa: E402
from pakhsh.pipelines.unclip import UnclipPipeline, UnclipSettings  # noqa: E402

ROWS = {"a": "(a) caption only", "b": "(b) caption + CLIP text embedding", "c": "(c) caption + prior image embedding",
        "d": "(d) caption + the real image's embedding (upper bound)"}


def _pipe(args: argparse.Namespace, upsampler: bool = False) -> UnclipPipeline:
    return UnclipPipeline.from_pretrained(args.prior, args.decoder, args.upsampler if upsampler else None,
                                          device=args.device)


class _ClipOnly:
    """A CLIP run / shipped CLIP with the pipeline's embedding methods (retrieval needs no prior or decoder)."""

    def __init__(self, spec: str) -> None:
        from pakhsh.conditioning.text import TextEncoder
        from pakhsh.training.unclip import load_clip

        self.clip, cfg, _ = load_clip(spec)
        self.text_encoder = TextEncoder(cfg.condition.text)
        self.image_size = self.clip.cfg.image_size

    @torch.no_grad()
    def image_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x.float())

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        emb = self.text_encoder.encode(list(captions))
        return self.clip.encode_text(emb.tokens, emb.mask)


def _settings(args: argparse.Namespace) -> UnclipSettings:
    return UnclipSettings(args.prior_steps, args.prior_guidance, args.candidates, args.steps, args.guidance,
                          args.upsampler_steps, upsampler_sampler=args.upsampler_sampler)


def _batched(fn, n: int, batch: int) -> torch.Tensor:
    return torch.cat([fn(slice(i, min(i + batch, n))) for i in range(0, n, batch)])


def _scores(pipe: UnclipPipeline, scorer: Scorer, x: torch.Tensor, captions: list[str], targets: list[dict]) -> dict:
    img = _batched(lambda s: pipe.image_embeddings(_clip_size(x[s], pipe.image_size)), len(x), 250)
    txt = _batched(lambda s: pipe.text_embeddings(captions[s]), len(x), 250)
    return {**scorer.alignment(x, targets), "clip_score": clip_score(img, txt), **scorer.fid(x)}


def _clip_size(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=True)


# ---------------------------------------------------------------------------------------------- retrieval
def cmd_retrieval(args: argparse.Namespace) -> int:
    out = Path(args.out)
    pipe = _ClipOnly(args.clip)
    ds = ShapesDataset(split="test", size=pipe.image_size, length=args.num)
    items = [ds[i] for i in range(args.num)]
    x = torch.stack([it["image"] for it in items])
    caps = [it["caption"] for it in items]
    one = [i for i, it in enumerate(items) if it["num_objects"] == 1]
    img = _batched(lambda s: pipe.image_embeddings(x[s]), len(x), 250)
    txt = _batched(lambda s: pipe.text_embeddings(caps[s]), len(x), 250)
    rows = [{"set": "all test scenes (1 or 2 objects)", "n": len(x), **retrieval_recall(img, txt, (1, 5)),
             "clip_score": clip_score(img, txt)},
            {"set": "one-object test scenes among them", "n": len(one),
             **retrieval_recall(img[one], txt[one], (1, 5)), "clip_score": clip_score(img[one], txt[one])}]
    shuffled = clip_score(img, txt.roll(1, 0))
    zero_shot = _zero_shot(pipe, args.zero_shot_num)
    md = [f"Retrieval by the CLIP {args.clip} on the first {args.num} shapes test scenes (held out: never seen in "
          "training), "
          "each caption against every image of the set and back. Chance R@k = k / n.", "",
          "| set | n | text->image R@1 | R@5 | image->text R@1 | R@5 | chance R@1 / R@5 | CLIP score |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['set']} | {r['n']} | {r['t2i_R@1']:.3f} | {r['t2i_R@5']:.3f} | {r['i2t_R@1']:.3f} | "
                  f"{r['i2t_R@5']:.3f} | {1 / r['n']:.4f} / {5 / r['n']:.4f} | {r['clip_score']:.1f} |")
    md += ["", f"CLIP score of mismatched pairs (captions shifted by one): {shuffled:.1f}.", "",
           f"Zero-shot attribute classification on the first {args.zero_shot_num} one-object test scenes: each image "
           "against its caption with one attribute set to every value it can take (a colour equal to the "
           "background skipped); accuracy = the true caption scores highest.", "",
           "| " + " | ".join(ATTRIBUTES) + " |", "|---" * len(ATTRIBUTES) + "|",
           "| " + " | ".join(f"{zero_shot[a]:.3f}" for a in ATTRIBUTES) + " |"]
    _write(out, "retrieval", {"num": args.num, "machine": _machine(), "rows": rows, "clip_score_shuffled": shuffled,
                              "zero_shot": zero_shot}, "\n".join(md) + "\n")
    return 0


def _zero_shot(pipe: "_ClipOnly", n: int) -> dict[str, float]:
    """Per attribute: the share of one-object test images whose own caption beats every caption that differs from
    it in that attribute alone."""
    from pakhsh.metrics.attributes import caption_for

    values = {"shape": 6, "color": 10, "size": 2, "position": 9, "background": 10}
    u8, target = render_one_object("test", n, pipe.image_size)
    img = pipe.image_embeddings(u8.float() / 127.5 - 1)
    out = {}
    for a in ATTRIBUTES:
        right = 0
        for i in range(n):
            base = dict(zip(ATTRIBUTES, target[i].tolist()))
            caps = [caption_for({**base, a: v}) for v in range(values[a])
                    if a not in ("color", "background") or {**base, a: v}["color"] != {**base, a: v}["background"]]
            txt = pipe.text_embeddings(caps)
            right += caps[int((img[i:i + 1] @ txt.t()).argmax())] == caption_for(base)
        out[a] = right / n
    return out


# ---------------------------------------------------------------------------------------------- ablation
def cmd_ablation(args: argparse.Namespace) -> int:
    out = Path(args.out)
    pipe = _pipe(args, upsampler=args.with_upsampler)
    s = _settings(args)
    scorer = Scorer(out, args.ref_n, size=pipe.image_size)
    held = heldout_prompts(args.num)
    caps, targets = [p for p, _ in held], [a for _, a in held]
    real_u8, _ = render_one_object("test", args.num, pipe.image_size)
    real = real_u8.float() / 127.5 - 1
    e = pipe.decoder_net.cfg.embed_dim
    embeds = {
        "a": lambda sl: torch.zeros(sl.stop - sl.start, e),
        "b": lambda sl: pipe.text_embeddings(caps[sl]),
        "c": lambda sl: pipe.sample_prior(caps[sl], s, seed=args.seed, first_index=sl.start),
        "d": lambda sl: pipe.image_embeddings(real[sl]),
    }
    rows, shown, full = [], [], None
    for key in args.rows:
        t = time.perf_counter()
        x = _batched(lambda sl: pipe.decode(embeds[key](sl), caps[sl], s, seed=args.seed, upsample=False,
                                            first_index=sl.start), args.num, args.batch_size)
        r = {"row": ROWS[key], "key": key, **_scores(pipe, scorer, x, caps, targets),
             "seconds": time.perf_counter() - t}
        rows.append(r)
        shown.append(x[:8])
        print(json.dumps(r), flush=True)
        if key == "c" and args.with_upsampler:
            t = time.perf_counter()
            up = _batched(lambda sl: pipe.upsample(x[sl], s, seed=args.seed, first_index=sl.start), args.num,
                          args.batch_size)
            full = {"row": "(c) at 64x64 through the upsampler", **_scores(pipe, Scorer(out, args.ref_n, 64), up,
                                                                          caps, targets),
                    "seconds": time.perf_counter() - t}
            print(json.dumps(full), flush=True)
            save_grid(up[:16], out / "pipeline_64.png", nrow=8, scale=2)
    save_grid(torch.stack(shown, 1).flatten(0, 1), out / "ablation_grid.png", nrow=len(shown), scale=3)
    md = [f"Decoder conditioning (the paper's Fig. 8): {args.num} held-out one-object captions, decoder guidance "
          f"{args.guidance:g}, {args.steps} DDIM steps per stage, prior guidance {args.prior_guidance:g} (best of "
          f"{args.candidates}), seed {args.seed}; {pipe.image_size}x{pipe.image_size} decoder outputs. Accuracy: "
          "share of images showing the attribute the caption names; chance in the last row.", "",
          "| conditioning | " + " | ".join(ATTRIBUTES) + " | mean | all five | CLIP score | FID (attr) | FID (shapes) |",
          "|---" * (len(ATTRIBUTES) + 6) + "|"]
    for r in rows + ([full] if full else []):
        md.append(f"| {r['row']} | " + " | ".join(f"{r[a]:.3f}" for a in ATTRIBUTES)
                  + f" | {r['mean']:.3f} | {r['all']:.3f} | {r['clip_score']:.1f} | {r['fid_attr']:.1f} | "
                    f"{r['fid_shapes']:.2f} |")
    md.append("| chance | " + " | ".join(f"{CHANCE[a]:.3f}" for a in ATTRIBUTES)
              + f" | {CHANCE['mean']:.3f} | {CHANCE['all']:.5f} | | | |")
    _write(out, "ablation", {"num": args.num, "settings": vars(s), "machine": _machine(), "rows": rows,
                             "pipeline_64": full}, "\n".join(md) + "\n")
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    """The ablation's measures on the real held-out images of its captions: how far the scorers themselves reach."""
    out = Path(args.out)
    pipe = _ClipOnly(args.clip)
    held = heldout_prompts(args.num)
    caps, targets = [p for p, _ in held], [a for _, a in held]
    real_u8, _ = render_one_object("test", args.num, pipe.image_size)
    real = real_u8.float() / 127.5 - 1
    r = {"row": "real held-out images", **_scores(pipe, Scorer(out, args.ref_n, size=pipe.image_size), real, caps,
                                                   targets)}
    md = [f"The ablation's measures on the {args.num} real held-out {pipe.image_size}x{pipe.image_size} images of its "
          "captions (what a perfect decoder would score).", "",
          "| images | " + " | ".join(ATTRIBUTES) + " | mean | all five | CLIP score | FID (attr) | FID (shapes) |",
          "|---" * (len(ATTRIBUTES) + 6) + "|",
          f"| {r['row']} | " + " | ".join(f"{r[a]:.3f}" for a in ATTRIBUTES)
          + f" | {r['mean']:.3f} | {r['all']:.3f} | {r['clip_score']:.1f} | {r['fid_attr']:.1f} | {r['fid_shapes']:.2f} |"]
    _write(out, "reference", {"num": args.num, "machine": _machine(), "row": r}, "\n".join(md) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- variations
def cmd_variations(args: argparse.Namespace) -> int:
    """Encode held-out images, decode one variation each (no caption): does the embedding carry the attributes?"""
    out = Path(args.out)
    pipe = _pipe(args)
    s = _settings(args)
    scorer = Scorer(out, args.ref_n, size=pipe.image_size)
    real_u8, target = render_one_object("test", args.num, pipe.image_size)
    real = real_u8.float() / 127.5 - 1
    targets = [dict(zip(ATTRIBUTES, t.tolist())) for t in target]
    x = _batched(lambda sl: pipe.decode(pipe.image_embeddings(real[sl]), None, s, seed=args.seed, upsample=False,
                                        first_index=sl.start), args.num, args.batch_size)
    own = scorer.alignment(x, targets)
    other = scorer.alignment(x, targets[1:] + targets[:1])  # the attributes of another image: the control
    src = _batched(lambda sl: pipe.image_embeddings(real[sl]), args.num, 250)
    var = _batched(lambda sl: pipe.image_embeddings(x[sl]), args.num, 250)
    cos_own = float(torch.nn.functional.cosine_similarity(src, var).mean())
    cos_other = float(torch.nn.functional.cosine_similarity(src.roll(1, 0), var).mean())
    md = [f"Embedding round trip: {args.num} held-out one-object test images -> CLIP image embedding -> decoder "
          f"(no caption, guidance {args.guidance:g}, {args.steps} DDIM steps) -> the attribute classifier. 'kept' = "
          "the variation shows the source image's attribute; 'another image' compares with the next image's "
          "attributes instead (what an embedding that carried nothing would score, up to chance).", "",
          "| | " + " | ".join(ATTRIBUTES) + " | mean | all five | CLIP image cosine to source |",
          "|---" * (len(ATTRIBUTES) + 4) + "|",
          "| kept (own source) | " + " | ".join(f"{own[a]:.3f}" for a in ATTRIBUTES)
          + f" | {own['mean']:.3f} | {own['all']:.3f} | {cos_own:.3f} |",
          "| another image's | " + " | ".join(f"{other[a]:.3f}" for a in ATTRIBUTES)
          + f" | {other['mean']:.3f} | {other['all']:.3f} | {cos_other:.3f} |",
          "| chance | " + " | ".join(f"{CHANCE[a]:.3f}" for a in ATTRIBUTES) + f" | {CHANCE['mean']:.3f} | "
          f"{CHANCE['all']:.5f} | |"]
    _write(out, "variations", {"num": args.num, "machine": _machine(), "kept": own, "another": other,
                               "cos_own": cos_own, "cos_other": cos_other}, "\n".join(md) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- upsampler
def cmd_upsampler(args: argparse.Namespace) -> int:
    """The upsampler alone on real images: 64x64 held-out scenes -> area-downsampled to 32 -> upsampled back;
    PSNR / SSIM / FID against the originals, next to bicubic and nearest upsampling of the same inputs."""
    from pakhsh.diffusion import GaussianDiffusion
    from pakhsh.metrics.restoration import psnr, ssim
    from pakhsh.pipelines.base import resolve_model_path
    from pakhsh.pipelines.unclip import upsample_images
    from pakhsh.tasks import area_downsample
    from pakhsh.training.checkpoint import load_model, resolve_checkpoint

    out = Path(args.out)
    loaded = load_model(resolve_checkpoint(resolve_model_path(args.upsampler)))
    size, scale = loaded.config.model.image_size, loaded.config.task.scale
    ds = ShapesDataset(split="test", size=size, length=args.num)
    x = torch.stack([ds[i]["image"] for i in range(args.num)])
    low = area_downsample(x, scale)
    diffusion = GaussianDiffusion.from_config(loaded.config.diffusion)
    scorer = Scorer(out, args.ref_n, size=size)
    rows, first = [], None
    for spec in args.samplers:
        sampler, steps = spec.split(":")
        t = time.perf_counter()
        up = _batched(lambda sl: upsample_images(loaded.model.eval(), diffusion, loaded.config, low[sl],
                                                 steps=int(steps), sampler=sampler, seed=args.seed,
                                                 first_index=sl.start), args.num, args.batch_size)
        first = up if first is None else first
        rows.append({"method": f"diffusion upsampler, {sampler} {steps} steps", "psnr": psnr(up, x),
                     "ssim": ssim(up, x), **scorer.fid(up), "ms_per_image": 1000 * (time.perf_counter() - t) / args.num})
        print(json.dumps(rows[-1]), flush=True)
    for name, y in (("bicubic", torch.nn.functional.interpolate(low, scale_factor=scale, mode="bicubic",
                                                                align_corners=False).clamp(-1, 1)),
                    ("nearest", torch.nn.functional.interpolate(low, scale_factor=scale, mode="nearest"))):
        rows.append({"method": name, "psnr": psnr(y, x), "ssim": ssim(y, x), **scorer.fid(y), "ms_per_image": None})
        print(json.dumps(rows[-1]), flush=True)
    shown = (torch.nn.functional.interpolate(low[:8], scale_factor=scale, mode="nearest"), first[:8], x[:8])
    save_grid(torch.stack(shown, 1).flatten(0, 1), out / "upsampler.png", nrow=6, scale=2)  # [input | output | real]
    md = [f"The upsampler {args.upsampler} on {args.num} held-out {size}x{size} test scenes, area-downsampled to "
          f"{size // scale}x{size // scale} and brought back; FID against 10,000 one-object training scenes at the "
          "same size; ms / image on one core of this CPU.", "",
          "| method | PSNR (dB) | SSIM | FID (attr) | FID (shapes) | ms / image |", "|---|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['fid_attr']:.1f} | {r['fid_shapes']:.2f} | "
           f"{'' if r['ms_per_image'] is None else round(r['ms_per_image'])} |" for r in rows]
    _write(out, "upsampler", {"num": args.num, "machine": _machine(), "rows": rows}, "\n".join(md) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- grids
def cmd_grids(args: argparse.Namespace) -> int:
    out = Path(args.out)
    pipe = _pipe(args, upsampler=True)
    s = _settings(args)
    k = args.seeds
    caps = [p for p, _ in heldout_prompts(6)] + ["a small green star at the bottom right and a large yellow "
                                                  "square at the top left on a blue background"]
    x = pipe.generate([c for c in caps for _ in range(k)], s, seed=args.seed, progress=False)
    save_grid(x, out / "captions.png", nrow=k, scale=2)
    (out / "captions.txt").write_text("\n".join(caps) + "\n")
    ds = ShapesDataset(split="test", size=pipe.image_size, length=16)
    real = torch.stack([ds[i]["image"] for i in range(16)])
    rows = []
    for i in range(6):
        v = pipe.variations(real[i:i + 1], k, s, seed=args.seed)
        rows.append(torch.cat([torch.nn.functional.interpolate(real[i:i + 1], size=v.shape[-2:], mode="nearest"), v]))
    save_grid(torch.cat(rows), out / "variations.png", nrow=k + 1, scale=2)
    strips = []
    for a, b in ((6, 7), (8, 9), (10, 11), (12, 13)):
        v = pipe.interpolate(real[a:a + 1], real[b:b + 1], args.between, s, seed=args.seed)
        ends = torch.nn.functional.interpolate(real[[a, b]], size=v.shape[-2:], mode="nearest")
        strips.append(torch.cat([ends[:1], v, ends[1:]]))
    save_grid(torch.cat(strips), out / "interpolations.png", nrow=args.between + 2, scale=2)
    print(f"wrote captions.png, variations.png, interpolations.png to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="docs/results/unclip")
    common.add_argument("--num", type=int, default=1000)
    common.add_argument("--prior", default="unclip_prior")
    common.add_argument("--decoder", default="unclip_decoder")
    common.add_argument("--upsampler", default="unclip_upsampler")
    common.add_argument("--steps", type=int, default=25, help="DDIM steps of the decoder")
    common.add_argument("--upsampler-steps", type=int, default=50)
    common.add_argument("--upsampler-sampler", default="ddpm")
    common.add_argument("--prior-steps", type=int, default=25)
    common.add_argument("--guidance", type=float, default=3.0, help="decoder guidance")
    common.add_argument("--prior-guidance", type=float, default=2.0)
    common.add_argument("--candidates", type=int, default=2)
    common.add_argument("--batch-size", type=int, default=100)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--device", default="cpu")
    common.add_argument("--ref-n", type=int, default=10_000, help="one-object training scenes for the FID reference")
    r = sub.add_parser("retrieval", parents=[common])
    r.add_argument("--clip", default="unclip_clip", help="shipped CLIP, CLIP run or checkpoint")
    r.add_argument("--zero-shot-num", type=int, default=200, help="one-object scenes for zero-shot attributes")
    a = sub.add_parser("ablation", parents=[common])
    a.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    a.add_argument("--with-upsampler", action="store_true", help="also row (c) through the upsampler at 64x64")
    sub.add_parser("variations", parents=[common])
    f = sub.add_parser("reference", parents=[common])
    f.add_argument("--clip", default="unclip_clip", help="shipped CLIP, CLIP run or checkpoint")
    u = sub.add_parser("upsampler", parents=[common])
    u.add_argument("--samplers", nargs="+", default=["ddpm:50", "ddim:25", "dpm++2m:20"], help="SAMPLER:STEPS each")
    g = sub.add_parser("grids", parents=[common])
    g.add_argument("--seeds", type=int, default=6)
    g.add_argument("--between", type=int, default=8)
    args = p.parse_args(argv)
    return {"retrieval": cmd_retrieval, "ablation": cmd_ablation, "reference": cmd_reference,
            "variations": cmd_variations,
            "upsampler": cmd_upsampler, "grids": cmd_grids}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
