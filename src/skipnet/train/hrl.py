"""Small stateful helpers of the HRL stage, each with a ``state_dict`` for exact resume.

* :class:`AlphaController` adapts the compute reward weight alpha so that the measured mean MACs reach a
  target fraction of the dense network (a Lagrange multiplier updated by projected dual ascent on a smoothed
  cost measurement).
* :class:`ThresholdController` steers the gates' common logit offset so that the measured cost follows a
  schedule down to a target (the straight-through compute-target mode: no reward, no multiplier).
* :class:`GateRateController` holds each gate's expected execution rate at its own target (one multiplier per
  gate; ours, after ConvNet-AIG's per-layer target rates).
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


class GateRateController:
    """Per-gate dual ascent (ours; ConvNet-AIG's per-layer target rates, held by multipliers instead of a squared
    penalty): one price ``alpha[j]`` per gate, ``alpha[j] <- clip(alpha[j] + lr * (ema_rate[j] - target[j]),
    -alpha_max, alpha_max)`` after every step, where ``rate[j]`` is the policy's expected execution rate of gate
    j (the mean probability over the batch). Each gate is held at its own rate, so no gate can settle at
    "always" or "never" unless its target says so: the gate must choose *which* images run its block. A negative
    price makes skipping cost reward (the constraint is an equality). With ``ramp_steps`` > 0 each target falls
    linearly from the gate's first measured rate (or stays, if already below) over that many steps."""

    def __init__(self, alpha: float, targets: Tensor, lr: float, alpha_max: float, ema: float,
                 ramp_steps: int = 0):
        targets = torch.as_tensor(targets, dtype=torch.float64).flatten()
        if targets.numel() == 0 or not bool(((targets >= 0) & (targets <= 1)).all()):
            raise ValueError(f"per-gate target rates are execution probabilities in [0, 1]; got {targets.tolist()}")
        self.target, self.lr, self.alpha_max, self.ema = targets, lr, alpha_max, ema
        self.alpha = torch.full_like(targets, float(alpha))
        self.ramp_steps = max(int(ramp_steps), 0)
        self.rate: Tensor | None = None
        self.start: Tensor | None = None
        self.steps = 0

    def target_now(self) -> Tensor:
        return ramped(self.target, self.start, self.steps, self.ramp_steps)

    def update(self, rates: Tensor) -> Tensor:
        rates = rates.detach().double().cpu().flatten()
        if rates.shape != self.target.shape:
            raise ValueError(f"expected {self.target.numel()} gate rates; got {rates.numel()}")
        self.rate = rates if self.rate is None else self.ema * self.rate + (1 - self.ema) * rates
        if self.start is None:
            self.start = torch.maximum(rates, self.target)
        self.alpha = (self.alpha + self.lr * (self.rate - self.target_now())).clamp(-self.alpha_max, self.alpha_max)
        self.steps += 1
        return self.alpha

    def state_dict(self) -> dict:
        return {"alpha": self.alpha.tolist(), "rate": None if self.rate is None else self.rate.tolist(),
                "start": None if self.start is None else self.start.tolist(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        as_t = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)  # noqa: E731
        self.alpha, self.rate, self.start = as_t(state["alpha"]), as_t(state["rate"]), as_t(state["start"])
        self.steps = int(state["steps"])


def uniform_gate_rate(table, target_macs: float) -> float:
    """The one execution rate r that, at every gate, makes the expected MACs ``target_macs`` of the plain
    network (``table``: a :class:`~skipnet.cost.MacTable`; the gates' own cost counts, as everywhere)."""
    n = table.num_gates
    base = float(table.per_image(torch.zeros(1, n, dtype=torch.float64))[0])
    full = float(table.per_image(torch.ones(1, n, dtype=torch.float64))[0])
    rate = (target_macs * float(table.plain) - base) / (full - base)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"target_macs {target_macs} is out of reach of the gated blocks: for this network it "
                         f"must lie in [{base / table.plain:.3f}, {full / table.plain:.3f}]")
    return rate


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
