"""Where a batch's activations live during compact inference, and copies of some of their rows.

Compact execution costs copies of the activations of the images that run a block. Scattering each block's
outputs back into one batch tensor would cost two copies per running image (gather, scatter); a
:class:`FragmentedBatch` leaves them where they were computed, so only the gather remains.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor in that layout (so that copies keep the layout the convolutions use)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def index_tensor(idx: np.ndarray, device: torch.device) -> Tensor:
    """Host image indices (int64) as a tensor on ``device`` (sharing the array's memory on the CPU)."""
    t = torch.from_numpy(idx)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x.index_select(0, idx)`` in ``x``'s memory layout."""
    fmt = memory_format(x)
    if fmt == torch.contiguous_format:
        return x.index_select(0, idx)
    out = torch.empty((len(idx), *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    return torch.index_select(x, 0, idx, out=out)


class FragmentedBatch:
    """The activations of a batch during compact inference, left where they were computed instead of being
    scattered back into one tensor after every block.

    Image ``b`` is row ``row[b]`` of fragment ``frag[b]``. Running an identity-shortcut block on some images
    gathers their rows (one copy, in fragment order), runs the block on that sub-batch and keeps the result
    as a new fragment; fragments no image lives in any more are dropped. Work on the whole batch uses
    :meth:`whole`: one tensor whose rows hold the images in the order ``perm`` (``None``: image order) -- all
    per-image computations, so the order only matters for the caller's final output. A transition block, which
    gives every image new activations, gathers the images that run it and the others (one copy each) and
    :meth:`assign` s the two results."""

    def __init__(self, x: Tensor, perm: np.ndarray | None = None):
        self.batch = x.shape[0]
        self.reset(x, perm)

    def reset(self, x: Tensor, perm: np.ndarray | None) -> None:
        """The batch is now ``x``, its rows holding the images ``perm`` (``None``: image order)."""
        self.frags: list[Tensor | None] = [x]
        self.live = [self.batch]  # images living in each fragment
        self.frag = np.zeros(self.batch, dtype=np.int64)
        self.row = np.arange(self.batch)
        if perm is not None:
            self.row[perm] = np.arange(self.batch)
        self.perm = perm
        self.single = True

    def assign(self, parts: list[Tensor], images: list[np.ndarray]) -> None:
        """The batch is now the fragments ``parts``, row ``j`` of ``parts[k]`` holding image ``images[k][j]``
        (together every image once)."""
        self.frags = list(parts)
        self.live = [len(im) for im in images]
        for k, im in enumerate(images):
            self.frag[im] = k
            self.row[im] = np.arange(len(im))
        self.perm = None
        self.single = False

    def whole(self) -> tuple[Tensor, np.ndarray | None]:
        """The batch as one tensor and the image in each row (``None``: image order); gathers if it is in
        several fragments."""
        if not self.single:
            x, order = self.gather(np.arange(self.batch))
            self.reset(x, order)
        return self.frags[0], self.perm

    def gather(self, idx: np.ndarray) -> tuple[Tensor, np.ndarray]:
        """The rows of images ``idx`` as one dense tensor (the fragments' layout), fragment by fragment, and
        the image in each row."""
        frag, row = self.frag[idx], self.row[idx]
        key = np.argsort(frag * self.batch + row, kind="stable")
        order, frag, row = idx[key], frag[key], row[key]
        first = self.frags[int(frag[0])]
        out = torch.empty((len(idx), *first.shape[1:]), dtype=first.dtype, device=first.device,
                          memory_format=memory_format(first))
        ks, starts = np.unique(frag, return_index=True)
        ends = [*starts[1:].tolist(), len(idx)]
        for k, a, b in zip(ks.tolist(), starts.tolist(), ends):
            src, rows = self.frags[k], row[a:b]
            if rows[-1] - rows[0] == b - a - 1:  # a run of consecutive rows: a plain copy
                out[a:b].copy_(src[int(rows[0]) : int(rows[-1]) + 1])
            else:
                torch.index_select(src, 0, index_tensor(rows, src.device), out=out[a:b])
        return out, order

    def push(self, x: Tensor, images: np.ndarray) -> None:
        """``x`` holds the new activations of ``images``, row by row."""
        k = len(self.frags)
        for j, count in enumerate(np.bincount(self.frag[images], minlength=k).tolist()):
            if count:
                self.live[j] -= count
                if self.live[j] == 0:
                    self.frags[j] = None  # free it
        self.frags.append(x)
        self.live.append(len(images))
        self.frag[images] = k
        self.row[images] = np.arange(len(images))
        self.single = len(images) == self.batch
        if self.single:
            self.frags, self.live, self.frag[:] = [x], [self.batch], 0
            self.perm = images.copy()
