"""Datasets and loaders (SPEC §5, §9).

- :func:`load_dataset` reads Fashion-MNIST (idx), CIFAR-10/100 (python pickles), SVHN (.mat) or an
  ImageFolder tree into an :class:`ImageData` (uint8 tensors in memory), decoding once and caching the result.
- :class:`BatchLoader` batches an :class:`ImageData` on the training device with vectorised crop + flip,
  deterministic in (seed, epoch, step).
- :func:`make_stream_loader` streams large folders (ImageNet) through a torchvision ``ImageFolder``.
"""

from .datasets import (
    DATASETS,
    ImageData,
    channel_stats,
    dataset_info,
    default_cache_dir,
    load_dataset,
)
from .formats import DatasetNotFoundError
from .loader import BatchLoader, crop_flip, derive_seed
from .stream import IMAGENET_MEAN, IMAGENET_STD, EpochSampler, make_stream_loader, stream_transform

__all__ = [
    "DATASETS", "BatchLoader", "DatasetNotFoundError", "EpochSampler", "IMAGENET_MEAN", "IMAGENET_STD",
    "ImageData", "channel_stats", "crop_flip", "dataset_info", "default_cache_dir", "derive_seed",
    "load_dataset", "make_stream_loader", "stream_transform",
]
