"""Table 4 -- DDPM Fig. 8 and Fig. 9 analogues: interpolation through x_t and variations from x_750.

Fig. 8: two test images are noised to x_t (t = 500 here, as DDPM's 500-step interpolation), mixed linearly with
several lambdas and decoded by the full reverse chain. Fig. 9: a test image is noised to x_750 and decoded several
times; what the samples share shows what x_750 still holds. Model: the L_simple / cosine run.

    python benchmarks/paper_tables/table4_grids.py
"""

from __future__ import annotations

import torch

import common as c

LAMBDAS = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
PAIRS = [(0, 1), (2, 3)]  # test-split indices interpolated
VARY_SOURCES = [0, 7]  # test-split indices varied
VARY_T = (250, 500, 750)  # Fig. 9 shows several t; x_750 is the headline
VARY_COUNT = 7


def test_images(pipe, indices: list[int]) -> torch.Tensor:
    """(N, C, H, W) test-split images of the model's dataset."""
    from dataclasses import replace

    from pakhsh.data import build_dataset

    ds = build_dataset(replace(pipe.config.data, split="test", random_flip=False))
    return torch.stack([ds[i]["image"] for i in indices])


def scaled(t: int) -> int:
    """A step of the 1000-step paper schedule mapped to this budget's T."""
    return max(1, round(t * c.BUDGET.num_steps / 1000))


def interpolation_grid(pipe, t: int) -> tuple[torch.Tensor, list[float]]:
    """Rows: source a, the lambdas' decodings, source b. Returns the images and the mean pixel distance of the
    lambda = 0 / 1 decodings to their sources (how much of each image survives x_t)."""
    rows, dists = [], []
    for k, (i, j) in enumerate(PAIRS):
        a, b = test_images(pipe, [i, j]).split(1)
        x = pipe.interpolate(a, b, LAMBDAS, t, seed=k)  # (len(LAMBDAS), C, H, W)
        dists += [float((x[0] - a[0]).abs().mean()), float((x[-1] - b[0]).abs().mean())]
        rows.append(torch.cat([a, x, b]))
    return torch.cat(rows), dists


def variation_grid(pipe) -> tuple[torch.Tensor, dict[int, float]]:
    """Rows: (source, VARY_COUNT variations) per source and t. Returns the images and, per t, the mean pixel
    standard deviation across variations (diversity kept at that t)."""
    rows, spread = [], {}
    for t in VARY_T:
        stds = []
        for k, i in enumerate(VARY_SOURCES):
            src = test_images(pipe, [i])
            x = pipe.vary(src, scaled(t), VARY_COUNT, seed=k)
            stds.append(float(x.std(dim=0).mean()))
            rows.append(torch.cat([src, x]))
        spread[t] = sum(stds) / len(stds)
    return torch.cat(rows), spread


def main() -> None:
    from pakhsh.imageio import save_grid
    from pakhsh.pipelines import ImagePipeline

    started = c.setup()
    run = c.ensure_run("simple_cosine")
    ckpt = c.checkpoints(run)[-1]
    pipe = ImagePipeline.from_pretrained(ckpt, device="cpu", bf16=True)
    t_interp = scaled(500)
    c.log(f"interpolating at t={t_interp}")
    interp, dists = interpolation_grid(pipe, t_interp)
    save_grid(interp, c.plot_path("table4_interpolation"), nrow=len(LAMBDAS) + 2, scale=3)
    c.log("varying from x_250, x_500, x_750")
    var, spread = variation_grid(pipe)
    save_grid(var, c.plot_path("table4_grids"), nrow=VARY_COUNT + 1, scale=3)
    t = c.Table(
        name="table4_grids", title="Interpolation and x_750 variations (DDPM Fig. 8 and 9 analogues)",
        reproduces="Ho et al. 2020, Fig. 8 (interpolation of two source images through x_500) and Fig. 9 "
                   "(samples sharing x_t with a source image, for several t; x_750 highlighted).",
        header=["grid", "setting", "measure"],
        rows=[[f"interpolation ({len(PAIRS)} pairs)", f"t = {t_interp}, λ = {', '.join(map(str, LAMBDAS))}",
               f"mean absolute pixel difference of the λ = 0 / 1 decodings to their sources: "
               f"{sum(dists) / len(dists):.3f} (pixels in [-1, 1])"]]
             + [[f"variations of {len(VARY_SOURCES)} test images", f"from x_{tt} (t = {scaled(tt)})",
                 f"mean per-pixel std across {VARY_COUNT} variations = {s:.3f}"] for tt, s in spread.items()],
    )
    t.extra = ("Interpolation (each row: source a, λ = 0 ... 1, source b):\n\n![interpolation](table4_interpolation.png)"
               "\n\nVariations (rows: x_250, x_500, x_750 for each source; first column the source):"
               "\n\n![variations](table4_grids.png)")
    grows = list(spread.values())
    t.findings = [
        "Diversity of the variations (mean per-pixel std across samples) by starting step: "
        + ", ".join(f"x_{tt}: {s:.3f}" for tt, s in spread.items())
        + (". It grows with t, as in DDPM Fig. 9: the later the shared x_t, the less of the source survives."
           if grows == sorted(grows) else ". It is not monotone in t here, unlike DDPM Fig. 9."),
        f"Decoding x_{t_interp} with λ = 0 or 1 does not return the source exactly (mean absolute difference "
        f"{sum(dists) / len(dists):.3f}): the reverse chain re-creates the detail that x_{t_interp} lost, as in "
        "DDPM Fig. 8.",
    ]
    t.notes = [f"Model: `{ckpt}` (L_simple, cosine schedule, {c.BUDGET.train_steps} steps).",
               "Decoding uses the full reverse chain from t (no respacing), seed per row; bf16 autocast.",
               "Sources are Fashion-MNIST test images "
               f"{', '.join(map(str, sorted({*sum(PAIRS, ()), *VARY_SOURCES})))}."]
    t.write(started, {"interpolation_source_distance": dists, "variation_spread": spread, "t_interp": t_interp})


if __name__ == "__main__":
    main()
