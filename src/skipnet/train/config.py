"""Run configuration: one frozen dataclass per concern, loaded from recipe files, overridden by typed keys.

A recipe is a YAML file with three sections::

    model: {name: cifar_resnet38, gate: rnn}          # a preset of skipnet.list_models() + overrides
    data:  {name: cifar10, root: /data/cifar10, batch_size: 128}
    train: {stage: sp, epochs: 164, lr: 0.1, milestones: [82, 123]}

Overrides are ``section.key=value`` strings; an unknown key or a value of the wrong type is an error.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

STAGES = ("baseline", "sp", "hrl", "calibrate", "act", "sact", "sdv")
RIVAL_STAGES = ("act", "sact", "sdv")  # the methods SkipNet is compared with (SPEC §10), one stage each
SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class ModelSection:
    name: str = "cifar_resnet38"
    gate: str = "rnn"  # rnn | ffgate1 | ffgate2 (a baseline stage always builds the plain network)
    num_classes: int | None = None  # None: from the data
    in_channels: int | None = None  # None: from the data
    embed_dim: int = 10
    hidden_dim: int = 10
    layout: tuple[int, ...] | None = None  # CIFAR presets: blocks per stage, e.g. [1, 2, 3] for a ResNet-14 (2+2*6)
    depth: int | None = None  # CIFAR presets: another depth (6n+2, or 2+2*sum(layout): 16 for [1, 3, 3])
    halt_eps: float = 0.01  # act/sact: a stage halts once its halting scores sum to >= 1 - halt_eps (the paper's
    # 0.01; stored with the model, inference uses it)

    def __post_init__(self) -> None:
        if not 0.0 < self.halt_eps < 1.0:
            raise ValueError(f"halt_eps lies in (0, 1); got {self.halt_eps}")


@dataclass(frozen=True)
class DataSection:
    name: str = "fashion_mnist"
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    batch_size: int = 128
    eval_batch_size: int = 500
    augment: bool = True
    crop_padding: int = 4
    flip: bool = True
    cache_dir: str | None = None
    stream: bool = False  # stream an ImageFolder through DataLoader workers (ImageNet) instead of memory
    workers: int = 8  # streaming only: decoding processes
    image_size: int = 224  # streaming only: training crop size (eval: resize 256/224 of it, centre crop)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive; got {self.batch_size}, {self.eval_batch_size}")


@dataclass(frozen=True)
class TrainSection:
    stage: str = "sp"  # baseline | sp | hrl (the paper's hybrid REINFORCE) | calibrate (ours, not in the paper:
    # a global threshold moved to a compute target while the backbone is fine-tuned; the gates stay frozen) |
    # the rivals, each one stage from scratch (or --init a plain ResNet): act | sact (Figurnov et al. 2017:
    # per-image / per-position halting with a ponder cost) | sdv (random skipping at drop_rate, also at inference)
    init: str | None = None  # checkpoint or run folder to start from (HRL: the SP run); None = from scratch
    epochs: float = 1.0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"  # step (lr *= gamma at each milestone) | cosine (from lr to 0, see below)
    cosine_epochs: float | None = None  # length of the cosine (None: this stage's epochs). Two stages can share
    cosine_start: float = 0.0  # one cosine: SP runs its first part, HRL starts at cosine_start = SP's epochs
    milestones: tuple[float, ...] = ()  # in epochs; lr *= gamma at each (schedule step)
    gamma: float = 0.1
    warmup_steps: int = 0  # first steps at warmup_lr (the paper's ResNet-110: 400 at 0.01)
    warmup_lr: float = 0.01
    label_smoothing: float = 0.0  # cross-entropy label smoothing (every stage; HRL's returns use the same loss)
    drop_rate: float = 0.0  # SP: each image skips each gated block with this probability (stochastic depth),
    # so that the network works without any one block before a compute target asks it to skip some (the
    # baseline stage, a plain network, ignores it). sdv: the rate of random skipping, in training and inference
    # (stored with the model)
    sp_decisions: str = "straight_through"  # SP: the gates' decisions in training: straight_through (the paper:
    # 1[p >= 0.5], gradient of p) | gumbel (ours, after ConvNet-AIG: sampled from Bernoulli(p), gradient of the
    # relaxed sample; with rate_loss and target_macs, each gate's mean p is pulled to the rate that spends the
    # target, so the network is trained on routed paths from the start)
    ponder_cost: float = 0.01  # act/sact: tau, the weight of the ponder cost (N + R summed over stages) in the
    # loss; the authors' CIFAR-10 models use 0.01 (their code's README), ImageNet 0.005
    # --- HRL (SPEC §5) ---
    alpha: float = 0.1  # compute reward weight (the starting value when target_macs is set)
    beta: float = 1.0  # weight of the accuracy term in the returns
    rl_weight: float = 0.01
    rl_reduction: str = "sum"  # batch reduction of the REINFORCE term: sum (authors) | mean
    temperature: float = 1.0  # HRL from init: the gates' output layer is divided by this once, when the stage
    # starts (the paper's ImageNet HRL: 0.05 sharpens the policy); saved with the weights
    entropy: float = 0.0  # HRL: weight of a bonus on the gates' mean Bernoulli entropy (ours; keeps p graded)
    explore: float = 0.0  # HRL: sample from p' = (1 - explore) p + explore / 2 (bounded exploration, ours)
    backbone_path: str = "sampled"  # HRL: the path whose cross-entropy trains the backbone: sampled (the
    # paper) | greedy (ours: the decisions inference takes, without exploration, from a second forward pass with
    # gradients; the gates still learn by REINFORCE from the sampled paths)
    rl_backbone: bool = True  # HRL: the REINFORCE, rate and entropy terms reach the backbone through the gates'
    # inputs (the paper). false (ours; needs backbone_path greedy): the gates read the sampled pass's features
    # without gradient, so that pass runs without the backbone's autograd (a third less time per HRL step)
    distill: float = 0.0  # HRL with backbone_path greedy (ours; in-place distillation after slimmable networks):
    # the all-blocks path also trains by cross-entropy, and the greedy path's loss is (1 - distill) CE +
    # distill KL(all-blocks || greedy), the all-blocks prediction as a fixed target. The all-blocks pass leaves
    # the BatchNorm statistics alone (inference runs the greedy paths)
    executor: str = "masked"  # HRL: how the sampled and greedy passes run the gated blocks: masked (every block
    # on every image, mixed by the decisions, as the paper's code) | compact (ours: each block on the images that
    # run it, as inference does; its BatchNorm then normalises by, and keeps the running statistics of, those
    # images; less time per step, the more so the more is skipped). The all-blocks pass runs every block anyway.
    # Measured (docs/RESULTS.md, 2026-12-04): a 1.3-1.4x faster step at ~62-66 % execution, but 0.6 point less
    # accurate on Fashion-MNIST (two seeds), so no recipe uses it
    freeze_bn: bool = False  # keep BatchNorm statistics fixed during HRL / calibrate
    cost: str = "uniform"  # C_j: uniform (paper: every block costs 1) | macs (relative block MACs, mean 1)
    baseline: str = "none"  # none (paper) | ema (per-gate moving average of the returns) | greedy (ours,
    # self-critical: the returns of the same image's greedy path, from a second forward pass without gradients)
    skip_cap: float | None = None  # most skip reward per image, as a fraction of the gated blocks' cost
    baseline_momentum: float = 0.9
    gate_lr: float | None = None  # separate learning rate for gate parameters (None: lr; 0: frozen)
    gate_optimizer: str = "sgd"  # sgd | adam, for the gate parameters
    target_macs: float | None = None  # HRL: the policy's expected MACs as a fraction of the plain network,
    # held by dual ascent on alpha (ours; None: alpha fixed, the paper). calibrate: greedy MACs to reach
    budget: str = "expected"  # HRL: the cost the dual ascent holds at target_macs: expected (the policy's
    # expected MACs) | greedy (the MACs of the greedy path, what inference spends; needs baseline greedy) |
    # per_gate (ours, after ConvNet-AIG: every gate's expected execution rate held at its own target, one alpha
    # per gate, so that each gate must choose which images run its block; targets from gate_targets, or the
    # one rate at every gate that spends target_macs)
    gate_targets: tuple[float, ...] = ()  # budget per_gate: one execution rate per gate (empty: from target_macs)
    rate_loss: float = 0.0  # HRL (and SP): weight of ConvNet-AIG's target-rate loss on the gates (ours here),
    # mean_j (mean_b p_bj - t_j)^2 -- the gates' probabilities pulled to their rates directly (no dual lag);
    # REINFORCE still decides which images run each block. t_j: budget per_gate's targets; otherwise the one rate
    # at every gate that spends the current target_macs (a pull away from static "always/never" gates); no
    # target (alpha fixed, the paper's setting): no effect
    alpha_lr: float = 0.05  # dual ascent: alpha += alpha_lr * (smoothed expected fraction - target) per step
    alpha_max: float = 10.0
    cost_ema: float = 0.9  # smoothing of the measured cost fed to the controller
    target_ramp: float = 0.5  # calibrate (and HRL with budget_ramp): share of the stage over which the
    # target falls from the first measured cost to target_macs
    budget_ramp: bool = False  # HRL: ramp the dual ascent's target as calibrate does (no target: no effect)
    threshold_gain: float = 0.2  # calibrate: share of the needed threshold shift taken per step
    # --- evaluation and mechanics ---
    tau: float = 0.5  # greedy threshold for evaluation
    fit_tau: bool = False  # HRL: at the end, set tau so that greedy inference spends target_macs (none: no effect)
    fit_images: int = 5000  # images (no labels needed); stored with the run (ours, see train/operating.py)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    channels_last: bool = True
    eval_every: float = 1.0  # epochs between evaluations (0: only at the end)
    checkpoint_every: int = 500  # steps between checkpoints (also at every epoch end)
    log_every: int = 50  # steps between metric lines

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}; got {self.stage!r}")
        if not 0 < self.epochs < float("inf"):
            raise ValueError(f"epochs must be a positive finite number; got {self.epochs}")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is a number of steps, at least 1; got {getattr(self, name)}")
        if not self.eval_every >= 0:
            raise ValueError(f"eval_every is in epochs, >= 0 (0: only at the end); got {self.eval_every}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {self.warmup_steps}")
        if self.rl_reduction not in ("sum", "mean"):
            raise ValueError(f"rl_reduction must be 'sum' or 'mean'; got {self.rl_reduction!r}")
        if self.cost not in ("uniform", "macs"):
            raise ValueError(f"cost must be 'uniform' or 'macs'; got {self.cost!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}")
        length = self.epochs if self.cosine_epochs is None else self.cosine_epochs
        if not (length > 0 and 0 <= self.cosine_start and self.cosine_start + self.epochs <= length + 1e-9):
            raise ValueError(f"the stage (epochs {self.cosine_start:g} to {self.cosine_start + self.epochs:g} of "
                             f"its cosine) must lie inside the cosine's {length:g} epochs")
        if self.stage == "calibrate" and self.target_macs is None:
            raise ValueError("stage 'calibrate' moves the threshold to target_macs: set it")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing lies in [0, 1); got {self.label_smoothing}")
        if self.budget not in ("expected", "greedy", "per_gate"):
            raise ValueError(f"budget must be 'expected', 'greedy' or 'per_gate'; got {self.budget!r}")
        if self.budget == "per_gate" and self.stage == "hrl" and self.target_macs is None and not self.gate_targets:
            raise ValueError("budget 'per_gate' holds each gate at a target rate: set target_macs (one rate at "
                             "every gate) or gate_targets (one per gate)")
        if self.gate_targets and self.budget != "per_gate":
            raise ValueError("gate_targets are the per-gate rates of budget 'per_gate': set train.budget=per_gate")
        if any(not 0.0 <= t <= 1.0 for t in self.gate_targets):
            raise ValueError(f"gate_targets are execution rates in [0, 1]; got {list(self.gate_targets)}")
        if self.sp_decisions not in ("straight_through", "gumbel"):
            raise ValueError(f"sp_decisions must be 'straight_through' or 'gumbel'; got {self.sp_decisions!r}")
        if self.sp_decisions != "straight_through" and self.stage != "sp":
            raise ValueError(f"sp_decisions is how the sp stage decides; stage {self.stage!r} has its own")
        if not 0.0 <= self.rate_loss < float("inf"):
            raise ValueError(f"rate_loss is a finite weight >= 0; got {self.rate_loss}")
        if self.budget == "per_gate" and self.skip_cap is not None:
            raise ValueError("skip_cap bounds one shared skip reward; budget 'per_gate' prices each gate itself")
        if self.budget == "greedy" and self.baseline != "greedy":
            raise ValueError("budget 'greedy' measures the greedy path of baseline 'greedy': set both")
        if not 0.0 <= self.entropy < float("inf"):
            raise ValueError(f"entropy is a finite non-negative weight; got {self.entropy}")
        if not 0.0 <= self.cost_ema < 1.0:
            raise ValueError(f"cost_ema is a smoothing factor in [0, 1); got {self.cost_ema}")
        if not (self.alpha_lr >= 0.0 and self.alpha_max >= 0.0):
            raise ValueError(f"alpha_lr and alpha_max must be >= 0; got {self.alpha_lr}, {self.alpha_max}")
        if not 0.0 < self.threshold_gain <= 1.0:
            raise ValueError(f"threshold_gain is the share of the needed shift taken per step, in (0, 1]; got "
                             f"{self.threshold_gain}")
        if not 0.0 <= self.explore < 1.0:
            raise ValueError(f"explore is a mixing weight in [0, 1); got {self.explore}")
        if not 0.0 <= self.target_ramp <= 1.0:
            raise ValueError(f"target_ramp is a share of the stage in [0, 1]; got {self.target_ramp}")
        if self.backbone_path not in ("sampled", "greedy"):
            raise ValueError(f"backbone_path must be 'sampled' or 'greedy'; got {self.backbone_path!r}")
        if not self.rl_backbone and self.backbone_path != "greedy":
            raise ValueError("rl_backbone: false goes with backbone_path: greedy (on the sampled path the "
                             "backbone's cross-entropy needs that pass's gradients)")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill is a mixing weight in [0, 1]; got {self.distill}")
        if self.distill and self.stage != "hrl":
            raise ValueError(f"distill is the hrl stage's (the all-blocks path teaching the greedy one); stage "
                             f"{self.stage!r} would ignore it")
        if self.distill and self.backbone_path != "greedy":
            raise ValueError("distill goes with backbone_path: greedy (it distills the all-blocks path into the "
                             "greedy one)")
        if self.executor not in ("masked", "compact"):
            raise ValueError(f"executor must be 'masked' or 'compact'; got {self.executor!r}")
        if self.executor == "compact" and self.stage != "hrl":
            raise ValueError(f"executor 'compact' runs the hrl stage's sampled and greedy passes; stage "
                             f"{self.stage!r} trains through masked blocks")
        if self.baseline not in ("none", "ema", "greedy"):
            raise ValueError(f"baseline must be 'none', 'ema' or 'greedy'; got {self.baseline!r}")
        if self.gate_optimizer not in ("sgd", "adam"):
            raise ValueError(f"gate_optimizer must be 'sgd' or 'adam'; got {self.gate_optimizer!r}")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise ValueError(f"target_macs is a fraction of the dense network's MACs in (0, 1]; got {self.target_macs}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive; got {self.temperature}")
        if self.gate_lr is not None and not self.gate_lr >= 0:
            raise ValueError(f"gate_lr must be >= 0 (0 freezes the gates); got {self.gate_lr}")
        if self.gate_lr == 0 and self.stage == "hrl":
            raise ValueError("gate_lr 0 freezes the gates, which is all REINFORCE trains; the frozen-gate "
                             "threshold mode is stage 'calibrate'")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate is a probability in [0, 1); got {self.drop_rate}")
        if self.drop_rate and self.stage in ("hrl", "calibrate", "act", "sact"):
            raise ValueError("drop_rate applies to the sp and sdv stages only (the baseline, without gates, ignores "
                             f"it); got stage {self.stage!r}")
        if self.stage == "sdv" and not self.drop_rate > 0:
            raise ValueError("stage 'sdv' skips each gated block at random with probability drop_rate: set it > 0")
        if not 0.0 <= self.ponder_cost < float("inf"):
            raise ValueError(f"ponder_cost (tau) is a finite weight >= 0; got {self.ponder_cost}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.fit_tau and self.stage != "hrl":
            raise ValueError(f"fit_tau sets tau to meet target_macs after an hrl stage; got stage {self.stage!r}")
        if not 0 <= self.tau <= 1:
            raise ValueError(f"tau is a probability threshold in [0, 1]; got {self.tau}")
        if self.fit_images < 1:
            raise ValueError(f"fit_images must be >= 1; got {self.fit_images}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off; got {self.amp!r}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Check/convert ``value`` to the declared type of ``cls.key``."""
    hints = typing.get_type_hints(cls)
    if key not in hints:
        known = ", ".join(f.name for f in fields(cls))
        raise ValueError(f"unknown option {cls.__name__.removesuffix('Section').lower()}.{key}; known: {known}")
    hint = hints[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ValueError(f"{key} may not be empty")
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    origin = typing.get_origin(base)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        try:
            numbers = tuple(float(v) for v in items)
        except (TypeError, ValueError):
            raise ValueError(f"option {key}={value!r} must be a list of numbers") from None
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"option {key}={value!r} must hold finite numbers")
        if typing.get_args(base)[0] is int:
            if not all(v.is_integer() for v in numbers):
                raise ValueError(f"option {key}={value!r} must be a list of whole numbers")
            return tuple(int(v) for v in numbers)
        return numbers
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            number = float(value)
            if not math.isfinite(number):
                raise OverflowError  # inf and nan pass float() but no option means them
            return number
        return str(value)
    except OverflowError:
        raise ValueError(f"option {key}={value!r} must be a finite number") from None
    except (TypeError, ValueError):
        raise ValueError(f"option {key}={value!r} is not a valid {getattr(base, '__name__', base)}") from None


def build_config(raw: dict[str, Any]) -> RunConfig:
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown recipe section(s) {sorted(unknown)}; expected {sorted(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"recipe section {name!r} must be a mapping; got {type(values).__name__}")
        sections[name] = cls(**{k: _coerce(cls, k, v) for k, v in values.items()})
    return RunConfig(**sections)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw recipe dict (typed and checked by :func:`build_config`)."""
    raw = {k: dict(v or {}) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=0.05)")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            raise ValueError(f"unknown section {section!r} in override {item!r}; expected {sorted(SECTIONS)}")
        cls = SECTIONS[section]
        hint = typing.get_type_hints(cls).get(key)
        # Strings stay as typed (YAML would turn "off" into False); other values are parsed as YAML.
        parsed = (value if str in (typing.get_args(hint) or (hint,)) and value.lower() not in ("none", "null")
                  else yaml.safe_load(value)) if value else None
        raw.setdefault(section, {})[key] = _coerce(cls, key, parsed)
    return raw


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("skipnet").joinpath("recipes").iterdir()
                  if p.name.endswith(".yaml"))


def read_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """A recipe by name (see :func:`recipe_names`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"recipe file {path} does not exist")
        text = path.read_text()
    else:
        res = resources.files("skipnet").joinpath("recipes", f"{name_or_path}.yaml")
        if not res.is_file():
            raise ValueError(f"unknown recipe {name_or_path!r}; known: {', '.join(recipe_names())}")
        text = res.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"recipe {name_or_path} is not valid YAML{at}: {problem}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {name_or_path} must be a YAML mapping")
    return raw


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw = read_recipe(recipe) if recipe else {}
    return build_config(apply_overrides(raw, list(overrides)))


def write_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
