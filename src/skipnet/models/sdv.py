"""The stochastic-depth variant (SDV): random block skipping at a chosen rate, in training and at inference.

SkipNet's paper compares with random skipping at the ratio its gates skip ("stochastic-depth variant"); this
is that baseline as a model of its own, trained for it: every image skips each of SkipNet's gated blocks
(all but the network's first) independently with probability ``drop_rate`` -- a skipped block gives its
shortcut, a skipped transition block pays its projection, as in SkipNet -- both while training and at
inference, so the network is evaluated under the distribution it was trained on (no rescaling of the
residuals as Huang et al.'s stochastic depth does when it runs every block at test time).

Choices: one rate for every gated block (Huang et al. decay it linearly with depth; a uniform rate is what
"random skipping at matched ratio" means); the draws come from ``generator`` when given (training: the
per-step generator, so a resumed run draws the same), else from torch's global generator;
``skipnet.train.evaluate`` passes one seeded by its ``seed``, so an evaluation is repeatable. ``decisions``
fixes the draws (tests, replays).
MACs per image are the SkipNet table's for the drawn decisions (no gates).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cost import MacTable
from .blocks import ResidualBlock
from .rivals import RivalConfig, RivalOutput, RivalResNet


class StochasticDepthResNet(RivalResNet):
    """A plain ResNet that skips each gated block per image with probability ``config.drop_rate``."""

    def __init__(self, config: RivalConfig):
        super().__init__(config)
        if config.method != "sdv":
            raise ValueError(f"StochasticDepthResNet builds method 'sdv'; got {config.method!r}")

    def forward(self, x: Tensor, *, executor: str = "masked", generator: torch.Generator | None = None,
                decisions: Tensor | None = None) -> RivalOutput:
        """Run the network on ``x`` (B, C, H, W) with fresh random skips (or the given ``decisions`` (B, N),
        0/1). ``executor``: ``masked`` (every block on the whole batch, outputs chosen per image; training)
        or ``compact`` (eval only: the compact runner, :class:`skipnet.infer.CompactRunner`, which runs a block
        only on the images that keep it)."""
        if executor == "compact":
            from ..infer import compact_runner  # (infer builds on models: imported when first needed)

            return compact_runner(self)(x, decisions=decisions, generator=generator)
        self.check_input(x, executor)
        table = self.mac_table((x.shape[2], x.shape[3]))
        x = self._stem(x)
        keep = self._keep(x.shape[0], x.device, generator, decisions)
        x = self.blocks[0](x)
        for i, block in enumerate(self.blocks[1:]):
            x = _run_masked(block, x, keep[:, i])
        return self._output(x, keep, table)

    def _keep(self, batch: int, device: torch.device, generator: torch.Generator | None,
              decisions: Tensor | None) -> Tensor:
        """(B, N) bool: which images keep each gated block -- drawn (at rate 1 - ``drop_rate``), or the given
        ``decisions`` checked. The masked forward and the compact runner draw them alike."""
        if decisions is None:
            return torch.rand((batch, self.num_gates), generator=generator, device=device) >= self.config.drop_rate
        keep = torch.as_tensor(decisions, device=device)
        if keep.shape != (batch, self.num_gates) or not bool(((keep == 0) | (keep == 1)).all()):
            raise ValueError(f"expected decisions of shape ({batch}, {self.num_gates}) with values 0 or 1; "
                             f"got shape {tuple(keep.shape)}")
        return keep.bool()

    def _output(self, x: Tensor, keep: Tensor, table: MacTable) -> RivalOutput:
        """The pass's output from the last block's activations ``x`` and the decisions ``keep`` (B, N)."""
        dec = keep.float()
        return RivalOutput(self._head(x), dec, table.per_image(dec))


def _run_masked(block: ResidualBlock, x: Tensor, keep: Tensor) -> Tensor:
    s = block.shortcut(x)
    return torch.where(keep.view(-1, 1, 1, 1), block.merge(block.residual(x), s), s)
