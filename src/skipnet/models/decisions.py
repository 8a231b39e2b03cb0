"""Decision modes (SPEC §4): turn gate logits into per-image execute/skip decisions.

Pure functions, chosen per call; the gate modules only compute logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("straight_through", "gumbel", "soft", "sample", "greedy", "all", "none", "fixed")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown decision mode {mode!r}; expected one of {MODES}")
    return mode


def bernoulli_log_prob(logits: Tensor, g: Tensor) -> Tensor:
    """log pi(g) for g ~ Bernoulli(sigmoid(logits)), computed stably from the logits."""
    return g * F.logsigmoid(logits) + (1.0 - g) * F.logsigmoid(-logits)


def decide(
    logits: Tensor,
    mode: str,
    *,
    tau: float = 0.5,
    fixed: Tensor | None = None,
    generator: torch.Generator | None = None,
    explore: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """Decide for one gate. ``logits``: (B,). Returns ``(g, log_prob)``, both (B,); ``log_prob`` is only
    given in ``sample`` mode (the log-probability of the sampled decision, differentiable w.r.t. the logits).

    * ``straight_through``: forward 1[p >= 0.5], gradient of p (``hard - p.detach() + p``);
    * ``gumbel`` (ours here, after ConvNet-AIG's training): forward g ~ Bernoulli(p) drawn as
      1[logit + L >= 0] with L logistic noise, gradient of the relaxed sigmoid(logit + L) (straight-through
      Gumbel-sigmoid at temperature 1): decisions sampled in training, trained by backpropagation;
    * ``soft``: g = p;
    * ``sample``: g ~ Bernoulli(p), no gradient through g; with ``explore`` = eps > 0, g ~ Bernoulli(p') with
      p' = (1 - eps) p + eps / 2 (bounded exploration: no gate's probability of either choice falls below
      eps / 2), and ``log_prob`` is that of p', the policy that acted;
    * ``greedy``: 1[p >= tau], no gradient;
    * ``all`` / ``none``: 1 / 0;  ``fixed``: the given (B,) decisions.
    """
    if mode == "straight_through":
        p = torch.sigmoid(logits)
        hard = (logits >= 0).to(p.dtype)
        return hard - p.detach() + p, None
    if mode == "gumbel":
        u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-6, 1 - 1e-6)
        noisy = logits + (torch.log(u) - torch.log1p(-u)).to(logits.dtype)  # logit + Logistic(0, 1)
        relaxed = torch.sigmoid(noisy)
        return (noisy >= 0).to(relaxed.dtype) - relaxed.detach() + relaxed, None
    if mode == "soft":
        return torch.sigmoid(logits), None
    if mode == "sample":
        if not 0.0 <= explore < 1.0:
            raise ValueError(f"explore is a mixing weight in [0, 1); got {explore}")
        if explore == 0.0:
            with torch.no_grad():
                g = torch.bernoulli(torch.sigmoid(logits), generator=generator)
            return g, bernoulli_log_prob(logits, g)
        p = (1.0 - explore) * torch.sigmoid(logits) + explore / 2  # in [eps/2, 1 - eps/2]: log is safe
        with torch.no_grad():
            g = torch.bernoulli(p, generator=generator)
        return g, g * torch.log(p) + (1.0 - g) * torch.log1p(-p)
    if mode == "greedy":
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"greedy threshold tau must lie in [0, 1], got {tau}")
        return (torch.sigmoid(logits.detach()) >= tau).to(logits.dtype), None
    if mode == "all":
        return torch.ones_like(logits).detach(), None
    if mode == "none":
        return torch.zeros_like(logits).detach(), None
    if mode == "fixed":
        if fixed is None:
            raise ValueError("mode 'fixed' needs decisions")
        return fixed.to(device=logits.device, dtype=logits.dtype), None
    check_mode(mode)
    raise AssertionError("unreachable")
