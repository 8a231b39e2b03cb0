"""Small stateful helpers of the HRL stage, each with a ``state_dict`` for exact resume.

* :class:`AlphaController` adapts the compute reward weight alpha so that the measured mean MACs reach a
  target fraction of the dense network (a Lagrange multiplier updated by projected dual ascent on a smoothed
  cost measurement).
* :class:`GateBaseline` is a per-gate moving average of the returns, subtracted from them (variance
  reduction; the paper uses none).
"""

from __future__ import annotations

import torch
from torch import Tensor


class AlphaController:
    """alpha <- clip(alpha + lr * (ema_cost - target), 0, alpha_max) after every step.

    ``cost``: the batch's mean MACs as a fraction of the dense network's. With ``target=None`` alpha stays
    fixed (the paper)."""

    def __init__(self, alpha: float, target: float | None, lr: float, alpha_max: float, ema: float):
        self.alpha, self.target, self.lr, self.alpha_max, self.ema = float(alpha), target, lr, alpha_max, ema
        self.cost: float | None = None

    def update(self, cost: float) -> float:
        self.cost = cost if self.cost is None else self.ema * self.cost + (1 - self.ema) * cost
        if self.target is not None:
            self.alpha = min(max(self.alpha + self.lr * (self.cost - self.target), 0.0), self.alpha_max)
        return self.alpha

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "cost": self.cost}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.cost = float(state["alpha"]), state["cost"]


class GateBaseline:
    """Per-gate exponential moving average of the returns (N,). ``value`` is None until the first update."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.value: Tensor | None = None

    def update(self, returns: Tensor) -> None:
        mean = returns.detach().mean(0).float()
        self.value = mean if self.value is None else self.momentum * self.value + (1 - self.momentum) * mean

    def state_dict(self) -> dict:
        return {"value": None if self.value is None else self.value.cpu()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.value = None if state["value"] is None else state["value"].to(device)
