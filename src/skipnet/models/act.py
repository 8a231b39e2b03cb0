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
  sees the whole batch. Inference (``executor='compact'``, eval mode) runs a unit only on the images still
  running (ACT) or at the positions still active (SACT); both equal the weighted computation
  (``executor='masked'``) to float tolerance.

MACs are counted from the same per-layer table as SkipNet's (:mod:`skipnet.cost`), halting units included:
ACT per image by the units it ran (:func:`~skipnet.cost.act_macs`); SACT per position
(:func:`~skipnet.cost.sparse_block_macs`: a unit's last convolution at the active positions, each earlier one
on the positions the next one reads -- its 3x3 neighbourhood -- the authors' charging; the halting 3x3 conv
at the positions that ran the unit, the pooled linear once per image). SACT's compact execution gathers
each convolution's patches at those positions and multiplies them (:func:`run_unit_at`): it computes exactly
what is charged, which on dense hardware is usually *slower* than the dense convolution -- SACT's saving is
analytic, and its measured time is reported as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cost import MacTable, act_macs, conv_macs_per_position, dilate_positions, residual_convs, sparse_block_macs
from .blocks import ResidualBlock
from .rivals import RivalConfig, RivalOutput, RivalResNet

HALT_BIAS = -3.0  # initial bias of every halting unit (the authors' INIT_BIAS): h ~ 0.047


# --- the halting arithmetic (pure) ------------------------------------------------------------------------------

@dataclass
class Halting:
    """The halting of one stage, per image (ACT) or per position (SACT): leading shape (...).

    ``weights`` (..., L): the halting distribution -- h^l before the halting unit, R at it, 0 after (None
    from the compact runners, which weigh each unit's output as they go);
    ``units`` (...): N, the number of units run (int64, 1-based); ``remainder`` (...): R;
    ``ponder`` (...): N + R, differentiable through R."""

    weights: Tensor | None
    units: Tensor
    remainder: Tensor
    ponder: Tensor


def halt_step(cum: Tensor, h: Tensor, eps: float, last: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One unit's step: the new running sum ``cum + h``, whether the sum reached 1 - eps (always at the last
    unit), and the unit's weight if it is still running: R = 1 - cum where it halts, else h. The dense and the
    compact computations share it, so they take the same decisions from the same float operations."""
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
    (B, H, W), in float32. ``active`` (B, H, W) bool: compute the 3x3 conv only there (gathered; zeros
    elsewhere) -- inference, eval mode."""

    def __init__(self, channels: int):
        super().__init__()
        self.local_bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, 1, 3, padding=1, bias=True)
        self.global_bn = nn.BatchNorm1d(channels)
        self.fc = nn.Linear(channels, 1, bias=False)  # (the bias is the conv's)
        nn.init.constant_(self.conv.bias, HALT_BIAS)

    def forward(self, x: Tensor, active: Tensor | None = None) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            glob = self.fc(self.global_bn(x.mean((2, 3))))  # (B, 1)
            local = self.local_bn(x)
            if active is None:
                logit = self.conv(local).squeeze(1) + glob[:, :, None]  # (B, H, W)
                return torch.sigmoid(logit)
            where = active.nonzero(as_tuple=True)
            rows = conv_at(local.permute(0, 2, 3, 1), self.conv, where)  # (n, 1)
            h = torch.zeros(active.shape, dtype=rows.dtype, device=x.device)
            h[where] = torch.sigmoid(rows.squeeze(1) + glob[where[0], 0])
            return h

    def macs_per_position(self) -> int:
        return conv_macs_per_position(self.conv)

    def macs_per_image(self) -> int:
        return self.fc.in_features * self.fc.out_features


# --- sparse (gathered) execution of a residual unit -----------------------------------------------------------------

def conv_at(m: Tensor, conv: nn.Conv2d, where: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``conv`` (stride 1, 'same') of the map ``m`` (B, H, W, C) -- channels last -- at the positions
    ``where`` = (b, i, j) index tensors: each position's kernel-sized patch is gathered (zero padding outside
    the map) and multiplied by the weights. Returns (n, out_channels). Computes n x (MACs per position)."""
    kh, kw = conv.kernel_size
    ph, pw = conv.padding  # type: ignore[misc]
    if conv.groups != 1 or tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1) or \
            (2 * ph, 2 * pw) != (kh - 1, kw - 1):
        raise ValueError(f"gathered convolution needs a stride-1, undilated, ungrouped 'same' convolution; got {conv}")
    b, i, j = where
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (Cout, kh*kw*Cin)
    if kh == kw == 1:
        rows = m[b, i, j]  # (n, C)
    else:
        batch, height, width, channels = m.shape
        padded = F.pad(m, (0, 0, pw, pw, ph, ph))  # (B, H + 2ph, W + 2pw, C)
        hp, wp = height + 2 * ph, width + 2 * pw
        di = torch.arange(kh, device=m.device).repeat_interleave(kw)
        dj = torch.arange(kw, device=m.device).repeat(kh)
        flat = (b * (hp * wp) + i * wp + j).unsqueeze(1) + (di * wp + dj).unsqueeze(0)  # (n, kh*kw)
        rows = padded.reshape(-1, channels)[flat.reshape(-1)].reshape(b.shape[0], -1)  # (n, kh*kw*C)
    out = rows @ weight.t().to(rows.dtype)
    return out if conv.bias is None else out + conv.bias.to(out.dtype)


def _bn_affine(bn: nn.BatchNorm2d, rows: Tensor) -> Tensor:
    """Eval-mode BatchNorm on rows (n, C): its per-channel affine map."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return rows * scale.to(rows.dtype) + (bn.bias - bn.running_mean * scale).to(rows.dtype)


def residual_layers(block: ResidualBlock) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """The residual branch as (conv, BN) pairs in order (``conv1``/``bn1``, ``conv2``/``bn2``, ...), a ReLU
    after each but the last -- the structure of both block types of :mod:`.blocks`."""
    convs = residual_convs(block)
    return [(conv, getattr(block, f"bn{k + 1}")) for k, conv in enumerate(convs)]


def run_unit_at(block: ResidualBlock, x: Tensor, active: Tensor) -> Tensor:
    """``block(x)`` at the positions ``active`` (B, H, W) bool and ``x`` elsewhere (a position that halted
    keeps its value), computing each convolution only where it is needed (:func:`conv_at` on the sets of
    :func:`~skipnet.cost.sparse_block_macs`). Eval mode (BatchNorm as its affine map); the block must keep
    the resolution and have the identity shortcut (every unit of a stage but the first)."""
    if block.training:
        raise ValueError("run_unit_at is for inference: call model.eval() first")
    if block.downsample is not None:
        raise ValueError("run_unit_at runs units with the identity shortcut (not a stage's first unit)")
    layers = residual_layers(block)
    sets = [active.bool()]
    for conv, _ in reversed(layers[1:]):
        sets.insert(0, dilate_positions(sets[0], conv))
    m = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    for k, ((conv, bn), need) in enumerate(zip(layers, sets)):
        where = need.nonzero(as_tuple=True)
        rows = _bn_affine(bn, conv_at(m, conv, where))  # (n, Cout)
        if k == len(layers) - 1:
            out = x.permute(0, 2, 3, 1).clone()
            out[where] = block.merge(rows, out[where]).to(out.dtype)
            return out.permute(0, 3, 1, 2)
        m = torch.zeros(m.shape[:3] + (conv.out_channels,), dtype=rows.dtype, device=x.device)
        m[where] = torch.relu(rows)
    raise ValueError("a residual branch without convolutions")  # pragma: no cover


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
        outputs weighted by the halting distribution; training) or ``compact`` (eval only: ACT runs a unit
        only on the images still running, SACT only at the positions still active)."""
        self.check_input(x, executor)
        table = self.mac_table((x.shape[2], x.shape[3]))
        compact = executor == "compact"
        x = self._stem(x)  # (B, C0, H', W')
        units_run, ponders, maps, macs = [], [], [], []
        for s in range(self.num_stages):
            if self.spatial:
                x, halt, stage_macs = (self._sact_compact if compact else self._sact_dense)(s, x, table)
                ponders.append(halt.ponder.mean((1, 2)))
                maps.append(halt.ponder.detach())
                units_run.append(halt.units)
                macs.append(stage_macs)
            else:
                x, halt = (self._act_compact if compact else self._act_dense)(s, x)
                ponders.append(halt.ponder)
                units_run.append(halt.units)
        ponder = torch.stack(ponders, 1).sum(1)  # (B,)
        decisions = self._decisions(units_run)  # (B, N)
        if self.spatial:
            total = table.stem + table.head + torch.stack(macs, 1).sum(1)
            units = torch.stack([u.float().mean((1, 2)) for u in units_run], 1)  # (B, S)
        else:
            total = act_macs(table, self._halting_macs, decisions)
            units = torch.stack(units_run, 1)
        return RivalOutput(self._head(x), decisions, total, ponder, units, maps if self.spatial else None)

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

    def _act_compact(self, s: int, x: Tensor) -> tuple[Tensor, Halting]:
        """The stage run unit by unit on the images still running (gathered), the output accumulated where
        each halts. Equal to :meth:`_act_dense` in eval mode."""
        units, halts = self.stages[s], self.halting[s]
        batch, steps, eps = x.shape[0], len(units), self.config.halt_eps
        idx = torch.arange(batch, device=x.device)  # the images still running
        cum = torch.zeros(batch, dtype=torch.float32, device=x.device)
        n_run = torch.zeros(batch, dtype=torch.int64, device=x.device)
        remainder = torch.zeros(batch, dtype=torch.float32, device=x.device)
        out = None
        for k, unit in enumerate(units):
            x = unit(x)  # (n, C, H, W): the running images
            last = k == steps - 1
            h = torch.ones(x.shape[0], device=x.device) if last else halts[k](x)
            whole = idx.shape[0] == batch  # (every image still running: no gathers needed)
            cum_i = cum if whole else cum[idx]
            c, stop, w = halt_step(cum_i, h, eps, last)
            if out is None:
                out = w.view(-1, 1, 1, 1) * x  # (every image runs the first unit)
            elif whole:
                out = torch.addcmul(out, w.view(-1, 1, 1, 1), x)
            else:
                out = out.index_add(0, idx, w.view(-1, 1, 1, 1) * x)
            stopped = int(stop.sum())
            if whole:
                cum = c
            else:
                cum[idx] = c
            if stopped:
                n_run[idx[stop]] = k + 1
                remainder[idx[stop]] = w[stop]
            if stopped == idx.shape[0]:
                break
            if stopped:
                keep = ~stop
                idx, x = idx[keep], x[keep]
        return out, Halting(None, n_run, remainder, n_run.float() + remainder)

    # --- SACT ---
    def _sact_dense(self, s: int, x: Tensor, table: MacTable) -> tuple[Tensor, Halting, Tensor]:
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
        return out, halt, self._sact_stage_macs(s, halt.units, table)

    def _sact_compact(self, s: int, x: Tensor, table: MacTable) -> tuple[Tensor, Halting, Tensor]:
        """The stage run unit by unit at the positions still active (:func:`run_unit_at`), the halting conv
        likewise. Equal to :meth:`_sact_dense` in eval mode."""
        units, halts = self.stages[s], self.halting[s]
        steps, eps = len(units), self.config.halt_eps
        x = units[0](x)
        b, _, height, width = x.shape
        active = torch.ones((b, height, width), dtype=torch.bool, device=x.device)  # ran the current unit
        cum = torch.zeros((b, height, width), dtype=torch.float32, device=x.device)
        n_run = torch.zeros((b, height, width), dtype=torch.int64, device=x.device)
        remainder = torch.zeros_like(cum)
        out = None
        for k in range(steps):
            everywhere = bool(active.all())  # (then the dense unit computes the same, and is charged the same)
            if k > 0:
                x = units[k](x) if everywhere else run_unit_at(units[k], x, active)
            last = k == steps - 1
            h = torch.ones_like(cum) if last else halts[k](x, None if everywhere else active)
            c, stop, w = halt_step(cum, h, eps, last)
            stop = stop & active
            w = torch.where(active, w, torch.zeros_like(w))
            out = w.unsqueeze(1) * x if out is None else torch.addcmul(out, w.unsqueeze(1), x)
            cum = torch.where(active, c, cum)
            n_run = torch.where(stop, torch.full_like(n_run, k + 1), n_run)
            remainder = torch.where(stop, w, remainder)
            active = active & ~stop
            if not bool(active.any()):
                break
        halt = Halting(None, n_run, remainder, n_run.float() + remainder)
        return out, halt, self._sact_stage_macs(s, n_run, table)

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
