"""Train a FeatureNet on a built-in dataset and save it as a metrics feature extractor.

    python -m pakhsh.metrics.train_featnet --dataset fashion_mnist --out weights/fashion-net

Writes OUT/model.safetensors, OUT/config.json and OUT/train_metrics.json (loss, train and test accuracy).
Load it with `FeatureNetExtractor.from_dir(OUT)`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from torch.utils.data import Dataset

from pakhsh.metrics.featnet import infer_feature_net_config, save_feature_net, train_feature_net

# Names that metric labels show (FID[fashion-net]-5k); other datasets get "<dataset>-net".
DEFAULT_NAMES = {"fashion_mnist": "fashion-net", "digits": "digits-net", "shapes": "shapes-net"}


def load_datasets(name: str, image_size: int, data_path: str | None, length: int | None) -> tuple[Dataset, Dataset]:
    """(train, test) splits of a pakhsh dataset."""
    from pakhsh.data import DataConfig, build_dataset

    def split(which: str) -> Dataset:
        return build_dataset(DataConfig(name=name, path=data_path, image_size=image_size, split=which, length=length))

    return split("train"), split("test")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pakhsh.metrics.train_featnet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset name, e.g. fashion_mnist, digits, shapes")
    p.add_argument("--out", required=True, help="output folder for model.safetensors + config.json")
    p.add_argument("--name", default=None, help="extractor name in metric labels (default: e.g. fashion-net)")
    p.add_argument("--image-size", type=int, default=32, help="image side the net is trained at (default 32)")
    p.add_argument("--data-path", default=None, help="dataset location where the dataset needs one")
    p.add_argument("--length", type=int, default=None, help="use only this many samples per split (smoke runs)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32, help="channels of the first stage")
    p.add_argument("--feature-dim", type=int, default=128, help="size of the feature (penultimate) layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    train, test = load_datasets(args.dataset, args.image_size, args.data_path, args.length)
    name = args.name or DEFAULT_NAMES.get(args.dataset, f"{args.dataset}-net")
    cfg = infer_feature_net_config(train, name=name, width=args.width, feature_dim=args.feature_dim)
    model, result = train_feature_net(
        train, cfg, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, progress=not args.no_progress, eval_dataset=test,
    )  # fmt: skip
    out = save_feature_net(model, args.out, result)
    summary = {"out": str(out), "name": name, "final_loss": result.final_loss,
               "train_accuracy": result.train_accuracy, "test_accuracy": result.eval_accuracy}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
