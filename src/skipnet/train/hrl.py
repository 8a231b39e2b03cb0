"""Small stateful helpers of the HRL stage, each with a ``state_dict`` for exact resume.

* :class:`AlphaController` adapts the compute reward weight alpha so that the measured mean MACs reach a
  target fraction of the dense network (a Lagrange multiplier updated by projected dual ascent on a smoothed
  cost measurement).
* :class:`ThresholdController` steers the gates' common logit offset so that the measured cost follows a
  schedule down to a target (the straight-through compute-target mode: no reward, no multiplier).
* :class:`GateBaseline` is a per-gate moving average of the returns, subtracted from them (variance
  reduction; the paper uses none).
"""

from __future__ import annotations

import torch
from torch import Tensor


def ramped(target: float | None, start: float | None, steps: int, ramp_steps: int) -> float | None:
    """A target that falls linearly from ``start`` (the first measured cost) to ``target`` over ``ramp_steps``
    steps, then stays there; ``target`` itself before anything was measured."""
    if target is None or start is None or steps >= ramp_steps:
        return target
    return start + (target - start) * steps / ramp_steps


class AlphaController:
    """Projected dual ascent: alpha <- clip(alpha + lr * (ema_cost - target_now), 0, alpha_max) after every step.

    ``cost``: the step's MACs as a fraction of the plain network's. With ``target=None`` alpha stays fixed
    (the paper). With ``ramp_steps`` > 0 the target falls linearly from the first measured cost to ``target``
    over that many steps, so that the policy follows a slowly moving budget instead of overshooting it."""

    def __init__(self, alpha: float, target: float | None, lr: float, alpha_max: float, ema: float,
                 ramp_steps: int = 0):
        self.alpha, self.target, self.lr, self.alpha_max, self.ema = float(alpha), target, lr, alpha_max, ema
        self.ramp_steps = max(int(ramp_steps), 0)
        self.cost: float | None = None
        self.start: float | None = None
        self.steps = 0

    def target_now(self) -> float | None:
        return ramped(self.target, self.start, self.steps, self.ramp_steps)

    def update(self, cost: float) -> float:
        self.cost = cost if self.cost is None else self.ema * self.cost + (1 - self.ema) * cost
        if self.target is not None:
            if self.start is None:
                self.start = max(cost, self.target)
            self.alpha = min(max(self.alpha + self.lr * (self.cost - self.target_now()), 0.0), self.alpha_max)
        self.steps += 1
        return self.alpha

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "cost": self.cost, "start": self.start, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.cost = float(state["alpha"]), state["cost"]
        self.start, self.steps = state.get("start"), int(state.get("steps", 0))


def needed_shift(logits: Tensor, saved: Tensor, budget: float) -> float:
    """The shift s to add to every gate logit so that the decisions ``logits + s >= 0`` of this batch spend
    ``budget`` (mean per image) on the gated blocks' residual branches, whose cost per block is ``saved`` (N,).

    ``logits``: (B, N). Decisions are treated as independent (in the network, skipping a block changes the
    next gates' inputs; the controller takes only part of each shift and measures again). The shift puts the
    threshold halfway between the last pair that runs and the first that does not."""
    z = logits.detach().double().flatten()
    w = saved.detach().double().to(z.device).expand(logits.shape).flatten() / logits.shape[0]
    order = torch.argsort(z, descending=True)
    z, spent = z[order], torch.cumsum(w[order], 0)
    k = int(torch.searchsorted(spent, torch.tensor(budget, dtype=spent.dtype, device=spent.device), right=True))
    if k == 0:
        return float(-z[0]) - 1.0  # not even the most wanted block fits: close everything
    if k == z.numel():
        return float(-z[-1]) + 1.0  # everything fits: open everything
    return float(-(z[k - 1] + z[k]) / 2)


class ThresholdController:
    """Moves every gate's threshold so that the batch cost follows a schedule down to ``target``.

    After each step, :meth:`update` gets the batch's gate logits; :func:`needed_shift` says how far all logits
    would have to move for this batch to spend the scheduled budget, and the controller takes ``gain`` of that
    (at most ``max_step`` in logit units). The caller adds the returned change to the gates' output biases,
    so it acts at the very next step: no optimiser momentum sits between the controller and the cost (what
    made the reward weight alpha overshoot), and the step scales with how densely the logits sit at the
    threshold. The target falls linearly from the first measured cost to ``target`` over ``ramp_steps``
    steps, which gives the network time to adapt. Which images skip which blocks is left to the gates."""

    def __init__(self, target: float, ramp_steps: int, gain: float, max_step: float = 0.5):
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target is a fraction of the dense MACs in (0, 1]; got {target}")
        if not 0.0 < gain <= 1.0:
            raise ValueError(f"gain is the share of the needed shift taken per step, in (0, 1]; got {gain}")
        self.target, self.ramp_steps, self.gain, self.max_step = float(target), max(int(ramp_steps), 0), gain, max_step
        self.start: float | None = None  # the first measured cost: where the ramp begins
        self.offset = 0.0  # total change made so far (logit units)
        self.steps = 0

    def target_now(self) -> float:
        return ramped(self.target, self.start, self.steps, self.ramp_steps)

    def update(self, cost: float, logits: Tensor, saved: Tensor, base: float) -> float:
        """Feed one step: its measured ``cost`` (fraction of ``dense``), gate ``logits`` (B, N), the per-block
        ``saved`` MACs (N,) and the ``base`` MACs every image spends, both as fractions of the dense network.
        Returns the change to add to every logit."""
        if self.start is None:
            self.start = max(cost, self.target)
        shift = needed_shift(logits, saved, self.target_now() - base)
        delta = max(-self.max_step, min(self.max_step, self.gain * shift))
        self.offset += delta
        self.steps += 1
        return delta

    def state_dict(self) -> dict:
        return {"start": self.start, "offset": self.offset, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.offset, self.steps = state["start"], float(state["offset"]), int(state["steps"])


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
