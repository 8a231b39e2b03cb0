"""Analytic compute accounting (SPEC §6).

A :class:`MacTable` is built once per model and input size from the layer shapes alone (convolutions,
linear layers and the LSTM cell; BatchNorm, activations and pooling are not counted). Per-image MACs are
then a dot product with the decisions:

    MACs = stem + first block + sum_i [g_i * F_i + (1 - g_i) * S_i] + sum_i gate_i + classifier

where F_i is the whole block i (residual branch + shortcut) and S_i its shortcut (0 for the identity, the
1x1 projection for a transition block). Gates are charged for every image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor, nn


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_macs(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int, int]:
    """MACs of ``conv`` on an (h, w) input, and its output size."""
    kh, kw = _pair(conv.kernel_size)
    sh, sw = _pair(conv.stride)
    ph, pw = _pair(conv.padding)  # type: ignore[arg-type]
    dh, dw = _pair(conv.dilation)
    oh, ow = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    macs = conv.out_channels * (conv.in_channels // conv.groups) * kh * kw * oh * ow
    return macs, oh, ow


def pool_size(pool: nn.MaxPool2d | nn.AvgPool2d, h: int, w: int) -> tuple[int, int]:
    kh, kw = _pair(pool.kernel_size)
    sh, sw = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    ph, pw = _pair(pool.padding)
    return _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)


def chain_macs(modules: list[nn.Module], h: int, w: int) -> tuple[int, int, int]:
    """MACs of modules applied one after the other (conv, pooling, shape-preserving layers), and the output
    size. Linear layers are counted as applied to a pooled vector."""
    total = 0
    for m in modules:
        if isinstance(m, nn.Conv2d):
            macs, h, w = conv_macs(m, h, w)
            total += macs
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            h, w = pool_size(m, h, w)
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, nn.LSTMCell):
            total += 4 * m.hidden_size * (m.input_size + m.hidden_size)
        elif isinstance(m, (nn.Sequential, nn.ModuleList)):
            macs, h, w = chain_macs(list(m), h, w)
            total += macs
    return total, h, w


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.bool, torch.uint8)


@dataclass(frozen=True)
class MacTable:
    """Per-part MACs for one model and input size. Gated block i (i = 0..N-1) is network block i + 1."""

    input_size: tuple[int, int]
    stem: int
    first_block: int
    block_full: tuple[int, ...]  # F_i: residual branch + shortcut
    block_skip: tuple[int, ...]  # S_i: the shortcut alone (0 for the identity)
    gates: tuple[int, ...]  # per gate, charged for every image
    head: int

    @property
    def num_gates(self) -> int:
        return len(self.block_full)

    @property
    def plain(self) -> int:
        """MACs per image of the plain (ungated) ResNet: every block, no gates."""
        return self.stem + self.first_block + sum(self.block_full) + self.head

    @property
    def dense(self) -> int:
        """MACs per image of the SkipNet with every block executed (gates included)."""
        return self.plain + sum(self.gates)

    @property
    def conv_plain(self) -> int:
        """Convolution MACs of the plain network (the SPEC's reference totals exclude the classifier)."""
        return self.plain - self.head

    def per_image(self, decisions: Tensor) -> Tensor:
        """Per-image MACs (B,) for decisions (B, N) with values in [0, 1] (fractional: expected MACs)."""
        if decisions.dim() != 2 or decisions.shape[1] != self.num_gates:
            raise ValueError(f"expected decisions of shape (B, {self.num_gates}), got {tuple(decisions.shape)}")
        if decisions.device.type == "cpu" and type(decisions) is Tensor and decisions.dtype in _NUMPY_DTYPES:
            # NumPy: a few us less per call (this runs once per inference pass)
            d = decisions.detach().numpy()
            return torch.from_numpy(self._skip_all + d.astype(np.float64, copy=False) @ self._delta_np)
        dtype = torch.float32 if decisions.device.type == "mps" else torch.float64
        key = (dtype, decisions.device)
        delta = self._deltas.get(key)
        if delta is None:  # F_i - S_i as a tensor, made once per dtype and device
            delta = self._deltas[key] = torch.from_numpy(self._delta_np).to(device=decisions.device, dtype=dtype)
        return self._skip_all + decisions.detach().to(dtype) @ delta

    @cached_property
    def _skip_all(self) -> int:
        """MACs per image when every gated block is skipped (gates included)."""
        return self.stem + self.first_block + sum(self.block_skip) + sum(self.gates) + self.head

    @cached_property
    def _deltas(self) -> dict:
        return {}

    @cached_property
    def _delta_np(self) -> np.ndarray:
        """F_i - S_i: the MACs that running gated block i adds (float64, exact below 2^53)."""
        return np.array([f - s for f, s in zip(self.block_full, self.block_skip)], dtype=np.float64)


def computation_percentage(decisions: Tensor) -> float:
    """The authors' "computation percentage": (1 + sum_i execution rate_i) / (N + 1), in [0, 1].

    ``decisions``: (B, N) hard decisions of one evaluation set."""
    n = decisions.shape[1]
    rates = decisions.detach().float().mean(0)
    return float((1.0 + rates.sum()) / (n + 1))


def build_mac_table(model: nn.Module, input_size: tuple[int, int]) -> MacTable:
    """Build the table for a :class:`~skipnet.models.SkipResNet` (or any model with the same parts:
    ``stem_layers()``, ``blocks``, ``gates`` with ``layers(i)``, ``fc``) on inputs of ``input_size``."""
    h, w = input_size
    stem, h, w = chain_macs(model.stem_layers(), h, w)
    full, skip, gates = [], [], []
    first = 0
    for i, block in enumerate(model.blocks):
        if i > 0 and model.gates is not None:
            gates.append(chain_macs(model.gates.layers(i - 1), h, w)[0])
        convs = [m for name, m in block.named_children() if name != "downsample"]
        res, oh, ow = chain_macs(convs, h, w)
        short = chain_macs([block.downsample], h, w)[0] if block.downsample is not None else 0
        if i == 0:
            first = res + short
        else:
            full.append(res + short)
            skip.append(short)
        h, w = oh, ow
    if model.gates is None:
        gates = [0] * len(full)
    head = model.fc.in_features * model.fc.out_features
    return MacTable((input_size[0], input_size[1]), stem, first, tuple(full), tuple(skip), tuple(gates), head)


# --- the rivals (SPEC §10): ACT's per-image halting and SACT's per-position halting ----------------------------

def residual_convs(block: nn.Module) -> list[nn.Conv2d]:
    """The convolutions of a block's residual branch, in order (the projection shortcut excluded)."""
    return [m for name, m in block.named_children() if isinstance(m, nn.Conv2d) and name != "downsample"]


def conv_macs_per_position(conv: nn.Conv2d) -> int:
    """MACs of ``conv`` per output position: out_channels x in_channels / groups x kernel area."""
    kh, kw = _pair(conv.kernel_size)
    return conv.out_channels * (conv.in_channels // conv.groups) * kh * kw


def dilate_positions(active: Tensor, conv: nn.Conv2d) -> Tensor:
    """The input positions (B, H, W) bool a stride-1 'same' convolution reads to produce its output at
    ``active`` (B, H, W): the active set grown by the kernel (a 3x3 kernel: the 3x3 neighbourhood), clipped
    to the image (zero padding is not computed)."""
    kh, kw = _pair(conv.kernel_size)
    sh, sw = _pair(conv.stride)
    ph, pw = _pair(conv.padding)  # type: ignore[arg-type]
    dh, dw = _pair(conv.dilation)
    if (sh, sw) != (1, 1) or (dh, dw) != (1, 1) or (2 * ph, 2 * pw) != (kh - 1, kw - 1):
        raise ValueError(f"per-position accounting needs stride-1, undilated 'same' convolutions; got {conv}")
    if kh == kw == 1:
        return active
    grown = torch.nn.functional.max_pool2d(active.unsqueeze(1).float(), (kh, kw), stride=1, padding=(ph, pw))
    return grown.squeeze(1) > 0


def sparse_block_macs(convs: list[nn.Conv2d], active: Tensor) -> Tensor:
    """Per-image MACs (B,) of a residual branch computed only where its output is needed: at the output
    positions ``active`` (B, H, W) bool.

    How a convolution's receptive field is charged: the last convolution runs at the active positions; each
    earlier one at the positions the next one reads, i.e. the next one's set grown by its kernel
    (:func:`dilate_positions`). A basic block (3x3, 3x3) pays its first convolution on the 3x3 neighbourhood
    of the active set and its second on the set; a bottleneck (1x1, 3x3, 1x1) pays the first 1x1 on the
    neighbourhood and the rest on the set. This is what a gather-based sparse execution computes, and the
    authors' SACT code charges the same (its first convolution under the mask max-pooled 3x3). The
    convolutions must be stride-1 'same' ones (every unit of a stage but the first)."""
    if active.dim() != 3:
        raise ValueError(f"expected active positions of shape (B, H, W); got {tuple(active.shape)}")
    need = active.bool()
    dtype = _accumulator(active.device)
    total = torch.zeros(active.shape[0], dtype=dtype, device=active.device)
    for conv in reversed(convs):
        total += need.sum((1, 2)).to(dtype) * conv_macs_per_position(conv)
        need = dilate_positions(need, conv)
    return total


def act_macs(table: MacTable, halting: tuple[int, ...] | list[int], decisions: Tensor) -> Tensor:
    """Per-image MACs (B,) of an ACT network (float64; float32 on MPS): stem, head, every block that ran and the halting
    unit after each block that ran.

    ``decisions`` (B, N): whether gated block i (network block i + 1) ran (0/1; fractional values give the
    expected MACs); the network's first block always runs. ``halting`` (N + 1,): the MACs of the halting unit
    after each network block (0 after the last block of a stage, which has none). In ACT a block either runs
    in full or its stage halted before it: no skipped-block projection is charged (a stage's first block,
    the only one with a projection, always runs)."""
    if decisions.dim() != 2 or decisions.shape[1] != table.num_gates or len(halting) != table.num_gates + 1:
        raise ValueError(f"expected decisions (B, {table.num_gates}) and {table.num_gates + 1} halting costs; got "
                         f"{tuple(decisions.shape)} and {len(halting)}")
    dtype = _accumulator(decisions.device)
    per_block = torch.tensor([f + h for f, h in zip(table.block_full, halting[1:])], dtype=dtype,
                             device=decisions.device)
    return table.stem + table.first_block + halting[0] + table.head + decisions.detach().to(dtype) @ per_block


def _accumulator(device: torch.device) -> torch.dtype:
    """float64 for MAC sums (exact below 2^53); float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


class MacTabled:
    """What a ResNet module (SkipNet or a rival) shares for its cost accounting: the stem as a layer list and
    :meth:`mac_table`, built by :func:`build_mac_table` once per input size (``self._mac_tables``, a dict
    the module sets in ``__init__``)."""

    def stem_layers(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.relu, self.maxpool]

    def mac_table(self, input_size: tuple[int, int]) -> MacTable:
        """The analytic MAC table for inputs of ``input_size`` (H, W), built once and memoised (a network
        without gates: the plain ResNet's)."""
        key = (int(input_size[0]), int(input_size[1]))
        table = self._mac_tables.get(key)
        if table is None:
            table = self._mac_tables[key] = build_mac_table(self, key)
        return table
