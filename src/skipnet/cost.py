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
