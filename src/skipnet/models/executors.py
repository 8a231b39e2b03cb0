"""Executors: how a gated block is run given per-image decisions g (B,).

* ``masked`` (:func:`run_masked`, here): the block runs on the whole batch and the outputs are mixed,
  ``S(x) + g * (F(x) - S(x))``. Differentiable in g (straight-through, soft); what training uses:
  BatchNorm sees the whole batch.
* ``compact``: only the images whose gate fired run the residual branch; a block no image needs is not run
  at all. In inference (eval-mode BatchNorm) it equals ``masked`` to float tolerance; it is not a per-block
  function but a runner over the whole network: :class:`skipnet.infer.CompactRunner`, which
  ``SkipResNet.forward(..., executor="compact")`` calls, and the rivals' ``forward`` too (ACT, SACT, SDV).
  In training (ours, for the passes whose decisions are hard and carry no gradient: HRL's sampled and greedy
  paths) it is :func:`run_compact`, here, with autograd: a block's BatchNorm then normalises by the statistics
  of the images that run it, and its running statistics are theirs -- those inference uses -- where ``masked``
  mixes in the images that skip it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .blocks import ResidualBlock

EXECUTORS = ("masked", "compact")
RUNNER_ATTR = "_compact_runner"  # where skipnet.infer.compact_runner keeps a network's default runner


class KeepsCompactRunner:
    """Mixin of the networks whose ``compact`` executor is :class:`skipnet.infer.CompactRunner` (SkipNet and
    the rivals): the default runner kept in the instance (``RUNNER_ATTR``) is not copied or pickled with it;
    a copy builds its own on demand."""

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # nn.Module's: a copy of __dict__
        state.pop(RUNNER_ATTR, None)
        return state


def check_executor(name: str) -> str:
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; expected one of {EXECUTORS}")
    return name


def run_masked(block: ResidualBlock, x: Tensor, g: Tensor) -> Tensor:
    """``lerp(S(x), F(x), g)`` per image: ``F(x) = merge(residual(x), shortcut(x))`` where g = 1, the shortcut
    where g = 0, and in between for soft decisions. With autograd and the default merge this is
    :func:`skipnet.ops.gated_merge`: one pass each way, with a hand-written backward."""
    s = block.shortcut(x)
    r = block.residual(x)
    if type(block).merge is ResidualBlock.merge and torch.is_grad_enabled():
        return ops.gated_merge(r, s, g)
    f = block.merge(r, s)
    return torch.lerp(s, f, g.view(-1, 1, 1, 1).to(f.dtype))


def run_compact(block: ResidualBlock, x: Tensor, g: Tensor) -> Tensor:
    """The training-mode ``compact`` executor: the shortcut ``S(x)`` for every image, ``F(x)`` computed on, and
    written back for, only the images with ``g`` = 1 (hard decisions without gradient; autograd runs through
    the gather and scatter). BatchNorm in the residual branch sees only those images."""
    s = block.shortcut(x)
    idx = torch.nonzero(g, as_tuple=True)[0]  # (K,)
    if idx.numel() == x.shape[0]:
        return block.merge(block.residual(x), s)
    if idx.numel() == 0:
        return s
    # (indexing and index_put keep the memory format -- channels_last in training -- index_select/copy do not)
    f = block.merge(block.residual(x[idx]), s[idx])
    return s.index_put((idx,), f.to(s.dtype))  # (under autocast the merge may promote)
