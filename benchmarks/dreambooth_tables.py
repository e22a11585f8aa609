"""DreamBooth's tables on the built-in demo subject (docs/results/dreambooth.md):

    python benchmarks/dreambooth_tables.py train --out runs/dreambooth_tables   # full / LoRA x with / without prior
    python benchmarks/dreambooth_tables.py eval --runs runs/dreambooth_tables --out docs/results/dreambooth

`train` runs `pakhsh dreambooth --subject demo` on the shipped t2i four times: full fine-tuning and LoRA (rank 4),
each with prior preservation (lambda = 1, 100 class images of "a star") and without (lambda = 0). `eval` scores
them and the base (with the identifier left out of its prompts) on fixed prompt sets, seeds 0..S-1 per prompt,
guidance 3, 25 DDIM steps:

- subject fidelity on recontextualisation prompts (new position and background): the DINO analogue (cosine
  similarity of the built-in shapes feature net's embeddings) and CLIP-I (cosine similarity of the unCLIP CLIP's
  image embeddings), each the mean over (generated, real subject image) pairs. Whole images, as the paper, and
  32x32 crops around the object (the grid cell the prompt / the subject image names), which leave the
  background out;
- prompt fidelity: CLIP-T (CLIP score of the image and the prompt with the identifier removed: our CLIP never saw
  the token) and the attribute net's accuracy on what the prompt names: position and background
  (recontextualisation), size and colour (property changes), and "star";
- prior preservation: 200 images of the plain class prompt "a star" per model (seed 1; the class images were seed
  0): their diversity (mean pairwise cosine distance of attribute-net features, distinct backgrounds), their FID
  (attribute-net features) against 200 of the base's own "a star" images (seed 2), how much they look like the
  subject (CLIP-I and DINO* of a crop around the object, at the cell the attribute net reads off each image, to the
  subject's crops) and the attribute accuracy on 64 held-out star captions of the shapes test split
  (language drift);
- grids: subject images | new contexts | property changes | failure cases, and "a star" before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latent_tables import _machine, _write  # noqa: E402

from pakhsh.data.builtin.shapes import _GRID, _POSITION_PHRASES, COLOR_NAMES, POSITIONS, SIZES  # noqa: E402
from pakhsh.data.builtin.subject import DEMO_PLACES, demo_subject  # noqa: E402
from pakhsh.evaluation import FEATNETS  # noqa: E402
from pakhsh.imageio import save_grid  # noqa: E402
from pakhsh.metrics.attributes import heldout_prompts, load_attribute_net, predict_attributes  # noqa: E402
from pakhsh.metrics.featnet import load_feature_net  # noqa: E402
from pakhsh.metrics.fid import compute_statistics, frechet_distance  # noqa: E402
from pakhsh.metrics.retrieval import clip_score  # noqa: E402
from pakhsh.pipelines import SampleSettings  # noqa: E402
from pakhsh.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

TOKEN = "sks"
RUNS = {"full_prior": [], "full_noprior": ["--prior-weight", "0"], "lora_prior": ["--lora", "4"],
        "lora_noprior": ["--lora", "4", "--prior-weight", "0"], "full_prior_token": ["--train-token"]}
LABELS = {"base": "base t2i (no token)", "full_prior": "full, prior", "full_noprior": "full, no prior",
          "lora_prior": "LoRA r4, prior", "lora_noprior": "LoRA r4, no prior",
          "full_prior_token": "full + token embedding, prior", "real": "the 4 subject images (reference)"}
# new contexts: cells and backgrounds the subject images never show together (none of them shows these cells)
RECONTEXT = [("bottom right", "red"), ("top", "cyan"), ("top right", "orange"), ("left", "black"),
             ("bottom", "gray"), ("bottom right", "white"), ("top", "purple"), ("left", "green")]
# property changes: size and colour words on the subject, each at a new place
PROPERTY = [("small", None, "bottom right", "red"), ("small", None, "top", "cyan"), ("small", None, "left", "black"),
            ("small", None, "bottom", "gray"), (None, "red", "top right", "gray"), (None, "green", "bottom", "white"),
            (None, "purple", "left", "orange"), (None, "white", "top", "black")]
# failure cases worth showing: a background the colour of one half; two subjects; an unseen word order
FAILURES = ["a {t} star at the bottom right on a blue background", "a {t} star at the top on a yellow background",
            "a {t} star at the top left and a {t} star at the bottom right on a gray background",
            "a red circle at the top left and a {t} star at the bottom right on a white background"]


def phrase(position: str) -> str:
    return _POSITION_PHRASES[POSITIONS.index(position)]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(position: str, background: str, size: str | None = None, color: str | None = None,
            token: str | None = TOKEN) -> str:
    words = [w for w in (size, color, token, "star") if w]
    return f"a {' '.join(words)} {phrase(position)} on {article(background)} {background} background"


def untokened(prompt: str) -> str:
    return " ".join(w for w in prompt.split() if w != TOKEN)


# ---------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from pakhsh.cli import main

    out = Path(args.out)
    for name, flags in RUNS.items():
        run = out / name
        if (run / "checkpoints" / "LATEST").is_file() and not args.overwrite:
            print(f"{run}: done already (--overwrite to redo)")
            continue
        t = time.perf_counter()
        argv = ["dreambooth", "--subject", "demo", "--out", str(run), "-m", args.model, "--steps", str(args.steps),
                *flags, *(["--overwrite"] if args.overwrite else []), "-q"]
        code = main(argv)
        if code:
            return code
        (run / "wall_seconds.txt").write_text(f"{time.perf_counter() - t:.1f}\n")
    return 0


# ---------------------------------------------------------------------------------------------- scoring
class Judge:
    """The feature nets that score images: shapes net (DINO analogue), attribute net, unCLIP's CLIP."""

    def __init__(self) -> None:
        from pakhsh.conditioning.text import TextEncoder
        from pakhsh.training.unclip import load_clip

        self.shapes = load_feature_net(FEATNETS / "shapes").eval()
        self.attr = load_attribute_net()
        self.clip, cfg, _ = load_clip("unclip_clip")
        self.text = TextEncoder(cfg.condition.text)

    @torch.no_grad()
    def dino(self, x: torch.Tensor) -> torch.Tensor:
        return self.shapes(_resize(x, self.shapes.cfg.image_size)).features

    @torch.no_grad()
    def clip_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(_resize(x, self.clip.cfg.image_size))

    @torch.no_grad()
    def clip_text(self, prompts: list[str]) -> torch.Tensor:
        emb = self.text.encode(prompts)
        return self.clip.encode_text(emb.tokens, emb.mask)

    @torch.no_grad()
    def attr_features(self, x: torch.Tensor) -> np.ndarray:
        return torch.cat([self.attr.features(x[i:i + 250]) for i in range(0, len(x), 250)]).numpy()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x.float()
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=x.shape[-1] > size)


def crop(x: torch.Tensor, positions: list[str], size: int = 32) -> torch.Tensor:
    """A size x size window around each image's named grid cell (clamped inside the image)."""
    out = []
    side = x.shape[-1]
    for img, pos in zip(x, positions):
        row, col = divmod(POSITIONS.index(pos), 3)
        cx, cy = _GRID[col] * side, _GRID[row] * side
        x0 = int(min(max(round(cx - size / 2), 0), side - size))
        y0 = int(min(max(round(cy - size / 2), 0), side - size))
        out.append(img[:, y0:y0 + size, x0:x0 + size])
    return torch.stack(out)


def mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all (row of a, row of b) pairs."""
    return float((F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t()).mean())


def self_cos(a: torch.Tensor) -> float:
    """Mean cosine similarity over pairs of different rows (the subject images among themselves)."""
    a = F.normalize(a.float(), dim=-1)
    n = len(a)
    return float(((a @ a.t()).sum() - n) / (n * (n - 1)))


def subject_tensors() -> tuple[torch.Tensor, list[str]]:
    pairs = demo_subject(TOKEN, 64)
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im, _ in pairs])
    return x, [p for p, _ in DEMO_PLACES]


def generate(pipe: TextToImagePipeline, prompts: list[str], seeds: int, seed: int = 0, batch: int = 32
             ) -> torch.Tensor:
    """`seeds` images per prompt (prompt-major): image j of prompt i starts from noise seeded by
    (seed, i * seeds + j)."""
    rows = [p for p in prompts for _ in range(seeds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe.generate(rows, None, SampleSettings("ddim", 25, guidance=3.0), seed=seed, batch_size=batch,
                             progress=False)


def fidelity(judge: Judge, x: torch.Tensor, prompts: list[str], seeds: int, positions: list[str],
             real: torch.Tensor, real_pos: list[str]) -> dict[str, float]:
    """Subject fidelity (whole images and object crops) and CLIP-T of generated images `x` (prompt-major)."""
    pos = [p for p in positions for _ in range(seeds)]
    gen_crop, real_crop = crop(x, pos), crop(real, real_pos)
    texts = judge.clip_text([untokened(p) for p in prompts])
    img = judge.clip_image(x)
    return {
        "dino": mean_cos(judge.dino(x), judge.dino(real)),
        "dino_crop": mean_cos(judge.dino(gen_crop), judge.dino(real_crop)),
        "clip_i": mean_cos(img, judge.clip_image(real)),
        "clip_i_crop": mean_cos(judge.clip_image(gen_crop), judge.clip_image(real_crop)),
        "clip_t": clip_score(img, texts.repeat_interleave(seeds, 0)),
    }


def accuracy(judge: Judge, x: torch.Tensor, want: list[dict[str, int]]) -> dict[str, float]:
    """Share of images whose predicted attribute is the wanted one, per attribute named in `want`."""
    pred = predict_attributes(judge.attr, x)
    out: dict[str, float] = {}
    for key in sorted({k for w in want for k in w}):
        rows = [i for i, w in enumerate(want) if key in w]
        out[key] = float(np.mean([int(pred[key][i]) == want[i][key] for i in rows]))
    return out


def diversity(judge: Judge, x: torch.Tensor) -> dict[str, float]:
    """Mean pairwise cosine distance of attribute-net features; distinct predicted backgrounds and object colours."""
    f = F.normalize(torch.from_numpy(judge.attr_features(x)), dim=-1)
    sim = f @ f.t()
    n = len(f)
    pred = predict_attributes(judge.attr, x)
    return {"pairwise_distance": float(1 - (sim.sum() - n) / (n * (n - 1))),
            "backgrounds": len(set(pred["background"].tolist())), "colors": len(set(pred["color"].tolist())),
            "star_share": float((pred["shape"] == 3).float().mean())}


# ---------------------------------------------------------------------------------------------- eval
def load_pipe(spec: str | Path) -> TextToImagePipeline:
    return TextToImagePipeline.from_pretrained(spec, device="cpu", spacing="pakhsh")


def cmd_eval(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = Judge()
    real, real_pos = subject_tensors()
    real_crops = crop(real, real_pos)
    models: dict[str, str | Path] = {"base": args.model}
    models.update({name: Path(args.runs) / name for name in RUNS if (Path(args.runs) / name).is_dir()})
    ctx_prompts = [caption(p, b) for p, b in RECONTEXT]
    ctx_want = [{"position": POSITIONS.index(p), "background": COLOR_NAMES.index(b), "shape": 3} for p, b in RECONTEXT]
    prop_prompts = [caption(p, b, s, c) for s, c, p, b in PROPERTY]
    prop_want = [{"position": POSITIONS.index(p), "background": COLOR_NAMES.index(b), "shape": 3,
                  **({"size": SIZES.index(s)} if s else {}), **({"color": COLOR_NAMES.index(c)} if c else {})}
                 for s, c, p, b in PROPERTY]
    held = [(c, a) for c, a in heldout_prompts(2000) if a["shape"] == 3][: args.heldout]
    n = args.seeds
    rows, prior_rows, shown = [], [], {}
    for name, spec in models.items():
        t = time.perf_counter()
        pipe = load_pipe(spec)
        tok = (lambda p: untokened(p)) if name == "base" else (lambda p: p)
        x_ctx = generate(pipe, [tok(p) for p in ctx_prompts], n)
        x_prop = generate(pipe, [tok(p) for p in prop_prompts], n)
        r = {"model": name, **fidelity(judge, x_ctx, ctx_prompts, n, [p for p, _ in RECONTEXT], real, real_pos)}
        r.update({f"ctx_{k}": v for k, v in accuracy(judge, x_ctx, [w for w in ctx_want for _ in range(n)]).items()})
        pf = fidelity(judge, x_prop, prop_prompts, n, [p for _, _, p, _ in PROPERTY], real, real_pos)
        r.update({f"prop_{k}": v for k, v in pf.items()})
        r.update({f"prop_{k}": v for k, v in accuracy(judge, x_prop, [w for w in prop_want for _ in range(n)]).items()})
        plain = generate(pipe, ["a star"], args.plain, seed=1)
        if name == "base":  # the reference of the FID column: the base's own "a star" images, other seeds
            ref = compute_statistics(judge.attr_features(generate(pipe, ["a star"], args.plain, seed=2)))
        where = [POSITIONS[int(i)] for i in predict_attributes(judge.attr, plain)["position"]]  # the object's cell
        p = {"model": name, **diversity(judge, plain),
             "fid_vs_base": float(frechet_distance(compute_statistics(judge.attr_features(plain)), ref)),
             "clip_i_to_subject": mean_cos(judge.clip_image(crop(plain, where)), judge.clip_image(real_crops)),
             "dino_to_subject": mean_cos(judge.dino(crop(plain, where)), judge.dino(real_crops))}
        # the class in the new contexts ("a star at the bottom right on a red background"): the prior the subject
        # prompts sit next to; FID against the base's own images of the same prompts (other seeds)
        plain_ctx = [untokened(q) for q in ctx_prompts]
        xc = generate(pipe, plain_ctx, n, seed=1)
        if name == "base":
            ref_ctx = compute_statistics(judge.attr_features(generate(pipe, plain_ctx, n, seed=2)))
        cpos = [q for q, _ in RECONTEXT for _ in range(n)]
        p.update({"ctx_fid_vs_base": float(frechet_distance(compute_statistics(judge.attr_features(xc)), ref_ctx)),
                  "ctx_clip_i_to_subject": mean_cos(judge.clip_image(crop(xc, cpos)), judge.clip_image(real_crops)),
                  "ctx_pairwise_distance": diversity(judge, xc)["pairwise_distance"]})
        p.update({f"ctx_{k}": v for k, v in accuracy(judge, xc, [w
                                                                  for w in ctx_want for _ in range(n)]).items()})
        shown[name] = {"class_ctx": xc}
        xh = generate(pipe, [c for c, _ in held], 1, seed=3)
        p.update({f"heldout_{k}": v for k, v in accuracy(judge, xh, [a for _, a in held]).items()})
        r["seconds"] = p["seconds"] = time.perf_counter() - t
        rows.append(r)
        prior_rows.append(p)
        shown[name].update({"ctx": x_ctx, "prop": x_prop, "plain": plain})
        if name != "base":
            shown[name]["fail"] = generate(pipe, [f.format(t=TOKEN) for f in FAILURES], 4)
        print(json.dumps(r), json.dumps(p), flush=True)
    floor = prior_rows[0]["fid_vs_base"]  # the base against itself (other seeds): the FID column's noise floor
    crops = crop(real, real_pos)  # the reference row: the subject images against each other
    rows.append({"model": "real", "dino": self_cos(judge.dino(real)), "dino_crop": self_cos(judge.dino(crops)),
                 "clip_i": self_cos(judge.clip_image(real)), "clip_i_crop": self_cos(judge.clip_image(crops)),
                 "clip_t": clip_score(judge.clip_image(real), judge.clip_text(
                     [untokened(caption(p, b)) for p, b in DEMO_PLACES]))})
    _grids(out, real, shown, n)
    _tables(out, rows, prior_rows, args, floor)
    return 0


def _grids(out: Path, real: torch.Tensor, shown: dict, n: int) -> None:
    k = min(4, n)
    save_grid(real, out / "subject.png", nrow=4, scale=2)
    for name, s in shown.items():
        if name == "base":
            continue
        ctx = s["ctx"].view(len(RECONTEXT), n, *s["ctx"].shape[1:])[:, :k]
        prop = s["prop"].view(len(PROPERTY), n, *s["prop"].shape[1:])[:, :k]
        save_grid(ctx.flatten(0, 1), out / f"contexts_{name}.png", nrow=k, scale=2)
        save_grid(prop.flatten(0, 1), out / f"properties_{name}.png", nrow=k, scale=2)
        save_grid(s["fail"], out / f"failures_{name}.png", nrow=4, scale=2)
    plain = torch.stack([s["plain"][:8] for s in shown.values()])
    save_grid(plain.flatten(0, 1), out / "prior_a_star.png", nrow=8, scale=2)
    first = torch.stack([s["class_ctx"].view(len(RECONTEXT), n, *s["class_ctx"].shape[1:])[:4, 0] for s in
                         shown.values()])  # the first seed of the first 4 class-in-context prompts, per model
    save_grid(first.flatten(0, 1), out / "prior_contexts.png", nrow=4, scale=2)
    # the overview: subject | 4 new contexts | 4 property changes (full fine-tuning with prior preservation)
    best = shown.get("full_prior") or next(s for m, s in shown.items() if m != "base")
    ctx = best["ctx"].view(len(RECONTEXT), n, *best["ctx"].shape[1:])[:4, 0]
    prop = best["prop"].view(len(PROPERTY), n, *best["prop"].shape[1:])[[0, 1, 4, 5], 0]
    save_grid(torch.cat([real, ctx, prop]), out / "overview.png", nrow=4, scale=2)
    (out / "prompts.txt").write_text(
        "contexts (rows of contexts_*.png):\n" + "\n".join(caption(p, b) for p, b in RECONTEXT)
        + "\n\nproperty changes (rows of properties_*.png):\n"
        + "\n".join(caption(p, b, s, c) for s, c, p, b in PROPERTY)
        + "\n\nfailure cases (failures_*.png, 4 seeds each):\n" + "\n".join(f.format(t=TOKEN) for f in FAILURES)
        + f"\n\nprior_a_star.png: rows {', '.join(LABELS[m] for m in shown)}; 8 seeds of \"a star\""
        + "\nprior_contexts.png: the same rows; the first 4 contexts above without the identifier, one seed each\n")


def _tables(out: Path, rows: list[dict], prior_rows: list[dict], args: argparse.Namespace, floor: float) -> None:
    md = [f"Subject and prompt fidelity on the demo subject: {len(RECONTEXT)} recontextualisation and "
          f"{len(PROPERTY)} property-change prompts x {args.seeds} seeds, guidance 3, 25 DDIM steps. DINO* = the "
          "shapes feature net (the DINO analogue), CLIP-I / CLIP-T = unCLIP's CLIP; crop = 32x32 around the object.",
          "", "| model | DINO* | DINO* crop | CLIP-I | CLIP-I crop | CLIP-T | position | background | star | "
          "prop: DINO* crop | prop: CLIP-I crop | prop: CLIP-T | size | colour |", "|---" * 14 + "|"]
    for r in rows:
        if r["model"] == "real":
            md.append(f"| {LABELS['real']} | {r['dino']:.3f} | {r['dino_crop']:.3f} | {r['clip_i']:.3f} | "
                      f"{r['clip_i_crop']:.3f} | {r['clip_t']:.1f} | | | | | | | | |")
            continue
        md.append(f"| {LABELS[r['model']]} | {r['dino']:.3f} | {r['dino_crop']:.3f} | {r['clip_i']:.3f} | "
                  f"{r['clip_i_crop']:.3f} | {r['clip_t']:.1f} | {r['ctx_position']:.2f} | {r['ctx_background']:.2f} "
                  f"| {r['ctx_shape']:.2f} | {r['prop_dino_crop']:.3f} | {r['prop_clip_i_crop']:.3f} | "
                  f"{r['prop_clip_t']:.1f} | {r['prop_size']:.2f} | {r['prop_color']:.2f} |")
    md += ["", f"Prior preservation: {args.plain} images of \"a star\" per model (FID against {args.plain} of the "
           f"base's own, other seeds; base vs base = {floor:.2f} is the noise floor) and {args.heldout} held-out star "
           "captions of the shapes test split.", "",
           "| model | pairwise distance | backgrounds | colours | shape star | FID vs base | CLIP-I crop to subject | "
           "DINO* crop to subject | held-out: position | background | colour | size | shape |", "|---" * 13 + "|"]
    for p in prior_rows:
        fid = f"{p['fid_vs_base']:.2f}" if p["model"] != "base" else f"({floor:.2f})"
        md.append(f"| {LABELS[p['model']]} | {p['pairwise_distance']:.3f} | {p['backgrounds']} | {p['colors']} | "
                  f"{p['star_share']:.2f} | {fid} | {p['clip_i_to_subject']:.3f} | {p['dino_to_subject']:.3f} | "
                  f"{p['heldout_position']:.2f} | {p['heldout_background']:.2f} | {p['heldout_color']:.2f} | "
                  f"{p['heldout_size']:.2f} | {p['heldout_shape']:.2f} |")
    md += ["", f"The class in the new contexts: the {len(RECONTEXT)} recontextualisation prompts without the "
           f"identifier (\"a star at the bottom right on a red background\"), {args.seeds} seeds each; FID against the "
           "base's images of the same prompts (other seeds).", "",
           "| model | pairwise distance | FID vs base | CLIP-I crop to subject | position | background | star |",
           "|---" * 7 + "|"]
    for p in prior_rows:
        fid = f"{p['ctx_fid_vs_base']:.2f}" if p["model"] != "base" else f"({p['ctx_fid_vs_base']:.2f})"
        md.append(f"| {LABELS[p['model']]} | {p['ctx_pairwise_distance']:.3f} | {fid} | "
                  f"{p['ctx_clip_i_to_subject']:.3f} | {p['ctx_position']:.2f} | {p['ctx_background']:.2f} | "
                  f"{p['ctx_shape']:.2f} |")
    _write(out, "tables", {"seeds": args.seeds, "plain": args.plain, "heldout": args.heldout, "machine": _machine(),
                           "fidelity": rows, "prior": prior_rows, "fid_floor": floor}, "\n".join(md) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", default="runs/dreambooth_tables")
    t.add_argument("--model", default="t2i")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval")
    e.add_argument("--runs", default="runs/dreambooth_tables")
    e.add_argument("--model", default="t2i", help="the base the runs started from")
    e.add_argument("--out", default="docs/results/dreambooth")
    e.add_argument("--seeds", type=int, default=16)
    e.add_argument("--plain", type=int, default=200)
    e.add_argument("--heldout", type=int, default=64)
    e.set_defaults(func=cmd_eval)
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
