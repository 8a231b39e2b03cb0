"""Executors: how a gated block is run given per-image decisions g (B,).

* ``masked`` (:func:`run_masked`, here): the block runs on the whole batch and the outputs are mixed,
  ``S(x) + g * (F(x) - S(x))``. Differentiable in g (straight-through, soft); what training uses:
  BatchNorm sees the whole batch.
* ``compact``: only the images whose gate fired run the residual branch; a block no image needs is not run
  at all. Inference only (eval-mode BatchNorm), equal to ``masked`` to float tolerance. It is not a per-block
  function but a runner over the whole network: :class:`skipnet.infer.CompactRunner`, which
  ``SkipResNet.forward(..., executor="compact")`` calls, and the rivals' ``forward`` too (ACT, SACT, SDV).
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
