"""Streaming loader for image folders too large to hold in memory (ImageNet; SPEC §5).

A ``torch.utils.data.DataLoader`` over ``torchvision.datasets.ImageFolder(root/split)`` with the standard
ImageNet transforms: train RandomResizedCrop + horizontal flip, eval Resize(256) + CenterCrop(224) (scaled
with ``image_size``), normalised with the ImageNet mean/std. It yields ``(x, y)`` on the CPU; the caller moves
batches to the device. ``rank``/``world_size`` shard it with a ``DistributedSampler`` for multi-GPU runs;
either way call ``loader.sampler.set_epoch(epoch)`` before each later epoch (or build the loader with ``epoch=``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from .formats import DatasetNotFoundError, brief_error
from .loader import derive_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EpochSampler(Sampler[int]):
    """Indices 0..n-1, shuffled by (seed, epoch) when ``shuffle``; ``set_epoch`` like ``DistributedSampler``."""

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, epoch: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def load_rgb(path: str):
    """An image file as an RGB PIL image (torchvision's ``ImageFolder`` loader), or ``ValueError`` naming the
    file: PIL's own errors for a damaged JPEG ("Truncated File Read") do not."""
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # (PIL raises SyntaxError for some damaged headers)
        raise ValueError(f"{path}: cannot decode image ({brief_error(err)})") from err


def stream_transform(train: bool, image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The standard ImageNet transforms (PIL image -> normalised float tensor)."""
    from torchvision import transforms as T

    if train:
        ops = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])


def make_stream_loader(
    root: str | Path,
    split: str,
    batch_size: int,
    *,
    train: bool,
    image_size: int = 224,
    workers: int = 4,
    seed: int = 0,
    epoch: int = 0,
    sampler: Sampler | None = None,
    rank: int = 0,
    world_size: int = 1,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    drop_last: bool | None = None,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over ``root/split/<class>/<images>`` yielding ``(x, y)``: x float (B, 3, S, S), y int64.

    Order: shuffled by (seed, epoch) when ``train``, in order otherwise. ``world_size > 1`` shards it with a
    ``DistributedSampler`` (rank ``rank``); a given ``sampler`` replaces both. The sampler's
    ``set_epoch(epoch)`` is called here; call it again (``loader.sampler.set_epoch``) for later epochs. Worker
    augmentation seeds derive from (seed, epoch). ``drop_last`` defaults to ``train``; ``pin_memory`` to
    whether CUDA is available.
    """
    from torch.utils.data import DistributedSampler
    from torchvision.datasets import ImageFolder

    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{folder} does not exist; expected the ImageFolder layout {folder}/<class>/<image>")
    dataset = ImageFolder(str(folder), transform=stream_transform(train, image_size, mean, std), loader=load_rgb)
    if sampler is None and world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train
        )
    elif sampler is None:
        sampler = EpochSampler(len(dataset), shuffle=train, seed=seed)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=train if drop_last is None else drop_last,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(derive_seed(seed, epoch, "workers")),
    )
