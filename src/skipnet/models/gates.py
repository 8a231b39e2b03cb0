"""Gate designs (SPEC §3).

A *gate bank* holds the gates of all N gated blocks of a network. It computes, for gated block ``i`` and
its input ``x`` (B, C_i, H, W), one logit per image: ``p_i = sigmoid(logit)`` is the probability of running
the block. Deciding (straight-through, sampling, thresholding) happens elsewhere (:mod:`.decisions`).

Gates that carry state (the RNN gate) get it passed in and return it -- nothing is stored on the module,
so a model is re-entrant and safe under DDP and ``torch.compile``. The RNN gate's arithmetic is one function,
:func:`rnn_gate`, which the module and the inference op ``skipnet::rnn_gate_step``'s reference implementation
(:mod:`skipnet.ops`) both call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATE_TYPES = ("rnn", "ffgate1", "ffgate2")


class GateBank(nn.Module):
    """Base class: ``init_state`` then ``forward(x, i, state) -> (logits (B,), state)`` for i = 0..N-1."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.channels = list(channels)

    @property
    def num_gates(self) -> int:
        return len(self.channels)

    def init_state(self, x: Tensor) -> Any:
        return None

    def forward(self, x: Tensor, index: int, state: Any) -> tuple[Tensor, Any]:  # pragma: no cover
        raise NotImplementedError

    def layers(self, index: int) -> list[nn.Module]:  # pragma: no cover
        """The layers gate ``index`` applies, in order (for compute accounting)."""
        raise NotImplementedError

    def output_layers(self) -> list[nn.Linear]:  # pragma: no cover
        """Every layer that produces a logit (scaling them by 1/T sharpens or flattens every gate once)."""
        raise NotImplementedError

    def output_biases(self) -> list[nn.Parameter]:
        """The bias of every layer that produces a logit: adding d to all of them moves every gate's decision
        threshold by -d (what a compute controller steers)."""
        return [layer.bias for layer in self.output_layers()]


class _GlobalMeanPool(torch.autograd.Function):
    """``x.mean((2, 3))`` whose backward returns the gradient broadcast over H and W (a stride-0 view)
    instead of autograd's materialised (B, C, H, W) division: a gate's input also feeds its block, and
    autograd adds the view into that gradient in the pass it makes anyway."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        return x.mean((2, 3))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        b, c, h, w = ctx.shape
        return (grad / (h * w)).view(b, c, 1, 1).expand(b, c, h, w)


def global_mean_pool(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C): the gates' global average pool."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GlobalMeanPool.apply(x)
    return x.mean((2, 3))


class _FFGate(nn.Module):
    """One feed-forward gate: conv layers, global average pool, linear C -> 1 logit."""

    def __init__(self, channels: int, design: str):
        super().__init__()
        layers: list[nn.Module] = []
        if design == "ffgate1":
            # 2x2 max-pool -> 3x3 conv s1 + BN + ReLU -> 3x3 conv s2 + BN + ReLU
            layers += [nn.MaxPool2d(2)]
            layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True)]
        layers += [nn.Conv2d(channels, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        z = global_mean_pool(self.features(x))  # (B, C)
        return self.fc(z).squeeze(1)  # (B,)


class FFGateBank(GateBank):
    """FFGate-I (``ffgate1``) or FFGate-II (``ffgate2``): independent parameters per gated block."""

    def __init__(self, channels: list[int], design: str = "ffgate1"):
        super().__init__(channels)
        if design not in ("ffgate1", "ffgate2"):
            raise ValueError(f"unknown feed-forward gate design {design!r}; expected 'ffgate1' or 'ffgate2'")
        self.design = design
        self.gates = nn.ModuleList(_FFGate(c, design) for c in channels)

    def forward(self, x: Tensor, index: int, state: Any) -> tuple[Tensor, Any]:
        return self.gates[index](x), state

    def layers(self, index: int) -> list[nn.Module]:
        return [self.gates[index].features, self.gates[index].fc]

    def output_layers(self) -> list[nn.Linear]:
        return [g.fc for g in self.gates]


class RNNGateBank(GateBank):
    """RNNGate: per block GAP + linear C -> embed; one LSTM cell shared by all gates; shared linear -> logit.

    The LSTM state (h, c) starts at zero for every image and is threaded through the forward pass.
    """

    def __init__(self, channels: list[int], embed_dim: int = 10, hidden_dim: int = 10):
        super().__init__(channels)
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        self.proj = nn.ModuleList(nn.Linear(c, embed_dim) for c in channels)
        self.rnn = nn.LSTMCell(embed_dim, hidden_dim)
        self.fc = nn.Linear(hidden_dim, 1)

    def init_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = x.new_zeros(x.shape[0], self.hidden_dim)
        return h, h

    def forward(self, x: Tensor, index: int, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Any]:
        proj = self.proj[index]
        rnn = self.rnn
        logit, h, c = rnn_gate(global_mean_pool(x), state[0], state[1], proj.weight, proj.bias, rnn.weight_ih,
                               rnn.weight_hh, rnn.bias_ih, rnn.bias_hh, self.fc.weight, self.fc.bias)
        return logit, (h, c)  # logits (B,)

    def layers(self, index: int) -> list[nn.Module]:
        return [self.proj[index], self.rnn, self.fc]

    def output_layers(self) -> list[nn.Linear]:
        return [self.fc]


def rnn_gate(pooled: Tensor, h: Tensor, c: Tensor, w_p: Tensor, b_p: Tensor, w_ih: Tensor, w_hh: Tensor,
             b_ih: Tensor, b_hh: Tensor, w_fc: Tensor, b_fc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One RNN gate step from the pooled gate input (B, C) and the LSTM state ``h``, ``c`` (B, H): the
    projection to the embedding (B, E), one LSTM cell step (what :class:`torch.nn.LSTMCell` runs) and the output
    layer. Returns the logits (B,) and the new ``h``, ``c``."""
    e = F.linear(pooled, w_p, b_p)  # (B, E)
    h, c = torch.lstm_cell(e, (h, c), w_ih, w_hh, b_ih, b_hh)  # (B, H) each
    return F.linear(h, w_fc, b_fc).squeeze(1), h, c


def build_gates(kind: str, channels: list[int], embed_dim: int = 10, hidden_dim: int = 10) -> GateBank:
    """Build the gate bank ``kind`` (one of :data:`GATE_TYPES`) for blocks with these input channels."""
    if kind == "rnn":
        return RNNGateBank(channels, embed_dim, hidden_dim)
    if kind in ("ffgate1", "ffgate2"):
        return FFGateBank(channels, kind)
    raise ValueError(f"unknown gate type {kind!r}; expected one of {GATE_TYPES} (or 'none' for a plain ResNet)")


