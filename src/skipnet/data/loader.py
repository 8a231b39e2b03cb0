"""Batches from an in-memory dataset, augmented on the training device (SPEC §5; after airbench).

The uint8 images move to the device once. Each epoch is a permutation drawn from a generator seeded by
(seed, epoch); the crop offsets and flips of every position in that epoch come from a second generator seeded
by (seed, epoch), so batch ``k`` of an epoch is the same whether the epoch runs from the start or resumes at
``start_step=k``, and the same on every device (all randomness is drawn on the CPU). No hidden counters.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import ImageData


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from several values, e.g. ``derive_seed(seed, epoch)``; neighbouring inputs give
    unrelated seeds."""
    text = "\0".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def crop_flip(images: Tensor, shifts: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Per-image random crop and horizontal flip, vectorised over the batch.

    images (B, C, H, W) any dtype; shifts (B, 2) int64 in [0, 2 * padding]: the (row, col) offset of each
    H x W window inside the image zero-padded by ``padding``; flips (B,) bool: mirror that window. Returns
    (B, C, H, W). (The mirror of a window is the window at column 2p - col of the mirrored padded image, so
    one indexing op over the unfolded windows of both does crop and flip.)
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4) if padding else images
    both = torch.stack([padded, padded.flip(3)])  # (2, B, C, H + 2p, W + 2p)
    windows = both.unfold(3, h, 1).unfold(4, w, 1)  # (2, B, C, 2p + 1, 2p + 1, H, W), a view
    cols = torch.where(flips, 2 * padding - shifts[:, 1], shifts[:, 1])
    batch = torch.arange(b, device=images.device)
    return windows[flips.long(), batch, :, shifts[:, 0], cols]  # (B, C, H, W)


class BatchLoader:
    """Batches ``(x, y)`` of ``data``: x normalised (B, C, H, W) in ``dtype`` on ``device``, y int64.

    ``train=True`` shuffles each epoch and, with ``augment``, applies a random crop from the image zero-padded
    by ``crop_padding`` pixels and a random horizontal flip (``flip``), independently per image.
    ``train=False`` goes through the data in order, unaugmented. ``drop_last`` defaults to ``train``.
    ``rank``/``world_size`` shard every epoch for distributed training: all ranks draw the same permutation
    and rank r takes positions r, r + world_size, ...; in training the permutation is first cut to a
    multiple of world_size so that every rank runs the same number of steps. Evaluation shards cover every
    image exactly once (sizes may differ by one).
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        augment: bool = True,
        crop_padding: int = 4,
        flip: bool = True,
        seed: int = 0,
        drop_last: bool | None = None,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, got {batch_size}")
        if crop_padding < 0:
            raise ValueError(f"expected crop_padding >= 0, got {crop_padding}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"expected 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if not dtype.is_floating_point:
            raise ValueError(f"expected a floating-point dtype, got {dtype}")
        self.device = torch.device(device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.crop_padding, self.flip = crop_padding, flip
        self.augment = train and augment and (crop_padding > 0 or flip)
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last, self.dtype = channels_last, dtype
        self.classes, self.num_classes, self.name = list(data.classes), data.num_classes, data.name
        self.images = data.images.to(self.device)  # uint8, moved once
        self.labels = data.labels.to(self.device)
        c = data.in_channels
        mean = torch.tensor(data.mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        std = torch.tensor(data.std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self._scale, self._bias = 1 / (255 * std), -mean / std  # x_norm = x_uint8 * scale + bias

    @property
    def num_samples(self) -> int:
        """Images this rank sees per epoch (before ``drop_last``)."""
        n = len(self.images)
        if self.world_size == 1:
            return n
        if self.train:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """The indices (CPU, int64) this rank visits in ``epoch``, in order."""
        n = len(self.images)
        if self.train:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
            idx = idx[: n - n % self.world_size]
        else:
            idx = torch.arange(n)
        return idx[self.rank :: self.world_size]

    def normalise(self, x: Tensor) -> Tensor:
        """uint8 (B, C, H, W) on the device -> normalised ``dtype``."""
        x = x.float().mul_(self._scale).add_(self._bias).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of ``epoch``, starting at batch ``start_step`` (earlier ones are skipped, later ones are
        unchanged: resuming reproduces the same batches)."""
        steps = len(self)
        if not 0 <= start_step <= steps:
            raise ValueError(f"expected 0 <= start_step <= {steps}, got {start_step}")
        return self._batches(epoch, start_step, steps)

    def _batches(self, epoch: int, start_step: int, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self.order(epoch)
        if self.augment:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "augment", self.rank))
            shifts = torch.randint(0, 2 * self.crop_padding + 1, (len(idx), 2), generator=g)
            flips = torch.rand(len(idx), generator=g) < 0.5
            if not self.flip:
                flips.zero_()
            shifts, flips = shifts.to(self.device), flips.to(self.device)
        idx = idx.to(self.device)
        bs = self.batch_size
        for step in range(start_step, steps):
            sel = slice(step * bs, (step + 1) * bs)
            x, y = self.images.index_select(0, idx[sel]), self.labels.index_select(0, idx[sel])
            if self.augment:
                x = crop_flip(x, shifts[sel], flips[sel], self.crop_padding)
            yield self.normalise(x), y

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """All batches of an evaluation loader. A training loader needs the epoch: use :meth:`epoch`."""
        if self.train:
            raise TypeError("a training BatchLoader is iterated with loader.epoch(epoch), which fixes its order")
        return self.epoch(0)


def check_class_count(batches: object, num_classes: int) -> None:
    """Refuse to evaluate a ``num_classes`` model on batches of a loader (anything with a ``num_classes``,
    such as :class:`BatchLoader`) of another class count: its accuracy would be a number without meaning."""
    have = getattr(batches, "num_classes", None)
    if have is not None and int(have) != num_classes:
        name = getattr(batches, "name", None)
        raise ValueError(f"the model has {num_classes} classes but the data{f' ({name})' if name else ''} has "
                         f"{have}: evaluate it on data of the classes it was trained on")


def check_eval_batch(x: Tensor, y: Tensor, num_classes: int, index: int) -> None:
    """Refuse evaluation batch ``index`` (counted from 0) when it would give a silently wrong result: images
    holding NaN or infinite values (a NaN gate probability reads as "skip": they would count as images that
    skip every block) or labels outside ``0 .. num_classes - 1``."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).flatten(1).any(1).sum())
        raise ValueError(f"batch {index}: {bad} of {x.shape[0]} images hold NaN or infinite values; expected "
                         "finite (normalised) images")
    if y.numel():
        low, high = (int(v) for v in torch.aminmax(y))
        if low < 0 or high >= num_classes:
            raise ValueError(f"batch {index}: labels {low}..{high}, but the model has {num_classes} classes "
                             f"(expected labels 0..{num_classes - 1})")
