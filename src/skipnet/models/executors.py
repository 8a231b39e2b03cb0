"""Executors: how a gated block is run given per-image decisions g (B,).

* ``masked``: the block runs on the whole batch and outputs are mixed, ``S(x) + g * (F(x) - S(x))``.
  Differentiable in g (straight-through, soft) and what training uses: BatchNorm sees the whole batch.
* ``compact``: only the images whose gate fired run the residual branch, gathered into a sub-batch; a
  block no image needs is not run at all. Inference only (eval-mode BatchNorm), equal to ``masked`` to
  float tolerance. Needs hard 0/1 decisions, and reads them on the host (one sync per block on an
  accelerator). :func:`run_compact` consumes its input: with an identity shortcut the result is written
  into ``x``.

Compact execution costs copies of the activations of the images that run: :func:`run_compact_rows` gathers
and scatters them (two copies); the network's inference loop keeps a :class:`FragmentedBatch` instead,
which only gathers (one copy). When nearly every image runs, running the block on the whole batch and
copying the few skipped images' shortcut back costs less; both switch to that at :func:`crossover` (still
exact: each image gets either ``F(x)`` or ``S(x)``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .blocks import ResidualBlock

EXECUTORS = ("masked", "compact")
# Crossover: copying one image's activations costs about COPY_COST / C of running a basic block of width C on
# it (both scale with H*W; the convolutions also with C). With k copies per running image, running the
# B - n skipped images too is cheaper once n / B > 1 / (1 + k COPY_COST / C): for gather + scatter (k = 2)
# 0.90 at C = 16, 0.95 at 32, 0.97 at 64 -- the crossovers measured on the 2-core development CPU, batch 128.
COPY_COST = 0.9


def crossover(channels: int, copies: int = 2) -> float:
    """Fraction of the batch running a block of input width ``channels`` from which compact execution runs
    the whole batch and restores the skipped images, when the compact way costs ``copies`` copies of the
    running images' activations."""
    return 1.0 / (1.0 + copies * COPY_COST / channels)


def run_masked(block: ResidualBlock, x: Tensor, g: Tensor) -> Tensor:
    s = block.shortcut(x)
    r = block.residual(x)
    if type(block).merge is ResidualBlock.merge and torch.is_grad_enabled():
        return GatedMerge.apply(r, s, g)  # fused backward: ~35% less extra memory traffic in training
    f = block.merge(r, s)
    return torch.lerp(s, f, g.view(-1, 1, 1, 1).to(f.dtype))


def _flat_rows(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C*H*W), a view for contiguous and channels_last tensors."""
    if t.is_contiguous():
        return t.view(t.shape[0], -1)
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1)


class GatedMerge(torch.autograd.Function):
    """``S + g * (relu(R + S) - S)`` for the default merge, with a hand-written backward.

    Autograd's version of the same expression makes about eight passes over the activations in backward
    (lerp's three outputs, the subtraction, the ReLU, the accumulation); this one makes five: the gate's
    gradient sum_{chw} grad * (f - s) as one batched dot product, and the two input gradients from one
    ReLU mask. Values and gradients equal autograd's (checked by gradcheck in the tests)."""

    @staticmethod
    def forward(ctx, r: Tensor, s: Tensor, g: Tensor) -> Tensor:  # type: ignore[override]
        f = torch.add(r, s).relu_()
        g4 = g.view(-1, 1, 1, 1).to(f.dtype)
        ctx.save_for_backward(f, s, g4)
        ctx.g_dtype = g.dtype
        return torch.lerp(s, f, g4)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        f, s, g4 = ctx.saved_tensors
        grad_r = torch.ops.aten.threshold_backward(grad * g4, f, 0)  # d/dR: g * 1[f > 0] * grad
        grad_s = torch.addcmul(grad_r, grad, 1 - g4)  # d/dS: (1 - g) * grad + d/dR
        grad_g = None
        if ctx.needs_input_grad[2]:
            diff = f - s
            if grad.stride() == diff.stride():
                grad_g = torch.bmm(_flat_rows(grad).unsqueeze(1), _flat_rows(diff).unsqueeze(2)).view(-1)
            else:
                grad_g = (grad * diff).sum((1, 2, 3))
            grad_g = grad_g.to(ctx.g_dtype)
        return grad_r, grad_s, grad_g


def _format(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor in that layout (so that copies keep the layout the convolutions use)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x.index_select(0, idx)`` in ``x``'s memory layout."""
    fmt = _format(x)
    if fmt == torch.contiguous_format:
        return x.index_select(0, idx)
    out = torch.empty((len(idx), *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    return torch.index_select(x, 0, idx, out=out)


def merge_into(block: ResidualBlock, residual: Tensor, shortcut: Tensor) -> Tensor:
    """``block.merge(residual, shortcut)``, in place on ``residual`` (a fresh tensor) for the default merge
    (the same arithmetic, so the same values, without two temporaries)."""
    if type(block).merge is ResidualBlock.merge:
        return torch.relu_(residual.add_(shortcut))
    return block.merge(residual, shortcut)


def run_block(block: ResidualBlock, x: Tensor) -> Tensor:
    """``block(x)`` for inference (no autograd): the merge is done in place, which saves two batch-sized
    temporaries (~5% of a CIFAR block at batch 256 on CPU). Bit-identical to ``block(x)``."""
    if type(block).forward is not ResidualBlock.forward or torch.is_grad_enabled():
        return block(x)
    return merge_into(block, block.residual(x), block.shortcut(x))


def run_compact_rows(block: ResidualBlock, x: Tensor, idx: Tensor, n: int) -> tuple[Tensor, Tensor | None]:
    """Run ``block`` for the images ``idx`` (int64, on ``x``'s device, ``n`` of them, 0 < n < B); the others
    get the shortcut. Returns ``(out, f)``: the new batch and, when the outputs of the running images were
    computed as a sub-batch, those outputs ``f`` (n, ...) in ``idx`` order (else ``None``: every row of
    ``out`` may have changed). ``x`` is consumed (with an identity shortcut ``out`` is ``x``, updated)."""
    batch = x.shape[0]
    if n >= crossover(x.shape[1]) * batch:
        # Whole batch, then put back the few skipped images' shortcut: exact, and no gather of n images.
        keep = torch.ones(batch, dtype=torch.bool, device=x.device)
        keep[idx] = False
        skipped = keep.nonzero().squeeze(1)
        s_skipped = block.shortcut(_rows(x, skipped))
        return run_block(block, x).index_copy_(0, skipped, s_skipped), None
    sub = _rows(x, idx)  # (n, C, H, W)
    if block.downsample is None:
        f = merge_into(block, block.residual(sub), sub)
        return x.index_copy_(0, idx, f), f  # writes into x: x is consumed
    s = block.shortcut(x)  # the projection, which a skipped block still pays for
    f = merge_into(block, block.residual(sub), _rows(s, idx))
    return s.index_copy_(0, idx, f), None


class FragmentedBatch:
    """The activations of a batch during compact inference, left where they were computed instead of being
    scattered back into one tensor after every block.

    Image ``b`` is row ``row[b]`` of fragment ``frag[b]``. Running an identity-shortcut block on some images
    gathers their rows (one copy, in fragment order), runs the block on that sub-batch and keeps the result
    as a new fragment; fragments no image lives in any more are dropped. Work on the whole batch (every
    image runs; a transition block, whose projection every image needs) uses :meth:`whole`: one tensor whose
    rows hold the images in the order ``perm`` (``None``: image order) -- all per-image computations, so the
    order only matters for the caller's final output."""

    def __init__(self, x: Tensor):
        self.batch = x.shape[0]
        self.reset(x, None)

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

    def replace(self, x: Tensor) -> None:
        """The whole batch (see :meth:`whole`) is now ``x``, rows in the same order."""
        self.frags[0] = x

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
                          memory_format=_format(first))
        ks, starts = np.unique(frag, return_index=True)
        ends = [*starts[1:].tolist(), len(idx)]
        for k, a, b in zip(ks.tolist(), starts.tolist(), ends):
            src, rows = self.frags[k], row[a:b]
            if rows[-1] - rows[0] == b - a - 1:  # a run of consecutive rows: a plain copy
                out[a:b].copy_(src[int(rows[0]) : int(rows[-1]) + 1])
            else:
                torch.index_select(src, 0, torch.from_numpy(rows).to(src.device), out=out[a:b])
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


def run_compact(block: ResidualBlock, x: Tensor, g: Tensor) -> Tensor:
    idx = torch.nonzero(g > 0.5).squeeze(1)  # images that run the block
    n = idx.numel()
    if n == x.shape[0]:
        return run_block(block, x)
    if n == 0:
        return block.shortcut(x)  # identity (x itself) or the projection, which a skipped block still pays for
    return run_compact_rows(block, x, idx, n)[0]


def get_executor(name: str) -> Callable[[ResidualBlock, Tensor, Tensor], Tensor]:
    if name == "masked":
        return run_masked
    if name == "compact":
        return run_compact
    raise ValueError(f"unknown executor {name!r}; expected one of {EXECUTORS}")
