"""Train the built-in shapes attribute classifier and write it with a model card.

    OMP_NUM_THREADS=1 python scripts/train_attribute_net.py   # -> src/pakhsh/assets/featnets/shapes_attributes

Writes config.json, model.safetensors, train_metrics.json and README.md into --out. Everything is rendered locally
(procedural scenes); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from pakhsh.metrics.attributes import (
    ATTRIBUTES,
    CHANCE,
    CLASS_NAMES,
    SHIPPED_DIR,
    save_attribute_net,
    train_attribute_net,
)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def model_card(metrics: dict, command: str) -> str:
    """README.md text for a trained net from its metrics dict."""
    acc = metrics["test_accuracy"]
    small_key = next(k for k in metrics if k.startswith("test_accuracy_rendered_at_"))
    small = metrics[small_key]
    small_px = small_key.rsplit("_", 1)[-1].replace("px", " px")
    rows = "\n".join(
        f"| {k} | {len(CLASS_NAMES[k])} | {_pct(acc[k])} | {_pct(small[k])} | {_pct(CHANCE[k])} |" for k in ATTRIBUTES
    )
    aug = metrics["augment"]
    return f"""# shapes-attributes: the built-in attribute classifier for `shapes` scenes

A small CNN that reads a {metrics['image_size']} x {metrics['image_size']} RGB image in [-1, 1] (other sizes are resized bilinearly) and
classifies the five attributes a one-object shapes caption names: shape (6), colour (10), size (2), position on
the 3 x 3 grid (9) and background colour (10). Three stages of width {metrics['width']}/{2 * metrics['width']}/{4 * metrics['width']} (two 3x3 convs each,
GroupNorm, SiLU; each stage halves the side); the last map is average-pooled to a 4 x 4 grid (where) and
max-pooled globally (what), then a 128-d layer feeds five linear heads; {metrics['num_params']:,} parameters.

It measures prompt alignment of text-to-image models: the accuracy of this classifier on generated images against
the attributes named in their prompts (`pakhsh.metrics.attributes.attribute_accuracy`, prompts from
`heldout_prompts`).

## How it was made

```
{command}
```

- data: the {metrics['train_data']},
  rendered once (antialiased, 4x supersampling) and kept in memory as uint8
- loss: sum of the five per-head cross-entropies; AdamW (lr {metrics['lr']}, weight decay 0.05, one-cycle schedule),
  batch {metrics['batch_size']}, {metrics['steps']} steps, seed {metrics['seed']}
- augmentation: shifts of up to {aug['max_shift']} px (small, so the grid position stays identifiable); a fraction
  {aug['lowres_prob']} of each batch re-sampled through a random lower resolution ({metrics['image_size'] // 3}-{3 * metrics['image_size'] // 4} px) and back; a fraction
  {aug['noise_prob']} with Gaussian noise of std up to 0.05
- time: {metrics['train_seconds']:.0f} s training + {metrics['render_seconds']:.0f} s rendering on {metrics['torch_threads']} CPU thread(s)

## Accuracy

On the {metrics['test_data']} (disjoint from training: the test split is
another random stream), rendered at {metrics['image_size']} px, and the same scenes rendered at {small_px} (the net resizes them to {metrics['image_size']} px):

| attribute | classes | test accuracy ({metrics['image_size']} px) | test accuracy ({small_px}) | chance (1 / classes) |
|---|---|---|---|---|
{rows}
| all five right | | {_pct(acc['all'])} | {_pct(small['all'])} | {CHANCE['all']:.4%} |
| mean | | {_pct(acc['mean'])} | {_pct(small['mean'])} | {_pct(CHANCE['mean'])} |

Chance is 1 / number of classes; the object's colour is never the background colour, so a guesser that knows the
background would get 1/9 on colour.

Final training loss {metrics['final_loss']:.4f} (first logging window {metrics['first_loss']:.3f}).

## Files

- `model.safetensors`: AttributeNet weights (loaded strictly by `pakhsh.metrics.attributes.load_attribute_net()`)
- `config.json`: `AttributeNetConfig`
- `train_metrics.json`: settings, loss history and the accuracies above, as written by the command
- `README.md`: this card
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=SHIPPED_DIR, help="output folder (default: the shipped one)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=20_000, help="one-object training scenes rendered once")
    p.add_argument("--num-test", type=int, default=2000, help="one-object test scenes for the reported accuracy")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be positive, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        net, metrics = train_attribute_net(
            steps=args.steps, batch_size=args.batch_size, seed=args.seed, num_train=args.num_train,
            num_test=args.num_test, width=args.width, lr=args.lr, progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_attribute_net(net, args.out, metrics)
    shown = list(argv) if argv is not None else sys.argv[1:]
    command = "OMP_NUM_THREADS=1 python scripts/train_attribute_net.py " + shlex.join(shown)
    (out / "README.md").write_text(model_card(metrics, command.strip()))
    acc = metrics["test_accuracy"]
    print(f"wrote {out}: test accuracy " + ", ".join(f"{k} {_pct(acc[k])}" for k in (*ATTRIBUTES, "all")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
