"""In-memory datasets (SPEC §5, §9): decode once, cache the uint8 tensors, load the cache afterwards.

``load_dataset(name, root, split)`` returns an :class:`ImageData` -- all images of a split as one uint8
tensor (N, C, H, W) plus labels, class names and the per-channel mean/std used for normalisation. The decoded
tensors are cached in ``cache_dir`` (default ``$SKIPNET_CACHE`` or ``~/.cache/skipnet``) under a key made of
the dataset name, the split, the absolute root and the size and mtime of every source file, so a changed
file is decoded again. Cache files are written atomically; an unreadable one is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._paths import cache_root
from . import formats
from .formats import DatasetNotFoundError

log = logging.getLogger(__name__)

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "svhn", "imagefolder")
CACHE_VERSION = 1  # bump when a decoder's output changes

# (mean, std) per channel in [0, 1] pixel units; imagefolder computes them from its train split.
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
_SPLITS: dict[str, tuple[str, ...] | None] = {
    "fashion_mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "svhn": ("train", "extra", "train+extra", "test"),
    "imagefolder": None,  # any sub-folder (or <split>.zip) of root
}


@dataclass
class ImageData:
    """One split in memory. ``images``: uint8 (N, C, H, W), contiguous; ``labels``: int64 (N,);
    ``mean``/``std``: per channel, in [0, 1] pixel units."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            shape = tuple(self.images.shape)
            raise ValueError(f"expected images as uint8 (N, C, H, W), got {self.images.dtype} {shape}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            shape = tuple(self.labels.shape)
            raise ValueError(f"expected int64 labels of shape ({len(self.images)},), got {self.labels.dtype} {shape}")
        self.images = self.images.contiguous()
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"expected {self.in_channels} mean/std values, got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"expected positive std, got {self.std}")
        if len(self.labels) and int(self.labels.max()) >= len(self.classes):
            top = int(self.labels.max())
            raise ValueError(f"expected labels below {len(self.classes)} (the class count), got {top}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.images.shape[2], self.images.shape[3])

    def subset(self, index: Tensor | slice) -> ImageData:
        """The images at ``index`` (e.g. a held-out part of train), keeping classes and normalisation."""
        return ImageData(self.images[index], self.labels[index], self.classes, self.mean, self.std, self.name)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W), in [0, 1] units. Exact, via a
    256-bin histogram per channel."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        p = hist / hist.sum().clamp_min(1)
        mean = float((p * levels).sum())
        means.append(mean)
        stds.append(float((p * (levels - mean) ** 2).sum().sqrt()))
    return tuple(means), tuple(stds)


def default_cache_dir() -> Path:
    """``$SKIPNET_CACHE`` if set, else ``~/.cache/skipnet``."""
    return cache_root()


def dataset_info(name: str) -> dict[str, Any]:
    """What is fixed about a dataset: its splits (None: any folder), default root, and normalisation
    constants (None where they are computed from the data)."""
    _check_name(name)
    mean, std = _STATS.get(name, (None, None))
    return {
        "name": name,
        "splits": _SPLITS[name],
        "default_root": FASHION_MNIST_ROOT if name == "fashion_mnist" else None,
        "mean": mean,
        "std": std,
    }


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"expected a dataset name in {DATASETS}, got {name!r}")


# ---------------------------------------------------------------------------------------------------------
# locating and decoding: per dataset, locate(root, split) -> source (raises when missing), files(source) ->
# the files whose sizes and mtimes key the cache, and read(source) -> (images, labels, classes)
# ---------------------------------------------------------------------------------------------------------

_LOCATE: dict[str, Callable[[Path, str], Any]] = {
    "fashion_mnist": formats.find_idx_files,
    "cifar10": lambda root, split: formats.find_cifar_files("cifar10", root, split),
    "cifar100": lambda root, split: formats.find_cifar_files("cifar100", root, split),
    "svhn": formats.find_svhn_file,
    "imagefolder": formats.list_image_folder,
}
# Tests replace these to check that a cached split is not decoded again.
_READERS: dict[str, Callable[..., formats.Decoded]] = {
    "fashion_mnist": lambda files, workers: formats.read_fashion_mnist(files),
    "cifar10": lambda files, workers: formats.read_cifar("cifar10", files),
    "cifar100": lambda files, workers: formats.read_cifar("cifar100", files),
    "svhn": lambda files, workers: formats.read_svhn(files),
    "imagefolder": lambda source, workers: formats.read_image_folder(source, workers),
}


def _key_files(source: Any) -> list[str]:
    return source.key_files if isinstance(source, formats.FolderSource) else [str(f) for f in source]


def _cache_key(name: str, split: str, root: Path, files: list[str]) -> tuple[str, str]:
    """A digest over everything that determines the decoded tensors, and a readable file name."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, name, split, str(root)]).encode())
    stats = [os.stat(f) for f in files]
    h.update("\0".join(f"{f}\0{st.st_size}\0{st.st_mtime_ns}" for f, st in zip(files, stats)).encode())
    digest = h.hexdigest()
    place = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return digest, f"{name}-{split}-{place}-{digest[:16]}.pt"


def _read_cache(path: Path, digest: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # pages shared between processes
        if not isinstance(obj, dict) or obj.get("key") != digest:
            raise ValueError("key mismatch")
        ImageData(obj["images"], obj["labels"], obj["classes"], obj["mean"], obj["std"], "cache")  # validates
        return obj
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt, never fatal
        log.warning("ignoring unreadable dataset cache %s (%s: %s); decoding again", path, type(e).__name__, e)
        return None


def _write_cache(path: Path, obj: dict) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
        log.info("cached decoded dataset in %s", path)
        # older versions of the same name, split and root (their source files changed) are stale
        stem = path.name.rsplit("-", 1)[0]
        for old in path.parent.glob(f"{stem}-*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not write dataset cache %s (%s); continuing without it", path, e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _resolve_root(name: str, root: str | Path | None) -> Path:
    if root is None:
        if name == "fashion_mnist":
            return FASHION_MNIST_ROOT
        raise DatasetNotFoundError(
            f"{name} has no default location (and nothing is downloaded); pass root= the folder holding its files"
        )
    return Path(root).expanduser().resolve()


def load_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    cache_dir: str | Path | None = None,
    *,
    cache: bool = True,
    workers: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> ImageData:
    """Load one split of ``name`` (see ``DATASETS``) into memory.

    ``root``: the folder holding the files (None: the default location, Fashion-MNIST only). Splits:
    ``train``/``test``; SVHN also ``extra`` and ``train+extra``; imagefolder any ``root/<split>/`` folder or
    ``root/<split>.zip``. ``cache=False`` neither reads nor writes the cache. ``workers``: decoding processes
    for imagefolder. ``mean``/``std`` override the normalisation constants; by default they are the standard
    constants, or for imagefolder the statistics of its ``train`` split (of this split if there is none).
    Raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) when files are missing and ``ValueError``
    when one is malformed.
    """
    _check_name(name)
    splits = _SPLITS[name]
    if splits is not None and split not in splits:
        raise ValueError(f"expected a {name} split in {splits}, got {split!r}")
    if not split or split in (".", "..") or "/" in split or "\\" in split:
        raise ValueError(f"expected a split name (a sub-folder of root), got {split!r}")
    if name == "svhn" and split == "train+extra":
        parts = [load_dataset(name, root, s, cache_dir, cache=cache, mean=mean, std=std) for s in ("train", "extra")]
        images, labels = torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])
        return ImageData(images, labels, parts[0].classes, parts[0].mean, parts[0].std, name)

    root_path = _resolve_root(name, root)
    source = _LOCATE[name](root_path, split)
    obj = None
    if cache:
        digest, fname = _cache_key(name, split, root_path, _key_files(source))
        cache_path = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / fname
        obj = _read_cache(cache_path, digest)
    if obj is None:
        images, labels, classes = _READERS[name](source, workers)
        images_t, labels_t = torch.from_numpy(images).contiguous(), torch.from_numpy(labels)
        own_mean, own_std = channel_stats(images_t)
        obj = {"images": images_t, "labels": labels_t, "classes": classes, "mean": own_mean, "std": own_std}
        if cache:
            _write_cache(cache_path, {**obj, "key": digest, "name": name, "split": split, "root": str(root_path)})

    if mean is None or std is None:
        if name in _STATS:
            default_mean, default_std = _STATS[name]
        elif split == "train":
            default_mean, default_std = obj["mean"], obj["std"]
        else:
            default_mean, default_std = _folder_train_stats(root_path, split, obj, cache_dir, cache, workers)
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
    return ImageData(obj["images"], obj["labels"], list(obj["classes"]), tuple(mean), tuple(std), name)


def _folder_train_stats(
    root: Path, split: str, obj: dict, cache_dir: str | Path | None, cache: bool, workers: int | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalise an imagefolder split with its train split's statistics (same classes required)."""
    try:
        train = load_dataset("imagefolder", root, "train", cache_dir, cache=cache, workers=workers)
    except DatasetNotFoundError:
        log.warning("no train split in %s: normalising %s with its own statistics", root, split)
        return tuple(obj["mean"]), tuple(obj["std"])
    if list(train.classes) != list(obj["classes"]):
        raise ValueError(
            f"{root}: classes of {split!r} differ from those of 'train' ({obj['classes']} vs {train.classes}); "
            "labels would not match"
        )
    return train.mean, train.std
