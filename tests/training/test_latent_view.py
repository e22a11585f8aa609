"""The encoded training view hands the loader exactly what the dataset would, minus the per-image work."""

from __future__ import annotations

import torch

from pakhsh.data.builtin.shapes import ShapesDataset
from pakhsh.nets.autoencoder import AutoencoderConfig, AutoencoderKL
from pakhsh.training.experiment import load_experiment
from pakhsh.training.latent import LatentSystem
from pakhsh.training.loader import EpochView, collate


def test_encoded_view_matches_the_dataset_batches() -> None:
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4))
    cfg = load_experiment("t2i", ["data.image_size=16", "data.length=10", "model.image_size=8",
                                  "condition.text=null", "model.context_dim=384", "latent.scale_samples=4"])
    ds = ShapesDataset(size=16, length=10)
    system = LatentSystem(cfg, ae, None, torch.device("cpu"))
    system.prepare(ds, progress=False)
    view = system.training_view(ds)
    assert view is not ds and len(view) == len(ds)
    picks = [7, 2, 9, 0]
    want = collate([EpochView(ds)[i] for i in picks])
    got = collate([EpochView(view)[i] for i in picks])
    for key in ("index", "label", "boxes", "objects"):
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(got["segmentation"].long(), want["segmentation"].long())
    assert got["image"].shape == want["image"].shape
    # the posterior the objective reads for these indices is the one the autoencoder gives their images
    post = system._posterior(got["index"], None)
    ref = ae.encode(want["image"])
    torch.testing.assert_close(post.mean, ref.mean, atol=1e-5, rtol=0)


def test_augmented_data_is_not_viewed() -> None:
    ae = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4))
    cfg = load_experiment("t2i", ["data.image_size=16", "data.length=4", "model.image_size=8", "condition=null",
                                  "model.cond_channels=0", "model.layout_classes=null", "latent.scale_samples=4"])
    ds = ShapesDataset(size=16, length=4)
    system = LatentSystem(cfg, ae, None, torch.device("cpu"))
    system._fill = lambda *a, **k: None  # as for an augmented or too large set: nothing cached
    system.prepare(ds, progress=False)
    assert system.training_view(ds) is ds
