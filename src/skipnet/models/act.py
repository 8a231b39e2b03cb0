"""ACT and SACT on ResNet stages (Figurnov et al., "Spatially Adaptive Computation Time for Residual
Networks", CVPR 2017, arXiv 1612.02297; ACT: Graves 2016).

Per stage of L residual units (a "block" in the paper's words), each unit l < L is followed by a halting
unit giving a score h^l in [0, 1]; the last unit's score is 1. With eps = 0.01:

    N = min{n : sum_{l<=n} h^l >= 1 - eps}           (units run; 1 <= N <= L)
    R = 1 - sum_{l<N} h^l                              (the remainder)
    output = sum_{l<N} h^l x^l + R x^N                 (the halting-weighted mean of the unit outputs)
    ponder cost rho = N + R                            (gradient through R only: N is piecewise constant)

The loss adds tau * mean(rho summed over stages) to the cross-entropy
(:func:`skipnet.train.losses.ponder_loss`). Units after the halting one are not run at inference.

* **ACT** (``method='act'``): one halting score per image, h = sigmoid(W BN(pool(x)) + b).
* **SACT** (``method='sact'``): one per spatial position, h = sigmoid(conv3x3(BN(x)) + W BN(pool(x)) + b);
  a position that halted keeps its value (the later units' output there is their input), and the ponder
  cost of a stage is its ponder map N + R averaged over positions.

Choices, each the authors' (their TensorFlow code, github.com/mfigurnov/sact) where the paper is silent:

* **The first unit of every stage always runs, also in ACT**: a halting score is computed *after* a unit, so
  N >= 1, and the first unit -- the downsampling one -- may be the halting one (N = 1 when h^1 >= 1 - eps).
  (SkipNet, by contrast, may skip a stage's first block and pay its projection.)
* The halting units put BatchNorm on their input (pooled vector; SACT: also the map before the 3x3 conv),
  and their bias starts at -3 (h ~ 0.05: every unit runs at first), as the authors' code does.
* Halting scores are computed in float32, also under autocast (a threshold on a sum of bf16 scores would
  move by their rounding).
* Training runs every unit on every image (SACT: at every position) and weighs the outputs -- the authors'
  non-early-stopping variant; every parameter gets a gradient at every step (DDP needs it) and BatchNorm
  sees the whole batch. Inference (``executor='compact'``, eval mode) is the compact runner's
  (:class:`skipnet.infer.CompactRunner`; the passes in :mod:`skipnet.infer.rivals`): it runs a unit only on
  the images still running (ACT) or at the positions still active (SACT), and equals the weighted computation
  (``executor='masked'``, this module) to float tolerance. This module keeps what both share: the halting
  arithmetic, the halting units, the MAC accounting and the assembly of the output.

MACs are counted from the same per-layer table as SkipNet's (:mod:`skipnet.cost`), halting units included:
ACT per image by the units it ran (:func:`~skipnet.cost.act_macs`); SACT per position
(:func:`~skipnet.cost.sparse_block_macs`: a unit's last convolution at the active positions, each earlier one
on the positions the next one reads -- its 3x3 neighbourhood -- the authors' charging; the halting 3x3 conv
at the positions that ran the unit, the pooled linear once per image). SACT's compact execution gathers
each convolution's patches at those positions and multiplies them (:func:`skipnet.infer.rivals.run_unit_at`):
it computes exactly what is charged, which on dense hardware is usually *slower* than the dense convolution --
SACT's saving is analytic, and its measured time is reported as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..cost import MacTable, act_macs, conv_macs_per_position, residual_convs, sparse_block_macs
from .rivals import RivalConfig, RivalOutput, RivalResNet

HALT_BIAS = -3.0  # initial bias of every halting unit (the authors' INIT_BIAS): h ~ 0.047


# --- the halting arithmetic (pure) ------------------------------------------------------------------------------

@dataclass
class Halting:
    """The halting of one stage, per image (ACT) or per position (SACT): leading shape (...).

    ``weights`` (..., L): the halting distribution -- h^l before the halting unit, R at it, 0 after (None
    from the compact passes of :mod:`skipnet.infer.rivals`, which weigh each unit's output as they go);
    ``units`` (...): N, the number of units run (int64, 1-based); ``remainder`` (...): R;
    ``ponder`` (...): N + R, differentiable through R."""

    weights: Tensor | None
    units: Tensor
    remainder: Tensor
    ponder: Tensor


def halt_step(cum: Tensor, h: Tensor, eps: float, last: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One unit's step: the new running sum ``cum + h``, whether the sum reached 1 - eps (always at the last
    unit), and the unit's weight if it is still running: R = 1 - cum where it halts, else h. The dense and the
    compact computations (:mod:`skipnet.infer.rivals`) share it, so they take the same decisions from the same
    float operations."""
    c = cum + h
    stop = torch.ones_like(c, dtype=torch.bool) if last else c.detach() >= 1.0 - eps
    return c, stop, torch.where(stop, 1.0 - cum, h)


def halting_distribution(h: Tensor, eps: float = 0.01) -> Halting:
    """N, R, the halting distribution and the ponder cost from the halting scores ``h`` (..., L - 1) of
    units 1..L-1 (the last unit's score is 1 by definition; scores after the halting unit are ignored).
    The running sum is accumulated unit by unit in ``h``'s dtype."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps lies in (0, 1); got {eps}")
    lead = h.shape[:-1]
    steps = h.shape[-1] + 1
    cum = h.new_zeros(lead)
    running = torch.ones(lead, dtype=torch.bool, device=h.device)
    units = torch.zeros(lead, dtype=torch.int64, device=h.device)
    remainder = h.new_zeros(lead)
    weights = []
    for k in range(steps):
        last = k == steps - 1
        cum_next, stop, w = halt_step(cum, h.new_ones(lead) if last else h[..., k], eps, last)
        stop = stop & running
        weights.append(torch.where(running, w, torch.zeros_like(w)))
        remainder = torch.where(stop, w, remainder)
        units = torch.where(stop, torch.full_like(units, k + 1), units)
        running = running & ~stop
        cum = cum_next
    return Halting(torch.stack(weights, -1), units, remainder, units.to(h.dtype) + remainder)


# --- halting units ------------------------------------------------------------------------------------------------

class HaltingUnit(nn.Module):
    """ACT's halting unit: h = sigmoid(W BN(pool(x)) + b), one score per image (B,), in float32."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.fc = nn.Linear(channels, 1)
        nn.init.constant_(self.fc.bias, HALT_BIAS)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return torch.sigmoid(self.fc(self.bn(x.float().mean((2, 3))))).squeeze(1)  # (B,)

    def macs(self) -> int:
        return self.fc.in_features * self.fc.out_features


class SpatialHaltingUnit(nn.Module):
    """SACT's halting unit: h = sigmoid(conv3x3(BN(x)) + W BN(pool(x)) + b), one score per position
    (B, H, W), in float32. (Compact inference computes the 3x3 conv only at the positions still active:
    :func:`skipnet.infer.rivals.spatial_halting_at`, from the same :meth:`features`.)"""

    def __init__(self, channels: int):
        super().__init__()
        self.local_bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, 1, 3, padding=1, bias=True)
        self.global_bn = nn.BatchNorm1d(channels)
        self.fc = nn.Linear(channels, 1, bias=False)  # (the bias is the conv's)
        nn.init.constant_(self.conv.bias, HALT_BIAS)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """What the score is computed from, in float32 (call with autocast off): the map the 3x3 conv reads,
        BN(x) (B, C, H, W), and the pooled term W BN(pool(x)) (B, 1) added to the conv's output."""
        x = x.float()
        return self.local_bn(x), self.fc(self.global_bn(x.mean((2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            local, glob = self.features(x)
            return torch.sigmoid(self.conv(local).squeeze(1) + glob[:, :, None])  # (B, H, W)

    def macs_per_position(self) -> int:
        return conv_macs_per_position(self.conv)

    def macs_per_image(self) -> int:
        return self.fc.in_features * self.fc.out_features


# --- the network ----------------------------------------------------------------------------------------------------

class ACTResNet(RivalResNet):
    """A ResNet with ACT (``config.method == 'act'``) or SACT (``'sact'``) halting in every stage.

    ``forward(x, executor='masked'|'compact')`` returns a :class:`~skipnet.models.rivals.RivalOutput` with the
    ponder cost for the loss. The halting units live under ``halting.<stage>.<unit>``; the backbone has the
    plain ResNet's parameter names."""

    def __init__(self, config: RivalConfig):
        super().__init__(config)
        if config.method not in ("act", "sact"):
            raise ValueError(f"ACTResNet builds methods 'act' and 'sact'; got {config.method!r}")
        self.spatial = config.method == "sact"
        unit = SpatialHaltingUnit if self.spatial else HaltingUnit
        self.halting = nn.ModuleList(
            nn.ModuleList(unit(residual_convs(b)[-1].out_channels) for b in stage[:-1]) for stage in self.stages)
        for stage in self.stages:
            if any(b.downsample is not None for b in stage[1:]):  # pragma: no cover - not in our layouts
                raise ValueError("only the first unit of a stage may change the resolution or width")
        # the halting unit after each network block (ACT: MACs per image; 0 after a stage's last block)
        self._halting_macs = tuple(
            (0 if self.spatial else self.halting[s][k].macs()) if k < len(stage) - 1 else 0
            for s, stage in enumerate(self.stages) for k in range(len(stage)))

    def forward(self, x: Tensor, *, executor: str = "masked") -> RivalOutput:
        """Run the network on ``x`` (B, C, H, W). ``executor``: ``masked`` (every unit on the whole batch,
        outputs weighted by the halting distribution; training) or ``compact`` (eval only: the compact runner,
        :class:`skipnet.infer.CompactRunner` -- ACT runs a unit only on the images still running, SACT only at
        the positions still active)."""
        if executor == "compact":
            from ..infer import compact_runner  # (infer builds on models: imported when first needed)

            return compact_runner(self)(x)
        self.check_input(x, executor)
        table = self.mac_table((x.shape[2], x.shape[3]))
        x = self._stem(x)  # (B, C0, H', W')
        halts = []
        for s in range(self.num_stages):
            x, halt = (self._sact_dense if self.spatial else self._act_dense)(s, x)
            halts.append(halt)
        return self._output(x, halts, table)

    def _output(self, x: Tensor, halts: list[Halting], table: MacTable) -> RivalOutput:
        """The pass's output from the last stage's activations ``x`` and each stage's halting (per image, SACT
        per position): the masked forward's and the compact runner's alike."""
        units_run = [halt.units for halt in halts]  # (B,) or (B, H, W) per stage
        ponder = torch.stack([h.ponder.mean((1, 2)) if self.spatial else h.ponder for h in halts], 1).sum(1)  # (B,)
        decisions = self._decisions(units_run)  # (B, N)
        if self.spatial:
            macs = [self._sact_stage_macs(s, n, table) for s, n in enumerate(units_run)]
            total = table.stem + table.head + torch.stack(macs, 1).sum(1)
            units = torch.stack([u.float().mean((1, 2)) for u in units_run], 1)  # (B, S)
            maps = [halt.ponder.detach() for halt in halts]
        else:
            total = act_macs(table, self._halting_macs, decisions)
            units = torch.stack(units_run, 1)
            maps = None
        return RivalOutput(self._head(x), decisions, total, ponder, units, maps)

    def _decisions(self, units_run: list[Tensor]) -> Tensor:
        """(B, N): for each of SkipNet's gated blocks, whether it ran (SACT: on what share of the positions).
        A stage's first unit always runs."""
        cols = []
        for s, stage in enumerate(self.stages):
            n = units_run[s]  # (B,) or (B, H, W)
            for k in range(len(stage)):
                if s == 0 and k == 0:
                    continue  # the network's first block: not a gated block
                ran = (n > k).float()
                cols.append(ran.mean((1, 2)) if ran.dim() == 3 else ran)
        return torch.stack(cols, 1).detach()

    # --- ACT ---
    def _act_dense(self, s: int, x: Tensor) -> tuple[Tensor, Halting]:
        units, halts = self.stages[s], self.halting[s]
        states, scores = [], []
        for k, unit in enumerate(units):
            x = unit(x)
            states.append(x)
            if k < len(units) - 1:
                scores.append(halts[k](x))  # (B,)
        h = torch.stack(scores, -1) if scores else x.new_zeros((x.shape[0], 0), dtype=torch.float32)
        halt = halting_distribution(h, self.config.halt_eps)
        out = halt.weights[:, 0].view(-1, 1, 1, 1) * states[0]
        for k in range(1, len(states)):
            out = torch.addcmul(out, halt.weights[:, k].view(-1, 1, 1, 1), states[k])
        return out, halt

    # --- SACT ---
    def _sact_dense(self, s: int, x: Tensor) -> tuple[Tensor, Halting]:
        units, halts = self.stages[s], self.halting[s]
        eps = self.config.halt_eps
        x = units[0](x)
        states, scores = [x], []
        cum = None
        for k in range(1, len(units)):
            h = halts[k - 1](x)  # (B, H, W), after unit k - 1
            scores.append(h)
            cum = h if cum is None else cum + h
            active = (cum.detach() < 1.0 - eps).unsqueeze(1)  # the positions that run unit k
            x = torch.where(active, units[k](x), x)  # a position that halted keeps its value
            states.append(x)
        b, _, height, width = x.shape
        h = torch.stack(scores, -1) if scores else x.new_zeros((b, height, width, 0), dtype=torch.float32)
        halt = halting_distribution(h, eps)  # weights (B, H, W, L)
        out = halt.weights[..., 0].unsqueeze(1) * states[0]
        for k in range(1, len(states)):
            out = torch.addcmul(out, halt.weights[..., k].unsqueeze(1), states[k])
        return out, halt

    def _sact_stage_macs(self, s: int, n_run: Tensor, table: MacTable) -> Tensor:
        """Per-image MACs (B,) of stage ``s`` from its map of units run (B, H, W): the first unit dense,
        unit k at the positions with N > k (:func:`~skipnet.cost.sparse_block_macs`), the halting unit after
        unit k < L - 1 at those positions plus its pooled linear once per image that has any."""
        units, halts = self.stages[s], self.halting[s]
        first = self.blocks.index(units[0])
        full = table.first_block if first == 0 else table.block_full[first - 1]
        dtype = torch.float32 if n_run.device.type == "mps" else torch.float64
        total = torch.full((n_run.shape[0],), float(full), dtype=dtype, device=n_run.device)
        for k in range(len(units)):
            ran = n_run > k  # (B, H, W): the positions that ran unit k
            if k > 0:
                total += sparse_block_macs(residual_convs(units[k]), ran).to(dtype)
            if k < len(units) - 1:
                total += ran.sum((1, 2)).to(dtype) * halts[k].macs_per_position()
                total += ran.flatten(1).any(1).to(dtype) * halts[k].macs_per_image()
        return total
