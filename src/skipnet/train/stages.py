"""One object per training stage: what a step computes, which parameters train, and what the stage carries.

* :class:`SupervisedStage` -- ``baseline`` (the plain ResNet) and ``sp`` (SPEC §5 stage 1: straight-through
  gates, cross-entropy, optional random block skips).
* :class:`ReinforceStage` -- ``hrl`` (SPEC §5 stage 2): gates sampled, the backbone trained by cross-entropy on
  the sampled path, the gates by the REINFORCE part of the hybrid objective. With the defaults it is the
  paper's objective; ``explore``, ``baseline: greedy`` and ``target_macs`` (dual ascent on alpha) are ours.
* :class:`CalibrateStage` -- ``calibrate`` (ours, not in the paper): the gates stay frozen, one global
  threshold is moved to a compute target while the backbone is fine-tuned. Equivalent to choosing a global
  tau and fine-tuning the backbone for it; nothing in it is learned routing.
* :class:`PonderStage` -- ``act`` and ``sact`` (the rivals, SPEC §10): cross-entropy plus ``ponder_cost``
  (tau) times the ponder cost, from scratch or from a plain ResNet.
* :class:`StochasticDepthStage` -- ``sdv`` (the rival random skipping): cross-entropy on paths with each gated
  block skipped at ``drop_rate``.

A stage is a thin object over the pure losses of :mod:`.losses` and the controllers of :mod:`.hrl`. The loop
(:mod:`.trainer`) calls, per step, ``loss(net, x, y, generator)``, backward and the optimisers, then
``after_step(stats)``; ``state_dict`` / ``load_state_dict`` carry the stage across a resume.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..cost import MacTable
from ..models import SkipResNet
from .hrl import AlphaController, GateBaseline, GateRateController, ThresholdController, uniform_gate_rate
from .losses import distill_loss, hrl_loss, per_gate_returns, ponder_loss, target_rate_loss


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    backbone = [p for n, p in model.named_parameters() if not n.startswith("gates.")]
    gates = [p for n, p in model.named_parameters() if n.startswith("gates.")]
    return backbone, gates


def freeze_batchnorm(model: nn.Module) -> None:
    """Use and keep the running BatchNorm statistics (call after ``model.train()``)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@contextlib.contextmanager
def bn_stats_kept(model: nn.Module):
    """Training-mode passes inside leave every BatchNorm's running statistics as they were (momentum 0)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def block_savings(table: MacTable) -> Tensor:
    """MACs saved per image by skipping each gated block (N,): F_i - S_i."""
    return torch.tensor([f - s for f, s in zip(table.block_full, table.block_skip)], dtype=torch.float64)


def block_costs(table: MacTable, kind: str) -> Tensor:
    """C_j per gate: ones (the paper), or each block's saved MACs relative to the mean (mean 1)."""
    if kind == "uniform":
        return torch.ones(table.num_gates)
    saved = block_savings(table)
    return (saved / saved.mean()).float()


def all_mean(t: Tensor, world: int) -> Tensor:
    """The mean of ``t`` over the processes (in place; a no-op on one process)."""
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t


class Stage:
    """The common part: a supervised cross-entropy step and the optimisers of the backbone and gates."""

    name = "stage"
    draws_random = False  # whether steps need the per-step generator
    may_freeze_bn = True  # train.freeze_bn applies (not to the supervised stages)

    def __init__(self, cfg, model: SkipResNet, table: MacTable, total_steps: int, device: torch.device,
                 world: int = 1):
        self.cfg, self.model, self.table, self.device, self.world = cfg, model, table, device, world
        self.total_steps = total_steps
        self.dense = float(table.plain)

    # --- parameters -------------------------------------------------------------------------------------------
    def gate_params(self) -> list[nn.Parameter]:
        """The gate parameters an optimiser trains (the rest of the gates is frozen)."""
        return split_params(self.model)[1]

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        """SGD (momentum, weight decay) on the backbone; the gates with their own lr or Adam, or frozen
        (``gate_lr`` 0: their parameters stop requiring gradients, so none are computed, kept or all-reduced)."""
        cfg = self.cfg
        backbone, gates = split_params(self.model)
        trained = {id(p) for p in self.gate_params()} if cfg.gate_lr != 0 else set()
        for p in gates:
            p.requires_grad_(id(p) in trained)
        gates = [p for p in gates if id(p) in trained]
        sgd = dict(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        groups = [{"params": backbone, "lr": cfg.lr, "role": "backbone"}]
        if gates and cfg.gate_optimizer == "adam":
            return [torch.optim.SGD(groups, lr=cfg.lr, **sgd),
                    torch.optim.Adam([{"params": gates, "lr": cfg.gate_lr or cfg.lr, "role": "gates"}])]
        if gates:
            groups.append({"params": gates, "lr": cfg.gate_lr or cfg.lr, "role": "gates"})
        return [torch.optim.SGD(groups, lr=cfg.lr, **sgd)]

    @property
    def freezes_bn(self) -> bool:
        """Whether BatchNorm statistics stay fixed in training (``train.freeze_bn``, where the stage allows it)."""
        return self.cfg.freeze_bn and self.may_freeze_bn

    def train_mode(self, net: nn.Module) -> None:
        net.train()
        if self.freezes_bn:
            freeze_batchnorm(net)

    # --- the step ---------------------------------------------------------------------------------------------
    def loss(self, net: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None
             ) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def after_step(self, stats: dict[str, Tensor]) -> None:
        """Controllers see the step's statistics (after the optimiser step)."""

    def log_fields(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def _stats(self, out, y: Tensor, total: Tensor) -> dict[str, Tensor]:
        return {"loss": total.detach(), "correct": (out.logits.argmax(1) == y).sum().detach(),
                "exec": out.decisions.mean().detach(), "macs": (out.macs.mean() / self.dense).detach()}

    def _ce(self, logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(logits.float(), y, reduction=reduction, label_smoothing=self.cfg.label_smoothing)


class SupervisedStage(Stage):
    """``baseline`` (plain network) and ``sp`` (straight-through gates, optional random block skips)."""

    name = "supervised"
    may_freeze_bn = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.draws_random = cfg.stage == "sp" and (cfg.drop_rate > 0 or cfg.sp_decisions == "gumbel")
        self.rate = None  # SP's target-rate loss: the one execution rate at every gate that spends target_macs
        if cfg.stage == "sp" and cfg.rate_loss and cfg.target_macs is not None:
            self.rate = uniform_gate_rate(self.table, cfg.target_macs)

    def loss(self, net, x, y, generator):
        cfg = self.cfg
        if cfg.stage == "sp":
            out = net(x, cfg.sp_decisions, drop_rate=cfg.drop_rate, generator=generator)
        else:
            out = net(x)
        total = self._ce(out.logits, y)
        if self.rate is not None:  # (sp only) ConvNet-AIG's target-rate loss on each gate's mean probability
            total = total + cfg.rate_loss * target_rate_loss(out.probs, self.rate)
        return total, self._stats(out, y, total)


class ReinforceStage(Stage):
    """Hybrid REINFORCE (SPEC §5): CE on the sampled path trains the backbone, REINFORCE trains the gates.

    Per step: gates sampled (from p, or with ``explore`` from p' = (1-eps) p + eps/2); each image's per-gate
    returns r_i = -beta CE + (alpha/N) sum_{j>=i} (1-g_j) C_j, minus a baseline (none, the paper; a per-gate
    moving average; or ``greedy``: the same returns computed on the image's greedy path, a self-critical
    baseline); alpha fixed (the paper) or held by dual ascent so that the policy's *expected* MACs (``budget``
    expected) or the greedy path's measured MACs (``budget`` greedy, with the greedy baseline) meet
    ``target_macs``, or one price per gate (``budget`` per_gate) holding each gate's expected execution rate at
    its own target; optionally ConvNet-AIG's target-rate loss (``rate_loss``) on the gates' mean probabilities,
    which keeps gates from settling at always/never; optionally an ``entropy`` bonus (computed from
    probabilities clamped to [1e-6, 1 - 1e-6]: no gradient beyond |logit| ~ 13.8) keeps the gate probabilities
    graded (so that the inference threshold tau trades accuracy for compute). Under DDP a batch-summed
    REINFORCE term is scaled by the world size, so that the all-reduced gradient equals one process's on the
    joined batch (as cross-entropy's mean does). With ``backbone_path`` greedy (ours) the backbone's
    cross-entropy is taken on each image's greedy path instead of its sampled one (a second forward pass
    with gradients before the one backward; under DDP too, tests/test_distributed.py checks its gradient).
    The gates read the backbone's features, so the REINFORCE, rate and entropy terms reach the backbone through
    the gate inputs too (as in the paper); with ``rl_backbone`` false (ours, with the greedy backbone path) they
    do not, the backbone learns from the greedy path's cross-entropy alone, and the sampled pass runs without
    the backbone's autograd. With ``executor`` compact (ours) the sampled and greedy passes run each block on
    the images that take it only (:func:`~skipnet.models.executors.run_compact`). With ``distill`` (ours, with
    the greedy path) the all-blocks path also trains by cross-entropy and teaches the greedy one (in-place
    distillation, :func:`.losses.distill_loss`)."""

    name = "reinforce"
    draws_random = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        ramp = round(cfg.target_ramp * self.total_steps) if cfg.budget_ramp else 0
        if cfg.budget == "per_gate":
            n = self.table.num_gates
            targets = list(cfg.gate_targets) or [uniform_gate_rate(self.table, cfg.target_macs)] * n
            if len(targets) != n:
                raise ValueError(f"gate_targets has {len(targets)} rates; this network has {n} gates")
            self.controller = GateRateController(cfg.alpha, torch.tensor(targets), cfg.alpha_lr, cfg.alpha_max,
                                                 cfg.cost_ema, ramp)
        else:
            self.controller = AlphaController(cfg.alpha, cfg.target_macs, cfg.alpha_lr, cfg.alpha_max,
                                              cfg.cost_ema, ramp)
        self.baseline = GateBaseline(cfg.baseline_momentum) if cfg.baseline == "ema" else None
        self.costs = block_costs(self.table, cfg.cost).to(self.device)
        self.rates: Tensor | None = None  # smoothed per-gate expected execution rates, for the metric lines
        self.has_rate_targets = cfg.budget == "per_gate" or cfg.target_macs is not None  # else rate_loss: no effect

    def greedy_returns(self, x: Tensor, y: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
        """The returns (B, N) of each image's greedy path (threshold ``tau``, eval mode, no gradient) and its
        MACs (B,).
        The greedy path does not depend on the sampled decisions, so it is a valid baseline for every gate."""
        model = self.model
        modes = [m.training for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                executor = "compact" if x.device.type == "cpu" else "masked"
                out = model(x, "greedy", tau=self.cfg.tau, executor=executor)
                ce = self._ce(out.logits, y, "none")
        finally:
            for m, mode in zip(model.modules(), modes):
                m.training = mode
        returns = per_gate_returns(ce, out.decisions, alpha=alpha, beta=self.cfg.beta, costs=self.costs,
                                   cap=self.cfg.skip_cap)
        return returns, out.macs.to(x.device)

    def loss(self, net, x, y, generator):
        cfg = self.cfg
        out = net(x, "sample", explore=cfg.explore, generator=generator, backbone_grad=cfg.rl_backbone,
                  executor=cfg.executor)
        alpha = self.alpha()
        baseline, greedy_macs = None, None
        if cfg.baseline == "greedy":
            baseline, greedy_macs = self.greedy_returns(x, y, alpha)
        elif self.baseline is not None:
            baseline = self.baseline.value
        # a summed term is averaged over the processes by DDP: scale it back to the global sum
        weight = cfg.rl_weight * (self.world if cfg.rl_reduction == "sum" else 1)
        ce = self._ce(out.logits, y, "none")
        greedy = cfg.backbone_path == "greedy"  # then the sampled path's CE enters the returns only
        loss = hrl_loss(ce.detach() if greedy else ce, out.log_probs, out.decisions, alpha=alpha, beta=cfg.beta,
                        rl_weight=weight, reduction=cfg.rl_reduction, costs=self.costs, baseline=baseline,
                        cap=cfg.skip_cap)
        total = loss.total
        if greedy:  # the backbone learns the paths inference takes (training mode: batch statistics, as above)
            logits = net(x, "greedy", tau=cfg.tau, executor=cfg.executor).logits
            if cfg.distill:  # and the all-blocks path, which teaches the greedy one
                with bn_stats_kept(net):
                    teacher = net(x, "all").logits
                total = total + self._ce(teacher, y) + (1 - cfg.distill) * self._ce(logits, y)
                total = total + cfg.distill * distill_loss(logits, teacher)
            else:
                total = total + self._ce(logits, y)
        if cfg.entropy:  # a bonus on the policy's entropy (mean over images and gates) keeps gates from saturating
            p = out.probs.float().clamp(1e-6, 1 - 1e-6)
            total = total - cfg.entropy * -(p * p.log() + (1 - p) * (1 - p).log()).mean()
        if cfg.rate_loss and self.has_rate_targets:  # ConvNet-AIG's target-rate loss: mean p pulled to the rates
            total = total + cfg.rate_loss * target_rate_loss(out.probs, self.rate_targets())
        if self.baseline is not None:
            self.baseline.update(loss.returns)
        stats = self._stats(out, y, total)
        stats["ce"] = loss.ce
        # the policy's expected cost: the probabilities p (without exploration) summed along the sampled path
        # (unbiased for E[MACs] under p when the path is sampled from p; with explore > 0 it is sampled from
        # p', and the estimate leans towards p' wherever later gates depend on earlier decisions)
        stats["expected_macs"] = (self.table.per_image(out.probs.detach().float()).mean() / self.dense).detach()
        if greedy_macs is not None:
            stats["greedy_macs"] = (greedy_macs.double().mean() / self.dense).detach()
        stats["gate_rates"] = out.probs.detach().float().mean(0)  # each gate's expected execution rate
        return total, stats

    def rate_targets(self) -> Tensor:
        """The execution rate each gate's target-rate loss pulls to now (N,): the per-gate budget's own targets,
        or, under the shared budget, the one rate at every gate that spends its current target."""
        c = self.controller
        if isinstance(c, GateRateController):
            t = c.target_now()
        else:
            target = c.target_now()
            t = torch.full((self.table.num_gates,), uniform_gate_rate(self.table, target))
        return t.to(device=self.device, dtype=torch.float32)

    def alpha(self) -> float | Tensor:
        """The compute reward weight: one number, or one per gate (budget per_gate) on the step's device."""
        a = self.controller.alpha
        return a.to(device=self.device, dtype=torch.float32) if isinstance(a, Tensor) else a

    def after_step(self, stats):
        if self.baseline is not None and self.baseline.value is not None:
            all_mean(self.baseline.value, self.world)
        rates = all_mean(stats.pop("gate_rates").clone(), self.world).double().cpu()  # popped: the window sums scalars
        if self.cfg.budget == "per_gate":  # the controller smooths the rates it holds: log those
            self.controller.update(rates)
            self.rates = self.controller.rate
            return
        self.rates = rates if self.rates is None else self.cfg.cost_ema * self.rates + (1 - self.cfg.cost_ema) * rates
        cost = all_mean(stats[f"{self.cfg.budget}_macs"].clone(), self.world)
        self.controller.update(float(cost))

    def log_fields(self):
        c = self.controller
        # each gate's expected execution rate (smoothed as the controller's cost): a gate at 0 or 1 is static
        fields = {"gate_rates": None if self.rates is None else [round(float(r), 4) for r in self.rates]}
        if isinstance(c, GateRateController):
            return {**fields, "alpha": float(c.alpha.mean()), "gate_alphas": [round(float(a), 4) for a in c.alpha],
                    "gate_rate_targets": [round(float(t), 4) for t in c.target_now()]}
        fields["alpha"] = c.alpha
        if c.target is not None:
            fields["target_mac_fraction"] = c.target_now()
        return fields

    def state_dict(self):
        return {"controller": self.controller.state_dict(),
                "baseline": None if self.baseline is None else self.baseline.state_dict(),
                "rates": None if self.rates is None else self.rates.tolist()}

    def load_state_dict(self, state):
        self.controller.load_state_dict(state["controller"])
        rates = state.get("rates")
        self.rates = None if rates is None else torch.tensor(rates, dtype=torch.float64)
        if self.baseline is not None:
            self.baseline.load_state_dict(state["baseline"], self.device)


class CalibrateStage(Stage):
    """Ours, not in the paper: frozen gates, one global threshold steered to ``target_macs`` while the
    backbone is fine-tuned (cross-entropy, straight-through decisions). Equivalent to picking a global tau
    and fine-tuning the backbone for it; no routing is learned. The target falls linearly from the first
    measured cost over ``target_ramp`` of the stage."""

    name = "calibrate"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg, table = self.cfg, self.table
        self.saved = block_savings(table) / table.plain
        self.base = float(table.per_image(torch.zeros(1, table.num_gates))[0]) / table.plain
        self.threshold = ThresholdController(cfg.target_macs, round(cfg.target_ramp * self.total_steps),
                                             cfg.threshold_gain)

    def gate_params(self):
        return []  # the gates stay as SP left them; the controller moves their output biases

    def loss(self, net, x, y, generator):
        out = net(x, "straight_through")  # the decisions greedy inference takes
        total = self._ce(out.logits, y)
        stats = self._stats(out, y, total)
        stats["greedy_macs"] = stats["macs"]
        # float32 probabilities saturate beyond |logit| ~ 17: far from any threshold
        stats["logits"] = torch.logit(out.probs.detach().double()).clamp(-30.0, 30.0)
        return total, stats

    def after_step(self, stats):
        logits = stats.pop("logits")
        cost = all_mean(stats["macs"].clone(), self.world)
        shift = self.threshold.update(float(cost), logits, self.saved, self.base)
        if self.world > 1:  # each rank saw its own slice: all take the mean shift
            shift_t = all_mean(torch.tensor(shift, dtype=torch.float64, device=cost.device), self.world)
            self.threshold.offset += float(shift_t) - shift  # the offset is what was applied
            shift = float(shift_t)
        with torch.no_grad():
            for bias in self.model.gates.output_biases():
                bias.add_(shift)

    def log_fields(self):
        return {"target_mac_fraction": self.threshold.target_now(), "threshold_offset": self.threshold.offset}

    def state_dict(self):
        return {"threshold": self.threshold.state_dict()}

    def load_state_dict(self, state):
        self.threshold.load_state_dict(state["threshold"])


class PonderStage(Stage):
    """``act`` / ``sact``: every unit runs on the whole batch, the outputs weighted by the halting distribution;
    loss = mean CE + ``ponder_cost`` * mean ponder cost (:func:`~.losses.ponder_loss`). The halting units train
    with the backbone (one SGD group, as in the authors' code)."""

    name = "ponder"
    may_freeze_bn = False

    def loss(self, net, x, y, generator):
        out = net(x)
        loss = ponder_loss(self._ce(out.logits, y, "none"), out.ponder, self.cfg.ponder_cost)
        stats = self._stats(out, y, loss.total)
        stats["ce"], stats["ponder"] = loss.ce, loss.ponder
        return loss.total, stats


class StochasticDepthStage(Stage):
    """``sdv``: cross-entropy on paths where each image skips each gated block with the model's
    ``drop_rate`` (drawn from the step's generator, so a resumed run draws the same)."""

    name = "stochastic_depth"
    draws_random = True
    may_freeze_bn = False

    def loss(self, net, x, y, generator):
        out = net(x, generator=generator)
        total = self._ce(out.logits, y)
        return total, self._stats(out, y, total)


STAGE_CLASSES = {"baseline": SupervisedStage, "sp": SupervisedStage, "hrl": ReinforceStage,
                 "calibrate": CalibrateStage, "act": PonderStage, "sact": PonderStage, "sdv": StochasticDepthStage}


def make_stage(cfg, model: SkipResNet, table: MacTable, total_steps: int, device: torch.device,
               world: int = 1) -> Stage:
    return STAGE_CLASSES[cfg.stage](cfg, model, table, total_steps, device, world)
