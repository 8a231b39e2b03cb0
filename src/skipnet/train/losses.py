"""Training objectives as pure functions (SPEC §5).

* :func:`sp_loss` -- supervised pre-training: plain cross-entropy (the straight-through gates get their
  gradient through the decisions).
* :func:`hrl_loss` -- hybrid REINFORCE: cross-entropy on the sampled path plus a REINFORCE term in which
  each gate's log-probability is weighted by its own return

      r_{b,i} = -beta * CE_b + (alpha / N) * sum_{j >= i} (1 - g_{b,j}) * C_j

  (CE_b detached, no discount), optionally minus a per-gate baseline. Each image's returns multiply that
  image's own log-probabilities; the batch reduction of the REINFORCE term is explicit.
* :func:`target_rate_loss` -- ConvNet-AIG's target-rate loss (ours here, in SP and HRL): each gate's mean
  probability over the batch pulled to its target execution rate, mean_j (mean_b p_{b,j} - t_j)^2.
* :func:`distill_loss` -- in-place distillation (ours here, in HRL; Yu & Huang's slimmable networks): the
  KL divergence of a path's prediction from the all-blocks path's, the teacher not differentiated.
* :func:`ponder_loss` -- ACT / SACT (the rivals, SPEC §10): cross-entropy plus tau times the ponder cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum")


def sp_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels)


def target_rate_loss(probs: Tensor, targets: Tensor | float) -> Tensor:
    """mean_j (mean_b p_{b,j} - t_j)^2 for gate probabilities ``probs`` (B, N) and targets (N,) or one number,
    computed in float32."""
    return (probs.float().mean(0) - targets).square().mean()


def distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) per image, averaged over the batch, in float32; no gradient
    reaches ``teacher``."""
    target = F.log_softmax(teacher.detach().float(), 1)
    return F.kl_div(F.log_softmax(student.float(), 1), target, reduction="batchmean", log_target=True)


def per_gate_returns(
    ce: Tensor, decisions: Tensor, *, alpha: float | Tensor, beta: float, costs: Tensor | None = None,
    cap: float | None = None,
) -> Tensor:
    """Returns r (B, N): ``-beta * ce[:, None] + alpha * min(reverse_cumsum((1 - g) * C) / N, cap)``.

    ``ce``: per-image loss (B,), treated as a constant; ``decisions``: the sampled g (B, N);
    ``costs``: C_j (N,), all ones (the paper) when None. ``alpha``: one weight (the paper), or one per gate
    (N,), alpha_j pricing gate j's skips: ``reverse_cumsum(alpha * (1 - g) * C) / N`` (per-gate budgets, ours).
    ``cap`` (None: the paper) bounds the skip reward
    an image can earn: skipping beyond ``cap`` (a fraction of the N blocks' cost) earns nothing more, so the
    policy has no reason to collapse past a compute budget."""
    if decisions.dim() != 2 or ce.shape != decisions.shape[:1]:
        raise ValueError(f"expected ce (B,) and decisions (B, N); got {tuple(ce.shape)} and {tuple(decisions.shape)}")
    n = decisions.shape[1]
    skipped = 1.0 - decisions.detach()
    if costs is not None:
        skipped = skipped * costs.to(skipped)
    per_gate = isinstance(alpha, Tensor) and alpha.dim() == 1
    if per_gate:  # one weight per gate (per-gate budgets): each skip is paid at its own gate's price
        if alpha.shape != (n,):
            raise ValueError(f"per-gate alpha must have one entry per gate ({n}); got {tuple(alpha.shape)}")
        if cap is not None:
            raise ValueError("cap bounds one shared skip reward; it does not apply to per-gate alphas")
        skipped = skipped * alpha.detach().to(skipped)
    # sum_{j >= i}: reverse cumulative sum along the gate axis
    future = skipped.flip(1).cumsum(1).flip(1) / n
    if cap is not None:
        future = future.clamp(max=cap)
    return -beta * ce.detach().unsqueeze(1) + (future if per_gate else alpha * future)


@dataclass
class HRLLoss:
    total: Tensor  # what to backpropagate
    ce: Tensor  # mean cross-entropy on the sampled paths
    reinforce: Tensor  # the (reduced, unweighted) REINFORCE surrogate
    returns: Tensor  # (B, N) per-gate returns, before the baseline
    advantages: Tensor  # (B, N) returns minus the baseline


def hrl_loss(
    ce: Tensor,
    log_probs: Tensor,
    decisions: Tensor,
    *,
    alpha: float | Tensor = 0.1,
    beta: float = 1.0,
    rl_weight: float = 0.01,
    reduction: str = "sum",
    costs: Tensor | None = None,
    baseline: Tensor | None = None,
    cap: float | None = None,
) -> HRLLoss:
    """The hybrid objective for one batch.

    ``ce`` (B,): each image's cross-entropy on its sampled path (differentiable: its mean trains the
    backbone; detached, it enters the returns); ``log_probs`` (B, N) of the sampled ``decisions`` (B, N).
    ``reduction``: how the per-image REINFORCE terms are combined over the batch -- ``"sum"`` (the
    authors' code: with ``rl_weight=0.01`` at batch 128 this equals ``"mean"`` with weight 1.28) or ``"mean"``.
    ``baseline``: subtracted from the returns, per gate (N,) or per image and gate (B, N) (variance
    reduction; it must not depend on the sampled decisions; None = the paper).
    ``cap``: the most skip reward one image can earn (see :func:`per_gate_returns`; None = paper).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if log_probs.shape != decisions.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} and decisions {tuple(decisions.shape)} differ")
    if ce.dim() != 1:
        raise ValueError(f"expected the per-image losses ce (B,); got {tuple(ce.shape)}")
    returns = per_gate_returns(ce, decisions, alpha=alpha, beta=beta, costs=costs, cap=cap)  # (B, N)
    advantages = returns if baseline is None else returns - baseline.to(returns).expand_as(returns)
    per_image = -(advantages.detach() * log_probs).sum(1)  # (B,): each image's own returns x log-probs
    reinforce = per_image.sum() if reduction == "sum" else per_image.mean()
    ce_mean = ce.mean()
    return HRLLoss(ce_mean + rl_weight * reinforce, ce_mean.detach(), reinforce.detach(), returns.detach(),
                   advantages.detach())


@dataclass
class PonderLoss:
    total: Tensor  # what to backpropagate: ce + tau * ponder
    ce: Tensor  # mean cross-entropy (detached)
    ponder: Tensor  # mean ponder cost per image (detached)


def ponder_loss(ce: Tensor, ponder: Tensor, tau: float) -> PonderLoss:
    """The ACT/SACT objective (Graves 2016; Figurnov et al. 2017): ``mean(ce) + tau * mean(ponder)``.

    ``ce`` (B,): each image's cross-entropy; ``ponder`` (B,): its ponder cost, N + R summed over the stages
    (SACT: each stage's ponder map averaged over positions, as the authors' code does), differentiable through
    the remainders R only (N is piecewise constant). ``tau`` >= 0: the price of one unit of computation."""
    if ce.dim() != 1 or ponder.shape != ce.shape:
        raise ValueError(f"expected ce (B,) and ponder (B,); got {tuple(ce.shape)} and {tuple(ponder.shape)}")
    if not tau >= 0:
        raise ValueError(f"tau (the ponder cost weight) must be >= 0; got {tau}")
    ce_mean, ponder_mean = ce.mean(), ponder.float().mean()
    return PonderLoss(ce_mean + tau * ponder_mean, ce_mean.detach(), ponder_mean.detach())
