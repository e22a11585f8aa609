"""Palette's Table 2 on held-out shapes scenes: degraded input / regression / Palette / original, per task.

    python benchmarks/palette_table.py --num 1000 --out docs/results/palette
    python benchmarks/palette_table.py --num 200 --tasks colorize --steps 20      # a quick look

For each task, the first `--num` images of the shapes test split are degraded exactly as in training (seeded),
restored by the regression baseline (one pass) and by Palette (`--sampler`, `--steps`), and scored with the
shipped shapes feature net (pakhsh.metrics.restoration): FID against the training split's features, IS,
classification accuracy (CA: the net's shape class vs the original's), perceptual distance (PD: feature-space L2
to the original), PSNR / SSIM, and the fool rate (error of a small classifier trained to tell originals from
outputs; 0.5 = indistinguishable). The shapes net barely sees colour, so two colour columns are added from the
scenes' own geometry: colour accuracy (each region's median colour is nearest to the original's palette colour)
and on-palette rate (the median colour is within reach of *some* colour of the dataset's palette: a plausible
colour, whichever). Writes OUT/table.json, OUT/table.md and the grids OUT/<task>.png (input | regression |
Palette x3 seeds | original) and OUT/panorama.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from pakhsh.data.builtin.shapes import COLORS, COLOR_NAMES, ShapesDataset
from pakhsh.evaluation import FEATNETS
from pakhsh.imageio import save_grid
from pakhsh.metrics.featnet import load_feature_net
from pakhsh.metrics.features import FeatureNetExtractor, extract
from pakhsh.metrics.fid import compute_statistics
from pakhsh.metrics.restoration import restoration_scores
from pakhsh.pipelines import SampleSettings
from pakhsh.pipelines.palette import PalettePipeline
from pakhsh.tasks import TASK_NAMES

PALETTE_RGB = torch.tensor([COLORS[n] for n in COLOR_NAMES], dtype=torch.float64) / 127.5 - 1  # (10, 3) in [-1, 1]
ON_PALETTE = 0.25  # max distance (in [-1, 1] RGB units, ~32/255 per channel) to count as a palette colour


def held_out(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The first n test scenes: images (n, 3, size, size), shape labels (n,), and per-scene region colours."""
    ds = ShapesDataset(split="test", size=size, length=n)
    samples = [ds[i] for i in range(n)]
    x = torch.stack([s["image"] for s in samples])
    y = torch.tensor([int(s["label"]) for s in samples])
    return x, y, samples


def region_colours(x: torch.Tensor, samples: list[dict]) -> list[list[tuple[torch.Tensor, int]]]:
    """Per image, (median RGB, true colour index) of the background and of each object's visible pixels."""
    out = []
    for img, s in zip(x.double(), samples):
        seg, regions = s["segmentation"], []
        parts = [(seg == 0, int(s["background"]))]
        for obj in s["objects"][: s["num_objects"]]:
            parts.append((seg == int(obj[0]) + 1, int(obj[1])))
        for where, colour in parts:
            if int(where.sum()) >= 4:  # tiny slivers say nothing about colour
                regions.append((img[:, where].median(dim=1).values, colour))
        out.append(regions)
    return out


def colour_scores(outputs: torch.Tensor, samples: list[dict]) -> tuple[float, float]:
    """(colour accuracy, on-palette rate) over all regions of all images."""
    hits = on = total = 0
    for regions in region_colours(outputs, samples):
        for median, colour in regions:
            d = (PALETTE_RGB - median).norm(dim=1)
            hits += int(d.argmin()) == colour
            on += float(d.min()) <= ON_PALETTE
            total += 1
    return hits / total, on / total


def reference_stats(featnet, n: int, size: int):
    ds = ShapesDataset(split="train", size=size, length=n)
    x = torch.stack([ds[i]["image"] for i in range(n)])
    return compute_statistics(extract(FeatureNetExtractor(featnet), x, 250).features)


def score(name: str, outputs: torch.Tensor, x0: torch.Tensor, y: torch.Tensor, samples: list[dict], featnet, ref,
          args: argparse.Namespace, seconds: float) -> dict:
    s = restoration_scores(outputs, x0, y, featnet, ref_stats=ref, fool_steps=args.fool_steps, seed=args.seed)
    acc, on = colour_scores(outputs, samples)
    return {"row": name, **s._asdict(), "colour_acc": acc, "on_palette": on, "seconds": seconds}


def run_task(task: str, pipes: dict, x0, y, samples, featnet, ref, args) -> tuple[list[dict], torch.Tensor]:
    palette, regression = pipes["palette"], pipes["regression"]
    settings = SampleSettings(args.sampler, args.steps)
    cond = palette.degrade(x0, task, seed=args.seed)
    rows = [score("degraded input", cond["cond_image"], x0, y, samples, featnet, ref, args, 0.0)]
    t = time.perf_counter()
    reg = regression.restore(cond, settings, batch_size=args.batch_size, progress=False)
    rows.append(score("regression", reg, x0, y, samples, featnet, ref, args, time.perf_counter() - t))
    t = time.perf_counter()
    pal = palette.restore(cond, settings, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet)
    rows.append(score(f"palette ({args.sampler}, {args.steps} steps)", pal, x0, y, samples, featnet, ref, args,
                      time.perf_counter() - t))
    rows.append(score("original", x0, x0, y, samples, featnet, ref, args, 0.0))
    # the grid: input | regression | Palette x3 seeds | original, for the first images
    k = args.grid_rows
    few = {key: v[:k] for key, v in cond.items()}
    three = palette.restore(few, settings, samples=3, seed=args.seed + 1, progress=False)
    tiles = [torch.cat([few["cond_image"][i : i + 1], reg[i : i + 1], three[3 * i : 3 * i + 3], x0[i : i + 1]])
             for i in range(k)]
    return rows, torch.cat(tiles)


def diversity_rows(args: argparse.Namespace, x0: torch.Tensor) -> list[dict]:
    """The L1-vs-L2 ablation: K samples per input for each model, diversity = std across samples."""
    from pakhsh.metrics.restoration import diversity, pairwise_ssim

    rows = []
    for spec in args.diversity_models:
        pipe = PalettePipeline.from_pretrained(spec, bf16=args.bf16, device=args.device)
        task = "colorize" if pipe.trained_task == "multi" else pipe.trained_task
        cond = pipe.degrade(x0[: args.diversity_inputs], task, seed=args.seed)
        out = pipe.restore(cond, SampleSettings(args.sampler, args.steps), samples=args.diversity_samples,
                           seed=args.seed, progress=False)
        k = args.diversity_samples
        grouped = out.reshape(-1, k, *out.shape[1:]).transpose(0, 1)  # (K, N, C, H, W)
        rows.append({"model": spec, "loss": pipe.config.diffusion.loss, "task": task, "samples": k,
                     "inputs": grouped.shape[1], "diversity": diversity(grouped), "pairwise_ssim": pairwise_ssim(grouped)})
    return rows


def fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def to_markdown(results: dict) -> str:
    lines = [f"Held-out: the first {results['num']} scenes of the shapes test split (32x32); FID against "
             f"{results['num_ref']} training scenes; feature net: shapes-net; Palette: {results['sampler']}, "
             f"{results['steps']} steps; machine: {results['machine']}.", ""]
    for task, rows in results["tasks"].items():
        lines += [f"### {task}", "", "| row | FID | IS | CA | PD | PSNR | SSIM | fool rate | colour acc | on-palette | "
                  "seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['row']} | {fmt(r['fid'], 2)} | {fmt(r['inception_score'], 2)} | {fmt(r['ca'])} | "
                         f"{fmt(r['pd'], 2)} | {fmt(r['psnr'], 2)} | {fmt(r['ssim'])} | {fmt(r['fool_rate'])} | "
                         f"{fmt(r['colour_acc'])} | {fmt(r['on_palette'])} | {fmt(r['seconds'], 1)} |")
        lines.append("")
    if results.get("diversity"):
        lines += ["### Sample diversity (L1 vs L2)", "", "| model | loss | task | inputs x samples | diversity (std) | "
                  "pairwise SSIM |", "|---|---|---|---|---|---|"]
        for r in results["diversity"]:
            lines.append(f"| {r['model']} | {r['loss']} | {r['task']} | {r['inputs']} x {r['samples']} | "
                         f"{fmt(r['diversity'], 4)} | {fmt(r['pairwise_ssim'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", "-m", default="palette")
    p.add_argument("--regression", default="palette_regression")
    p.add_argument("--tasks", default=",".join(TASK_NAMES), help='comma-separated; "" for the diversity rows only')
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--num-ref", type=int, default=10000, help="training scenes for the FID reference")
    p.add_argument("--sampler", default="sde-dpm++2m")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--fool-steps", type=int, default=300)
    p.add_argument("--grid-rows", type=int, default=8)
    p.add_argument("--panorama-width", type=int, default=160, help="0: no panorama strip")
    p.add_argument("--diversity-models", nargs="*", default=[], help="models for the L1-vs-L2 diversity rows")
    p.add_argument("--diversity-inputs", type=int, default=100)
    p.add_argument("--diversity-samples", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default="docs/results/palette")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipes = {"palette": PalettePipeline.from_pretrained(args.model, bf16=args.bf16, device=args.device),
             "regression": PalettePipeline.from_pretrained(args.regression, bf16=args.bf16, device=args.device)}
    size = pipes["palette"].size
    featnet = load_feature_net(FEATNETS / "shapes")
    x0, y, samples = held_out(args.num, size)
    ref = reference_stats(featnet, args.num_ref, size)
    results = {"num": args.num, "num_ref": args.num_ref, "sampler": args.sampler, "steps": args.steps,
               "model": args.model, "regression": args.regression, "command": " ".join(sys.argv),
               "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads",
               "tasks": {}}
    for task in [t for t in args.tasks.split(",") if t]:  # --tasks "" runs only the diversity rows
        rows, grid = run_task(task, pipes, x0, y, samples, featnet, ref, args)
        results["tasks"][task] = rows
        save_grid(grid, out / f"{task}.png", nrow=6, scale=3)
        for r in rows:
            print(f"{task:9s} {r['row']:34s} FID {fmt(r['fid'], 2):>7s}  CA {fmt(r['ca'])}  PD {fmt(r['pd'], 2)}  "
                  f"PSNR {fmt(r['psnr'], 2)}  SSIM {fmt(r['ssim'])}  fool {fmt(r['fool_rate'])}  "
                  f"colour {fmt(r['colour_acc'])}/{fmt(r['on_palette'])}", flush=True)
    if args.panorama_width:
        strip = pipes["palette"].panorama(x0[:1], args.panorama_width, fraction=pipes["palette"].task_config.uncrop_fraction,
                                          settings=SampleSettings(args.sampler, args.steps), seed=args.seed,
                                          progress=False)
        save_grid(strip, out / "panorama.png", nrow=1, scale=4)
    results["diversity"] = diversity_rows(args, x0) if args.diversity_models else []
    (out / "table.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(to_markdown(results))
    print(f"wrote {out}/table.md, table.json and grids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
