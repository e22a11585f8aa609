"""Offline sample-quality metrics: FID, KID, Inception Score, improved precision/recall, and their feature networks.

Typical use:
    extractor = InceptionExtractor()                      # or FeatureNetExtractor.from_dir("weights/fashion-net")
    report = compute_metrics(real_images, fake_images, extractor)   # images (N, C, H, W) in [-1, 1]
    print(report.to_markdown())                           # | FID[inception]-5k | 12.345 | ...
Nothing is downloaded: the FID InceptionV3 weights are read from a local file (see `load_fid_inception`).
"""

from pakhsh.metrics.evaluate import ALL_METRICS, MetricName, MetricReport, compute_metrics, metrics_from_features
from pakhsh.metrics.features import (
    Extracted,
    FeatureExtractor,
    FeatureNetExtractor,
    ImageSource,
    InceptionExtractor,
    convert_images,
    extract,
    model_to_unit_range,
    unit_to_model_range,
)
from pakhsh.metrics.featnet import (
    FeatureNet,
    FeatureNetConfig,
    FeatureNetTrainResult,
    classification_accuracy,
    infer_feature_net_config,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from pakhsh.metrics.fid import (
    KIDResult,
    Stats,
    StatsCache,
    StatsKey,
    compute_statistics,
    fid_from_features,
    fid_torchmetrics,
    frechet_distance,
    kernel_inception_distance,
    torchmetrics_fid,
)
from pakhsh.metrics.inception import (
    FIDInceptionV3,
    InceptionOutput,
    default_inception_path,
    load_fid_inception,
)
from pakhsh.metrics.inception_score import ISResult, inception_score
from pakhsh.metrics.precision_recall import PRResult, precision_recall
from pakhsh.metrics.weights import WeightsMismatchError, WeightsNotFoundError

__all__ = [
    "ALL_METRICS",
    "Extracted",
    "FIDInceptionV3",
    "FeatureExtractor",
    "FeatureNet",
    "FeatureNetConfig",
    "FeatureNetExtractor",
    "FeatureNetTrainResult",
    "ISResult",
    "ImageSource",
    "InceptionExtractor",
    "InceptionOutput",
    "KIDResult",
    "MetricName",
    "MetricReport",
    "PRResult",
    "Stats",
    "StatsCache",
    "StatsKey",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "classification_accuracy",
    "compute_metrics",
    "compute_statistics",
    "convert_images",
    "default_inception_path",
    "extract",
    "fid_from_features",
    "fid_torchmetrics",
    "frechet_distance",
    "inception_score",
    "infer_feature_net_config",
    "kernel_inception_distance",
    "load_feature_net",
    "load_fid_inception",
    "metrics_from_features",
    "model_to_unit_range",
    "precision_recall",
    "save_feature_net",
    "torchmetrics_fid",
    "train_feature_net",
    "unit_to_model_range",
]
