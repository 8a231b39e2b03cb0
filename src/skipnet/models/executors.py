"""Executors: how a gated block is run given per-image decisions g (B,).

* ``masked``: the block runs on the whole batch and outputs are mixed, ``S(x) + g * (F(x) - S(x))``.
  Differentiable in g (straight-through, soft) and what training uses: BatchNorm sees the whole batch.
* ``compact``: only the images whose gate fired run the residual branch, gathered into a sub-batch and
  scattered back; a block no image needs is not run at all. Inference only (eval-mode BatchNorm), equal to
  ``masked`` to float tolerance. Needs hard 0/1 decisions, and reads them on the host (one sync per block
  on an accelerator). It consumes its input: with an identity shortcut the result is written into ``x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .blocks import ResidualBlock

EXECUTORS = ("masked", "compact")


def run_masked(block: ResidualBlock, x: Tensor, g: Tensor) -> Tensor:
    s = block.shortcut(x)
    f = block.merge(block.residual(x), s)
    return torch.lerp(s, f, g.view(-1, 1, 1, 1).to(f.dtype))


def run_compact(block: ResidualBlock, x: Tensor, g: Tensor) -> Tensor:
    idx = torch.nonzero(g > 0.5).squeeze(1)  # images that run the block
    n = idx.numel()
    if n == x.shape[0]:
        return block(x)
    s = block.shortcut(x)  # identity (x itself) or the projection, which a skipped block still pays for
    if n == 0:
        return s
    sub = x.index_select(0, idx)
    f = block.merge(block.residual(sub), s.index_select(0, idx))
    return s.index_copy_(0, idx, f)  # with an identity shortcut this writes into x: x is consumed


def get_executor(name: str) -> Callable[[ResidualBlock, Tensor, Tensor], Tensor]:
    if name == "masked":
        return run_masked
    if name == "compact":
        return run_compact
    raise ValueError(f"unknown executor {name!r}; expected one of {EXECUTORS}")
