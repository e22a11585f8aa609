"""Sampler x steps table for one model: FID / KID against the training split (shipped feature net), seconds.

    python benchmarks/sampler_table.py shapes --num 1000 --out docs/results/samplers_shapes
    python benchmarks/sampler_table.py fashion_mnist --num 1000 --device cuda --rows fast

Every row samples `--num` images with one seed (the same starting noise for every sampler) and scores them
with `pakhsh.evaluation.evaluate`, so the numbers are what `pakhsh eval MODEL --sampler S --steps N` prints.
With --real-floor the table starts with `--num` real images of the held-out test split scored the same way:
the noise floor of FID and KID at this n (no sampler can be told apart from another below it).
Writes OUT.json and OUT.md; the figures in docs/results/samplers.md came from this script, and its tables from
`--from-json` over those files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pakhsh.evaluation import EvalConfig, evaluate

# (sampler, steps, eta[, spacing]): the reference chain first, then the few-step contenders; spacing "auto" (the
# sampler's default: noise-dense for sde-dpm++2m, uniform for the others) unless named
ROWS = {
    "full": [
        ("ddpm", 1000, 0.0), ("ddpm", 100, 0.0), ("ddpm", 50, 0.0), ("ddpm", 20, 0.0),
        ("ddim", 50, 0.0), ("ddim", 50, 1.0), ("ddim", 20, 1.0),
        ("dpm++2m", 20, 0.0), ("dpm++2m", 10, 0.0),
        ("sde-dpm++2m", 50, 0.0), ("sde-dpm++2m", 20, 0.0), ("sde-dpm++2m", 10, 0.0),
    ],
    "fast": [("ddpm", 100, 0.0), ("ddpm", 20, 0.0), ("dpm++2m", 20, 0.0), ("sde-dpm++2m", 20, 0.0)],
    "cpu": [  # what a 2-core CPU affords at n = 1,000, uniform steps (ancestral-100 stands in for the full chain)
        ("ddpm", 100, 0.0), ("ddpm", 20, 0.0), ("dpm++2m", 20, 0.0), ("sde-dpm++2m", 20, 0.0, "uniform"),
        ("sde-dpm++2m", 10, 0.0, "uniform"),
    ],
    "spacing": [  # every few-step sampler of the "cpu" rows with noise-dense steps (the cpu rows: uniform)
        ("sde-dpm++2m", 20, 0.0, "noise-dense"), ("sde-dpm++2m", 10, 0.0, "noise-dense"),
        ("ddpm", 20, 0.0, "noise-dense"), ("dpm++2m", 20, 0.0, "noise-dense"),
    ],
    "chain": [("ddpm", 1000, 0.0)],  # the 1000-step reference alone (about 100 min per model on one CPU core)
    "gpu": [
        ("ddpm", 1000, 0.0), ("ddpm", 100, 0.0), ("ddpm", 20, 0.0), ("ddim", 50, 0.0), ("ddim", 20, 1.0),
        ("dpm++2m", 20, 0.0), ("sde-dpm++2m", 20, 0.0), ("sde-dpm++2m", 20, 0.0, "uniform"), ("sde-dpm++2m", 10, 0.0),
    ],
}


def run_row(model: str, sampler: str, steps: int, eta: float, args: argparse.Namespace, spacing: str = "auto") -> dict:
    cfg = EvalConfig(source=model, num_samples=args.num, num_real=args.num_real, sampler=sampler, steps=steps, eta=eta,
                     spacing=spacing,
                     metrics=("fid", "kid"), batch_size=args.batch_size, seed=args.seed, device=args.device,
                     bf16=args.bf16,
                     stats_dir=args.stats_dir, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    res = evaluate(cfg)
    rep = res.report
    rule = (res.sampling or {}).get("spacing", "all")  # no spacing when every training step is walked
    return {"sampler": sampler, "steps": steps, "eta": eta, "spacing": rule, "seed": args.seed, "fid": rep.fid, "kid": rep.kid_mean,
            "kid_std": rep.kid_std, "n": rep.n_fake, "seconds": time.perf_counter() - start,
            "label": rep.labels()["fid"]}


def real_floor_row(model: str, args: argparse.Namespace) -> dict:
    """`--num` real test-split images of the model's dataset, written as PNGs and scored like a sampler's output."""
    import tempfile

    from pakhsh.data import DataConfig, build_dataset
    from pakhsh.imageio import save_images
    from pakhsh.pipelines import ImagePipeline

    data = ImagePipeline.from_pretrained(model, device="cpu").loaded.config.data
    ds = build_dataset(DataConfig(name=data.name, image_size=data.image_size, split="test", path=data.path))
    with tempfile.TemporaryDirectory() as folder:
        save_images(torch.stack([ds[i]["image"] for i in range(min(args.num, len(ds)))]), folder)
        start = time.perf_counter()
        res = evaluate(EvalConfig(source=folder, dataset=data.name, data_path=data.path, num_real=args.num_real,
                                  metrics=("fid", "kid"), batch_size=args.batch_size, device=args.device,
                                  stats_dir=args.stats_dir, progress=False))
    rep = res.report
    return {"sampler": "real test images", "steps": 0, "eta": 0.0, "spacing": "-", "seed": 0, "fid": rep.fid, "kid": rep.kid_mean,
            "kid_std": rep.kid_std, "n": rep.n_fake, "seconds": time.perf_counter() - start,
            "label": rep.labels()["fid"]}


def to_markdown(model: str, rows: list[dict], device: str) -> str:
    ref = next((r for r in rows if r["sampler"] == "ddpm" and r["steps"] == 1000), None)
    ref = ref or next((r for r in rows if r["sampler"] == "ddpm"), None)
    head = (f"| sampler | steps | spacing | FID | KID x1e3 | vs ancestral-{ref['steps'] if ref else '?'} "
            f"| seconds ({device}, incl. scoring) |")
    lines = [f"### {model}: {rows[0]['label']} (and KID) against the training split", "", head,
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["sampler"] + (f" (eta={r['eta']:g})" if r["sampler"] == "ddim" else "")
        real = r["steps"] == 0  # the real-image floor row
        rel = f"{r['fid'] / ref['fid']:.2f}x" if ref and not real else "-"
        steps = r["steps"] or "-"
        spacing = "-" if real else r.get("spacing", "uniform")  # rows from before --spacing walked uniform steps
        lines.append(f"| {name} | {steps} | {spacing} | {r['fid']:.2f} | {1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f} "
                     f"| {rel} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="shipped model name or checkpoint folder")
    p.add_argument("--num", type=int, default=1000, help="samples per row (default: %(default)s)")
    p.add_argument("--num-real", type=int, default=10_000, help="reference images (default: %(default)s)")
    p.add_argument("--rows", choices=sorted(ROWS), default="full")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast while sampling")
    p.add_argument("--stats-dir", default=None)
    p.add_argument("--real-floor", action="store_true",
                   help="first score --num real test images: the noise floor of the metrics at this n")
    p.add_argument("--rows-only", action="store_true", help="with --real-floor: the floor row alone, no samplers")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (default: print only)")
    p.add_argument("--from-json", nargs="+", metavar="JSON",
                   help="measure nothing: one table from the rows of these OUT.json files, in order (the device "
                        "column then says --device)")
    args = p.parse_args(argv)
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(Path(f).read_text())["rows"]]
        print(to_markdown(args.model, rows, args.device + (", bf16" if args.bf16 else "")))
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    if args.real_floor:
        rows.append(real_floor_row(args.model, args))
        print(f"{args.model} real test images  FID {rows[-1]['fid']:.3f}  KID {rows[-1]['kid']:.5f}", flush=True)
    for sampler, steps, eta, *spacing in [] if args.rows_only else ROWS[args.rows]:
        rows.append(run_row(args.model, sampler, steps, eta, args, *spacing))
        r = rows[-1]
        print(f"{args.model} {sampler:12s} {steps:5d} {r['spacing']:11s} eta={eta:g}  FID {r['fid']:.3f}  KID {r['kid']:.5f}  "
              f"{r['seconds']:.1f}s", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    md = to_markdown(args.model, rows, device + (", bf16" if args.bf16 else ""))
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
        out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
