"""Latent diffusion's tables on the shapes scenes (docs/results/latent.md):

    python benchmarks/latent_tables.py recon --num 1000                     # autoencoders: PSNR, SSIM, rFID
    python benchmarks/latent_tables.py guidance -m t2i --num 1000           # alignment + FID vs guidance scale
    python benchmarks/latent_tables.py fcompare --runs runs/ldm_f1 runs/ldm_f4 runs/ldm_f8 --num 1000
    python benchmarks/latent_tables.py grids -m t2i                         # prompts / map / layout / inpainting

Prompt alignment: the first `--num` one-object captions of the shapes *test* split (metrics.attributes.
heldout_prompts: a stream disjoint from training) are generated with one seed per image, and the shipped attribute
classifier (100% on real scenes) reads shape, colour, size, position and background off each image; accuracy is
the share of images where it finds the attribute the prompt names. FID: Frechet distance of the attribute net's
128-d features (it sees colour; the shapes net is nearly colour-blind) between the generated images and 10,000
one-object training scenes; the shapes-net FID of the other tables is given too. Everything is written under
--out as JSON, a Markdown table and a plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pakhsh.config import cache_root
from pakhsh.data.builtin.shapes import ShapesDataset
from pakhsh.evaluation import FEATNETS
from pakhsh.imageio import save_grid
from pakhsh.metrics.attributes import (
    ATTRIBUTES, CHANCE, attribute_accuracy, heldout_prompts, load_attribute_net, render_one_object,
)
from pakhsh.metrics.featnet import load_feature_net
from pakhsh.metrics.features import FeatureNetExtractor, extract
from pakhsh.metrics.fid import Stats, compute_statistics, frechet_distance
from pakhsh.metrics.restoration import psnr, ssim
from pakhsh.pipelines import SampleSettings
from pakhsh.pipelines.text_to_image import TextToImagePipeline, load_latent_model

REF_N = 10_000


# ---------------------------------------------------------------------------------------------- features / FID
class Scorer:
    """FID (attribute-net and shapes-net features) against one-object training scenes, and prompt alignment."""

    def __init__(self, out: Path, ref_n: int = REF_N, size: int = 64) -> None:
        """Reference: `ref_n` one-object training scenes rendered at `size` (the generated images' size)."""
        self.attr = load_attribute_net()
        self.shapes = FeatureNetExtractor(load_feature_net(FEATNETS / "shapes"))
        suffix = "" if size == 64 else f"_{size}px"
        cache = cache_root() / "latent_tables" / f"ref_one_object_train_{ref_n}{suffix}.npz"  # recomputable
        if cache.is_file():
            z = np.load(cache)
            self.ref = {k: Stats(z[f"{k}_mu"], z[f"{k}_sigma"], int(z[f"{k}_n"])) for k in ("attr", "shapes")}
        else:
            u8, _ = render_one_object("train", ref_n, size)
            x = u8.float() / 127.5 - 1
            self.ref = {k: self.stats(k, x) for k in ("attr", "shapes")}
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, **{f"{k}_{f}": getattr(v, f) for k, v in self.ref.items() for f in ("mu", "sigma", "n")})

    @torch.no_grad()
    def features(self, kind: str, x: torch.Tensor) -> np.ndarray:
        if kind == "shapes":
            return extract(self.shapes, x, 250).features
        return torch.cat([self.attr.features(x[i:i + 500]) for i in range(0, len(x), 500)]).numpy()

    def stats(self, kind: str, x: torch.Tensor) -> Stats:
        return compute_statistics(self.features(kind, x))

    def fid(self, x: torch.Tensor, ref: dict[str, Stats] | None = None) -> dict[str, float]:
        ref = ref or self.ref
        return {f"fid_{k}": float(frechet_distance(self.stats(k, x), ref[k])) for k in ("attr", "shapes")}

    def alignment(self, x: torch.Tensor, targets: list[dict]) -> dict[str, float]:
        return attribute_accuracy(self.attr, x, targets)


def _machine() -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "amx": " amx_bf16" in flags or " amx " in flags, "avx512_bf16": "avx512_bf16" in flags,
            "torch": torch.__version__}


def _write(out: Path, name: str, results: dict, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(md)
    print(md)


def _generate(pipe: TextToImagePipeline, prompts: list[str], scale: float, steps: int, batch: int, seed: int = 0,
              **extra) -> tuple[torch.Tensor, float]:
    t = time.perf_counter()
    x = pipe.generate(prompts, None, SampleSettings("ddim", steps, guidance=scale), seed=seed, batch_size=batch,
                      progress=False, **extra)
    return x, time.perf_counter() - t


# ---------------------------------------------------------------------------------------------- recon
def cmd_recon(args: argparse.Namespace) -> int:
    from pakhsh.training.autoencoder import load_autoencoder

    out = Path(args.out)
    scorer = Scorer(out, args.ref_n)
    ds = ShapesDataset(split="test", size=64, length=args.num)
    x = torch.stack([ds[i]["image"] for i in range(args.num)])
    real = {k: scorer.stats(k, x) for k in ("attr", "shapes")}
    rows = []
    for spec in args.models:
        ae, folder = load_autoencoder(spec)
        t = time.perf_counter()
        with torch.no_grad():
            rec = torch.cat([ae(x[i:i + 100], sample=False)[0].float().clamp(-1, 1) for i in range(0, len(x), 100)])
        secs = time.perf_counter() - t
        f = ae.cfg.downsample_factor
        r = {"model": spec, "f": f, "latent": f"{ae.cfg.latent_channels}x{64 // f}x{64 // f}",
             "params": sum(p.numel() for p in ae.parameters()), "psnr": psnr(rec, x), "ssim": ssim(rec, x),
             **{k.replace("fid", "rfid"): v for k, v in scorer.fid(rec, real).items()},
             "ms_per_image": 1000 * secs / len(x)}
        rows.append(r)
        save_grid(torch.stack([x[:8], rec[:8]], 1).flatten(0, 1), out / f"recon_{spec}.png", nrow=8, scale=2)
    md = ["| autoencoder | f | latent | params | PSNR (dB) | SSIM | rFID (attr net) | rFID (shapes net) | ms / image |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['f']} | {r['latent']} | {r['params']:,} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
           f"{r['rfid_attr']:.3f} | {r['rfid_shapes']:.3f} | {r['ms_per_image']:.2f} |" for r in rows]
    _write(out, "recon", {"num": args.num, "machine": _machine(), "rows": rows}, "\n".join(md) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- guidance
def cmd_guidance(args: argparse.Namespace) -> int:
    out = Path(args.out)
    scorer = Scorer(out, args.ref_n)
    pipe = TextToImagePipeline.from_pretrained(args.model, bf16=args.bf16)
    held = heldout_prompts(args.num)
    prompts, targets = [p for p, _ in held], [a for _, a in held]
    rows, shown = [], []
    for scale in args.scales:
        x, secs = _generate(pipe, prompts, scale, args.steps, args.batch_size)
        acc = scorer.alignment(x, targets)
        r = {"guidance": scale, **acc, **scorer.fid(x), "seconds": secs}
        rows.append(r)
        shown.append(x[:8])
        print(json.dumps(r), flush=True)
    save_grid(torch.stack(shown, 1).flatten(0, 1), out / "guidance_grid.png", nrow=len(args.scales), scale=2)
    _plot_guidance(rows, out / "guidance.png")
    md = [f"Prompt alignment and FID against guidance scale: {args.num} held-out one-object prompts, {args.steps} "
          f"DDIM steps, model {args.model}. Accuracy = share of images whose attribute (read by the attribute net) "
          "is the one the prompt names; chance in the last row.", "",
          "| guidance | " + " | ".join(ATTRIBUTES) + " | mean | all five | FID (attr net) | FID (shapes net) |",
          "|---" * (len(ATTRIBUTES) + 5) + "|"]
    for r in rows:
        md.append(f"| {r['guidance']:g} | " + " | ".join(f"{r[a]:.3f}" for a in ATTRIBUTES)
                  + f" | {r['mean']:.3f} | {r['all']:.3f} | {r['fid_attr']:.2f} | {r['fid_shapes']:.2f} |")
    md.append("| chance | " + " | ".join(f"{CHANCE[a]:.3f}" for a in ATTRIBUTES)
              + f" | {CHANCE['mean']:.3f} | {CHANCE['all']:.5f} | | |")
    _write(out, "guidance", {"num": args.num, "steps": args.steps, "model": args.model, "machine": _machine(),
                             "rows": rows}, "\n".join(md) + "\n")
    return 0


def _plot_guidance(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["guidance"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for k in (*ATTRIBUTES, "mean"):
        a.plot(g, [r[k] for r in rows], marker="o", label=k, lw=2.5 if k == "mean" else 1)
    a.set_xlabel("guidance scale"); a.set_ylabel("attribute accuracy"); a.set_ylim(0, 1.02); a.legend(fontsize=8)
    b.plot(g, [r["fid_attr"] for r in rows], marker="o", label="FID (attribute-net features)")
    b.set_xlabel("guidance scale"); b.set_ylabel("FID"); b.legend(fontsize=8)
    fig.suptitle("latent text-to-image on shapes: guidance trade-off")
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


# ---------------------------------------------------------------------------------------------- f-comparison
def train_seconds_at(run: Path, step: int) -> float | None:
    """Training seconds up to `step`, from log.jsonl: exact at logged steps, prorated inside a logging window."""
    logged = sorted(train_seconds(run).items())
    prev_step, prev_secs = 0, 0.0
    for s, secs in logged:
        if s >= step:
            return prev_secs + (secs - prev_secs) * (step - prev_step) / max(1, s - prev_step)
        prev_step, prev_secs = s, secs
    return None


def train_seconds(run: Path) -> dict[int, float]:
    """Cumulative training seconds at each logged step, from log.jsonl (steps / steps_per_s per window)."""
    seconds, last, total = {}, 0, 0.0
    for line in (run / "log.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "steps_per_s" not in rec:
            continue
        total += (rec["step"] - last) / rec["steps_per_s"]
        last = rec["step"]
        seconds[rec["step"]] = total
    return seconds


def cmd_fcompare(args: argparse.Namespace) -> int:
    from pakhsh.training.checkpoint import step_folders

    out = Path(args.out)
    if args.replot:  # fill in / recompute the training times of an earlier evaluation and rewrite its outputs
        done = json.loads((out / "fcompare.json").read_text())
        runs = {Path(r).name: Path(r) for r in args.runs}
        for r in done["rows"]:
            r["train_seconds"] = train_seconds_at(runs[r["run"]], r["step"])
        return _fcompare_outputs(out, done["rows"], args)
    scorer = Scorer(out, args.ref_n)
    held = heldout_prompts(args.num)
    prompts, targets = [p for p, _ in held], [a for _, a in held]
    rows = []
    for run in map(Path, args.runs):
        for folder in _pick(step_folders(run), args.points):
            step = int(folder.name.split("_")[1])
            model = load_latent_model(folder)
            pipe = TextToImagePipeline(model, bf16=args.bf16, spacing="pakhsh")
            x, gen_secs = _generate(pipe, prompts, args.guidance, args.steps, args.batch_size)
            f = model.vae_factor
            r = {"run": run.name, "f": f, "step": step, "train_seconds": train_seconds_at(run, step),
                 **scorer.fid(x), "align_mean": scorer.alignment(x, targets)["mean"],
                 "sample_ms_per_image": 1000 * gen_secs / len(prompts)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    return _fcompare_outputs(out, rows, args)


def _fcompare_outputs(out: Path, rows: list[dict], args: argparse.Namespace) -> int:
    _plot_fcompare(rows, out / "fcompare.png")
    md = [f"f-comparison at equal training time: {args.num} held-out prompts, guidance {args.guidance:g}, "
          f"{args.steps} DDIM steps; sampling time per image includes decoding.", "",
          "| model | f | step | training time (min) | FID (attr net) | FID (shapes net) | alignment (mean) | "
          "sampling ms / image |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = f"{r['train_seconds'] / 60:.1f}" if r["train_seconds"] is not None else "?"
        md.append(f"| {r['run']} | {r['f']} | {r['step']} | {t} | {r['fid_attr']:.2f} | {r['fid_shapes']:.2f} | "
                  f"{r['align_mean']:.3f} | {r['sample_ms_per_image']:.1f} |")
    _write(out, "fcompare", {"num": args.num, "guidance": args.guidance, "steps": args.steps,
                             "machine": _machine(), "rows": rows}, "\n".join(md) + "\n")
    return 0


def _pick(folders: list[Path], points: int) -> list[Path]:
    """`points` checkpoints evenly spread over the run's training, the last one included (oldest first)."""
    steps = {int(f.name.split("_")[1]): f for f in folders}
    last = max(steps)
    want = [last * (i + 1) / points for i in range(points)]
    chosen = {min(steps, key=lambda s: abs(s - w)) for w in want}
    return [steps[s] for s in sorted(chosen)]


def _plot_fcompare(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in dict.fromkeys(r["run"] for r in rows):
        rs = [r for r in rows if r["run"] == run and r["train_seconds"] is not None]
        ax.plot([r["train_seconds"] / 60 for r in rs], [r["fid_attr"] for r in rs], marker="o",
                label=f"{run} (f={rs[0]['f'] if rs else '?'})")
    ax.set_xlabel("training time (min, same machine)"); ax.set_ylabel("FID (attribute-net features)")
    ax.set_yscale("log"); ax.legend(); ax.set_title("LDM-f: FID against training compute")
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


# ---------------------------------------------------------------------------------------------- grids
def cmd_grids(args: argparse.Namespace) -> int:
    from pakhsh.conditioning.layout import batch_layout
    from pakhsh.conditioning.segmap import PALETTE
    from pakhsh.tasks.masks import center_mask

    out = Path(args.out)
    pipe = TextToImagePipeline.from_pretrained(args.model, bf16=args.bf16)
    k = args.seeds
    # prompts -> images: 8 held-out prompts x k seeds
    prompts = [p for p, _ in heldout_prompts(8)]
    x, _ = _generate(pipe, [p for p in prompts for _ in range(k)], args.guidance, args.steps, 32)
    save_grid(x, out / "prompts.png", nrow=k, scale=2)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    ds = ShapesDataset(split="test", size=64, length=8)
    items = [ds[i] for i in range(8)]
    real = torch.stack([it["image"] for it in items])
    # map -> image: [map | k samples | original]
    seg = torch.stack([it["segmentation"] for it in items])
    pal = torch.tensor(PALETTE[: int(seg.max()) + 1], dtype=torch.float32) / 127.5 - 1
    shown_map = pal[seg].permute(0, 3, 1, 2)
    x, _ = _generate(pipe, [""] * (8 * k), args.guidance, args.steps, 32, segmap=seg.repeat_interleave(k, 0))
    rows = torch.cat([shown_map[:, None], x.view(8, k, *x.shape[1:]), real[:, None]], 1)
    save_grid(rows.flatten(0, 1), out / "map_to_image.png", nrow=k + 2, scale=2)
    # layout -> image: [boxes drawn | k samples | original]
    boxes = torch.stack([it["boxes"] for it in items])
    objects = torch.stack([it["objects"] for it in items])
    b, lab = batch_layout(boxes, objects, 64)
    x, _ = _generate(pipe, [""] * (8 * k), args.guidance, args.steps, 32,
                     layout=(b.repeat_interleave(k, 0), lab.repeat_interleave(k, 0)))
    rows = torch.cat([_draw_boxes(b, lab)[:, None], x.view(8, k, *x.shape[1:]), real[:, None]], 1)
    save_grid(rows.flatten(0, 1), out / "layout_to_image.png", nrow=k + 2, scale=2)
    # inpainting: [masked | k samples | original], the prompt = the scene's caption with the object re-coloured
    mask = center_mask(64, 64).reshape(1, 1, 64, 64).float().expand(8, -1, -1, -1)
    caps = [it["caption"] for it in items]
    x, _ = _generate(pipe, [c for c in caps for _ in range(k)], args.guidance, args.steps, 32,
                     known=(real.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)))
    masked = real * (1 - mask) + mask * torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)
    rows = torch.cat([masked[:, None], x.view(8, k, *x.shape[1:]), real[:, None]], 1)
    save_grid(rows.flatten(0, 1), out / "inpainting.png", nrow=k + 2, scale=2)
    (out / "inpainting.txt").write_text("\n".join(caps) + "\n")
    print(f"wrote prompts.png, map_to_image.png, layout_to_image.png, inpainting.png to {out}")
    return 0


def _draw_boxes(boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """White canvases with each box outlined in its class's segmentation-palette colour."""
    from pakhsh.conditioning.segmap import PALETTE

    n = boxes.shape[0]
    img = torch.ones(n, 3, 64, 64)
    for i in range(n):
        for (x0, y0, x1, y1), c in zip((boxes[i] * 63).round().long().tolist(), labels[i].tolist()):
            if c < 0:
                continue
            col = torch.tensor(PALETTE[c + 1], dtype=torch.float32) / 127.5 - 1
            img[i, :, y0, x0:x1 + 1] = col[:, None]
            img[i, :, y1, x0:x1 + 1] = col[:, None]
            img[i, :, y0:y1 + 1, x0] = col[:, None]
            img[i, :, y0:y1 + 1, x1] = col[:, None]
    return img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="docs/results/latent")
    common.add_argument("--num", type=int, default=1000)
    common.add_argument("--steps", type=int, default=25)
    common.add_argument("--batch-size", type=int, default=250)
    common.add_argument("--bf16", action="store_true")
    common.add_argument("--ref-n", type=int, default=REF_N, help="one-object training scenes for FID reference")
    r = sub.add_parser("recon", parents=[common])
    r.add_argument("--models", nargs="+", default=["autoencoder_f4", "autoencoder_f8"])
    g = sub.add_parser("guidance", parents=[common])
    g.add_argument("-m", "--model", default="t2i")
    g.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 3, 5, 7])
    f = sub.add_parser("fcompare", parents=[common])
    f.add_argument("--runs", nargs="+", required=True)
    f.add_argument("--guidance", type=float, default=3.0)
    f.add_argument("--points", type=int, default=2, help="checkpoints per run (evenly spaced, last included)")
    f.add_argument("--replot", action="store_true", help="recompute training times and rewrite outputs from "
                   "OUT/fcompare.json (no sampling)")
    gr = sub.add_parser("grids", parents=[common])
    gr.add_argument("-m", "--model", default="t2i")
    gr.add_argument("--guidance", type=float, default=3.0)
    gr.add_argument("--seeds", type=int, default=4)
    args = p.parse_args(argv)
    return {"recon": cmd_recon, "guidance": cmd_guidance, "fcompare": cmd_fcompare, "grids": cmd_grids}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
