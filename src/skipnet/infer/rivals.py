"""Compact inference for the rivals (ACT, SACT, SDV; :mod:`skipnet.models.rivals`): the passes that
:class:`~skipnet.infer.CompactRunner` runs when its model is a :class:`~skipnet.models.rivals.RivalResNet`
(``model(x, executor="compact")`` hands the whole pass to the runner, which calls :func:`run_rival`).

A pass computes what the model's masked forward computes in eval mode, to float rounding, with the same
decisions, MACs, ponder costs and units: the halting arithmetic (:func:`~skipnet.models.act.halt_step`), the
MAC accounting and the output assembly are the model's own; only the execution differs:

* **ACT**: a stage runs unit by unit on the images still running (gathered once some have halted), each
  image's output accumulated from its units' outputs weighted as they go; an image's loop ends where it halts.
* **SACT**: a unit runs only at the positions still active (:func:`run_unit_at`): its last convolution at
  those positions, each earlier one on the positions the next one reads (the sets that
  :func:`~skipnet.cost.sparse_block_macs` charges), each computed by gathering the positions' patches and
  multiplying them by the weights (:func:`conv_at`); the halting unit's 3x3 conv likewise
  (:func:`spatial_halting_at`). It computes exactly what is charged, which on dense hardware is usually
  *slower* than the dense convolution: SACT's saving is analytic.
* **SDV**: each gated block runs on the images that keep it, by the runner's own routine for a block run by
  some images (:meth:`~skipnet.infer.CompactRunner.run_images`: gather and scatter, or past the crossover the
  whole batch with the skipped images' shortcut put back); the draws go to the host once per pass.

A unit or block run on every image of its (running) batch goes through
:meth:`~skipnet.infer.CompactRunner.run_block` (the inference merge in place).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cost import dilate_positions, residual_convs
from ..models.act import ACTResNet, Halting, SpatialHaltingUnit, halt_step
from ..models.blocks import ResidualBlock
from ..models.rivals import RivalOutput
from ..models.sdv import StochasticDepthResNet

if TYPE_CHECKING:  # (the runner imports this module)
    from .runner import CompactRunner


def run_rival(runner: CompactRunner, x: Tensor, decisions: Tensor | None = None,
              generator: torch.Generator | None = None) -> RivalOutput:
    """One compact pass of ``runner.model``, a rival in eval mode, on ``x`` (B, C, H, W): the
    :class:`~skipnet.models.rivals.RivalOutput` of ``model(x, executor="compact", ...)``. ``decisions`` and
    ``generator``: SDV's (see :class:`~skipnet.models.sdv.StochasticDepthResNet`)."""
    model = runner.model
    model.check_input(x, "compact")
    if isinstance(model, StochasticDepthResNet):
        return _sdv_pass(runner, model, x, decisions, generator)
    if not isinstance(model, ACTResNet):
        raise TypeError(f"no compact pass for {type(model).__name__}")  # pragma: no cover - the three rivals
    if decisions is not None or generator is not None:
        raise ValueError(f"{model.method.upper()} takes no decisions or generator: its halting units decide")
    table = model.mac_table((x.shape[2], x.shape[3]))
    x = model._stem(x)  # (B, C0, H', W')
    stage = _sact_stage if model.spatial else _act_stage
    halts = []
    for s in range(model.num_stages):
        x, halt = stage(runner, model, s, x)
        halts.append(halt)
    return model._output(x, halts, table)


# --- ACT: the images still running --------------------------------------------------------------------------

def _act_stage(runner: CompactRunner, model: ACTResNet, s: int, x: Tensor) -> tuple[Tensor, Halting]:
    """Stage ``s`` run unit by unit on the images still running (gathered), the output accumulated where each
    halts. Equal to the model's dense stage (``_act_dense``) in eval mode."""
    units, halts = model.stages[s], model.halting[s]
    batch, steps, eps = x.shape[0], len(units), model.config.halt_eps
    idx = torch.arange(batch, device=x.device)  # the images still running
    cum = torch.zeros(batch, dtype=torch.float32, device=x.device)
    n_run = torch.zeros(batch, dtype=torch.int64, device=x.device)
    remainder = torch.zeros(batch, dtype=torch.float32, device=x.device)
    out = None
    for k, unit in enumerate(units):
        x = runner.run_block(unit, x, pool=False)[0]  # (n, C, H, W): the running images
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


# --- SACT: the positions still active -------------------------------------------------------------------------

def _sact_stage(runner: CompactRunner, model: ACTResNet, s: int, x: Tensor) -> tuple[Tensor, Halting]:
    """Stage ``s`` run unit by unit at the positions still active (:func:`run_unit_at`), the halting conv
    likewise (:func:`spatial_halting_at`). Equal to the model's dense stage (``_sact_dense``) in eval mode."""
    units, halts = model.stages[s], model.halting[s]
    steps, eps = len(units), model.config.halt_eps
    x = runner.run_block(units[0], x, pool=False)[0]
    b, _, height, width = x.shape
    active = torch.ones((b, height, width), dtype=torch.bool, device=x.device)  # ran the current unit
    cum = torch.zeros((b, height, width), dtype=torch.float32, device=x.device)
    n_run = torch.zeros((b, height, width), dtype=torch.int64, device=x.device)
    remainder = torch.zeros_like(cum)
    out = None
    for k in range(steps):
        everywhere = bool(active.all())  # (then the dense unit computes the same, and is charged the same)
        if k > 0:
            x = runner.run_block(units[k], x, pool=False)[0] if everywhere else run_unit_at(units[k], x, active)
        last = k == steps - 1
        if last:
            h = torch.ones_like(cum)
        else:
            h = halts[k](x) if everywhere else spatial_halting_at(halts[k], x, active)
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
    return out, Halting(None, n_run, remainder, n_run.float() + remainder)


def spatial_halting_at(unit: SpatialHaltingUnit, x: Tensor, active: Tensor) -> Tensor:
    """``unit(x)`` (B, H, W) at the positions ``active`` (B, H, W) bool, zeros elsewhere: the 3x3 conv
    gathered there (:func:`conv_at`), the pooled term once per image. Eval mode, float32."""
    with torch.autocast(x.device.type, enabled=False):
        local, glob = unit.features(x)  # (B, C, H, W), (B, 1)
        where = active.nonzero(as_tuple=True)
        rows = conv_at(local.permute(0, 2, 3, 1), unit.conv, where)  # (n, 1)
        h = torch.zeros(active.shape, dtype=rows.dtype, device=x.device)
        h[where] = torch.sigmoid(rows.squeeze(1) + glob[where[0], 0])
        return h


# --- sparse (gathered) execution of a residual unit -----------------------------------------------------------

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
    after each but the last -- the structure of both block types of :mod:`skipnet.models.blocks`."""
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


# --- SDV: the images that keep a block ------------------------------------------------------------------------

def _sdv_pass(runner: CompactRunner, model: StochasticDepthResNet, x: Tensor, decisions: Tensor | None,
              generator: torch.Generator | None) -> RivalOutput:
    """The network with each gated block run only on the images that keep it (the shortcut for the others)."""
    table = model.mac_table((x.shape[2], x.shape[3]))
    x = model._stem(x)
    keep = model._keep(x.shape[0], x.device, generator, decisions)  # (B, N) bool
    run = keep.cpu().numpy()  # the routing on the host, once per pass
    counts = run.sum(0).tolist()
    x = runner.run_block(model.blocks[0], x, pool=False)[0]
    for i, block in enumerate(model.blocks[1:]):
        x = runner.run_images(block, x, run[:, i], counts[i])
    return model._output(x, keep, table)
