"""The training loop for every stage (baseline, SP, HRL), with safe run folders and exact resume.

``train(config, run_dir)`` wires things together; the per-step work is in :func:`train_step`, which calls the
pure losses of :mod:`.losses`. Runs on one device, or on several under ``torchrun`` (DDP: each rank takes its
slice of every global batch; rank 0 writes the run folder).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..cost import MacTable
from ..data import BatchLoader, ImageData, load_dataset
from ..models import SkipResNet, create_model
from .checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint, load_state, save_checkpoint
from .config import RunConfig, write_config
from .evaluate import evaluate
from .hrl import AlphaController, GateBaseline, ThresholdController
from .losses import hrl_loss, sp_loss

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""


class RunExistsError(FileExistsError):
    """The run folder exists already; pass overwrite or resume."""


# --- set-up ---------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


def lr_at(step: int, steps_per_epoch: int, cfg) -> float:
    """The backbone learning rate at a global step: step decay at ``milestones`` (epochs), optional warm-up."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr
    passed = sum(1 for m in cfg.milestones if step >= round(m * steps_per_epoch))
    return cfg.lr * cfg.gamma**passed


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    backbone = [p for n, p in model.named_parameters() if not n.startswith("gates.")]
    gates = [p for n, p in model.named_parameters() if n.startswith("gates.")]
    return backbone, gates


def controlled_threshold(cfg) -> bool:
    return cfg.stage == "hrl" and cfg.gate_gradient == "straight_through"


def build_optimizers(model: nn.Module, cfg) -> list[torch.optim.Optimizer]:
    """SGD (momentum, weight decay on all parameters); the gates may get their own lr or Adam, or stay as they
    are (``gate_lr`` 0: their parameters also stop requiring gradients, so none are computed, kept or
    all-reduced; the gradient through the gates still reaches the backbone). Under a threshold controller the
    gates' output biases belong to the controller, not to an optimiser."""
    backbone, gates = split_params(model)
    if cfg.gate_lr == 0:
        for p in gates:
            p.requires_grad_(False)
        gates = []
    if controlled_threshold(cfg):
        held = {id(b) for b in model.gates.output_biases()}
        gates = [p for p in gates if id(p) not in held]
    sgd = dict(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    groups = [{"params": backbone, "lr": cfg.lr, "role": "backbone"}]
    if gates and cfg.gate_optimizer == "adam":
        return [torch.optim.SGD(groups, lr=cfg.lr, **sgd),
                torch.optim.Adam([{"params": gates, "lr": cfg.gate_lr or cfg.lr, "role": "gates"}])]
    if gates:
        groups.append({"params": gates, "lr": cfg.gate_lr or cfg.lr, "role": "gates"})
    return [torch.optim.SGD(groups, lr=cfg.lr, **sgd)]


def set_lrs(optimizers: list[torch.optim.Optimizer], lr: float, cfg) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            # the gates follow the backbone schedule unless they have their own (constant) lr
            scheduled = group.get("role") == "backbone" or cfg.gate_lr is None
            group["lr"] = lr if scheduled else cfg.gate_lr


def freeze_batchnorm(model: nn.Module) -> None:
    """Use and keep the running BatchNorm statistics (call after ``model.train()``)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def block_costs(table: MacTable, kind: str) -> torch.Tensor:
    """C_j per gate: ones (the paper), or each block's saved MACs relative to the mean (mean 1)."""
    if kind == "uniform":
        return torch.ones(table.num_gates)
    saved = block_savings(table)
    return (saved / saved.mean()).float()


def block_savings(table: MacTable) -> torch.Tensor:
    """MACs saved per image by skipping each gated block (N,): F_i - S_i."""
    return torch.tensor([f - s for f, s in zip(table.block_full, table.block_skip)], dtype=torch.float64)


def step_generator(device: torch.device, seed: int, step: int, rank: int) -> torch.Generator:
    """The RNG of one step's gate sampling, a function of (seed, step, rank): resume needs no RNG state."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1009 + rank)
    return g


# --- the step -------------------------------------------------------------------------------------------------

@dataclass
class StageState:
    """Everything besides the model and the optimisers that the loop carries from step to step."""

    controller: AlphaController | None = None
    threshold: ThresholdController | None = None
    baseline: GateBaseline | None = None
    costs: torch.Tensor | None = None
    dense_macs: float = 1.0
    table: MacTable | None = None
    savings: tuple[torch.Tensor, float] | None = None  # threshold controller: saved MACs per block, base cost
    extra: dict[str, Any] = field(default_factory=dict)


def new_stage_state(cfg, table: MacTable, total_steps: int, device: torch.device) -> StageState:
    """The controllers, baseline and costs the stage ``cfg`` needs, fresh."""
    state = StageState(dense_macs=float(table.plain), table=table)
    if controlled_threshold(cfg):
        state.savings = (block_savings(table) / table.plain,
                         float(table.per_image(torch.zeros(1, table.num_gates))[0]) / table.plain)
        state.threshold = ThresholdController(cfg.target_macs, round(cfg.target_ramp * total_steps), cfg.threshold_gain)
    elif cfg.stage == "hrl":
        state.controller = AlphaController(cfg.alpha, cfg.target_macs, cfg.alpha_lr, cfg.alpha_max, cfg.cost_ema)
        state.baseline = GateBaseline(cfg.baseline_momentum) if cfg.baseline == "ema" else None
        state.costs = block_costs(table, cfg.cost).to(device)
    return state


def update_controllers(model: nn.Module, state: StageState, stats: dict[str, torch.Tensor],
                       gate_logits: torch.Tensor | None, world: int = 1) -> None:
    """After an optimiser step: the α controller sees the step's cost; the threshold controller moves the
    gates' output biases. Under DDP every rank first takes the global mean cost (and baseline) and the mean
    shift, so that all ranks stay identical."""
    if world > 1:  # every rank's controller and baseline see the same global numbers
        _all_mean(stats["macs"])
        if "greedy_macs" in stats:
            _all_mean(stats["greedy_macs"])
        if state.baseline is not None and state.baseline.value is not None:
            _all_mean(state.baseline.value)
    if state.controller is not None:
        state.controller.update(float(stats["greedy_macs"]))
    if state.threshold is not None:
        shift = state.threshold.update(float(stats["greedy_macs"]), gate_logits, *state.savings)
        if world > 1:  # each rank saw its own slice: all take the mean shift
            shift_t = torch.tensor(shift, dtype=torch.float64, device=stats["macs"].device)
            _all_mean(shift_t)
            state.threshold.offset += float(shift_t) - shift  # the offset is what was applied
            shift = float(shift_t)
        with torch.no_grad():
            for bias in model.gates.output_biases():
                bias.add_(shift)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, state: StageState,
               generator: torch.Generator | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + loss. Returns the loss to backpropagate and detached statistics."""
    if controlled_threshold(cfg):
        out = model(x, "straight_through")  # the decisions greedy inference takes; the threshold does the rest
        total = sp_loss(out.logits, y)
    elif cfg.stage == "hrl":
        out = model(x, "sample", temperature=cfg.temperature, generator=generator)
        loss = hrl_loss(out.logits, y, out.log_probs, out.decisions, alpha=state.controller.alpha, beta=cfg.beta,
                        rl_weight=cfg.rl_weight, reduction=cfg.rl_reduction, costs=state.costs,
                        baseline=None if state.baseline is None else state.baseline.value, cap=cfg.skip_cap)
        if state.baseline is not None:
            state.baseline.update(loss.returns)
        total = loss.total
    else:
        out = (model(x, "straight_through", drop_rate=cfg.drop_rate, generator=generator) if cfg.stage == "sp"
               else model(x))
        total = sp_loss(out.logits, y)
    stats = {
        "loss": total.detach(),
        "correct": (out.logits.argmax(1) == y).sum().detach(),
        "exec": out.decisions.mean().detach(),
        "macs": (out.macs.mean() / state.dense_macs).detach(),
    }
    if cfg.stage == "hrl":
        # What inference (greedy, tau 0.5) would spend at these gate inputs: the controller steers this one,
        # so that an exploration temperature does not distort the compute target.
        greedy = (out.probs.detach() >= 0.5).to(out.macs.dtype)
        stats["greedy_macs"] = (state.table.per_image(greedy).mean() / state.dense_macs).detach()
    if controlled_threshold(cfg):
        # for the threshold controller (float32 probabilities saturate beyond |logit| ~ 17: far from any threshold)
        stats["logits"] = torch.logit(out.probs.detach().double()).clamp(-30.0, 30.0)
    return total, stats


# --- the run --------------------------------------------------------------------------------------------------

class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread: leave the handlers alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise CheckpointError(f"nothing to resume in {run_dir}: no checkpoints/last.pt")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunExistsError(
                f"run folder {run_dir} exists and is not empty; choose another --run-dir, --resume it, "
                "or pass --overwrite to replace it"
            )
        import shutil

        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)


def load_data(cfg: RunConfig) -> tuple[ImageData, ImageData]:
    d = cfg.data
    cache = Path(d.cache_dir) if d.cache_dir else None
    return (load_dataset(d.name, d.root, d.train_split, cache_dir=cache),
            load_dataset(d.name, d.root, d.test_split, cache_dir=cache))


class StreamBatches:
    """A streamed ImageFolder with the interface of :class:`~skipnet.data.BatchLoader` (``epoch``, ``len``):
    batches are decoded by DataLoader workers and moved to ``device``. Resuming mid-epoch keeps the order
    (the sampler's indices are cut); the workers' augmentation draws may differ from the first attempt."""

    def __init__(self, cfg: RunConfig, split: str, batch_size: int, *, train: bool, device: torch.device,
                 rank: int = 0, world: int = 1):
        from ..data import make_stream_loader

        d = cfg.data
        if d.root is None:
            raise ValueError("streaming needs data.root (a folder with train/ and val/ ImageFolder trees)")
        self.loader = make_stream_loader(d.root, split, batch_size, train=train, image_size=d.image_size,
                                         workers=d.workers, seed=cfg.train.seed, rank=rank, world_size=world)
        self.device, self.batch_size = device, batch_size
        dataset = self.loader.dataset
        self.num_classes, self.in_channels = len(dataset.classes), 3
        self.image_size = (d.image_size, d.image_size)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        indices = list(sampler)[start_step * self.batch_size:]
        loader = torch.utils.data.DataLoader(
            self.loader.dataset, batch_size=self.batch_size, sampler=indices, num_workers=self.loader.num_workers,
            pin_memory=self.loader.pin_memory, drop_last=self.loader.drop_last)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


def make_loaders(config: RunConfig, device: torch.device, rank: int, world: int,
                 data: tuple[ImageData, ImageData] | None) -> tuple[Any, Any, dict[str, Any]]:
    """The training and test batch sources and what the model needs to know of the data."""
    d, t = config.data, config.train
    if d.batch_size % world:
        raise ValueError(f"batch_size {d.batch_size} must divide evenly over {world} processes")
    if d.stream and data is None:
        train_b = StreamBatches(config, d.train_split, d.batch_size // world, train=True, device=device,
                                rank=rank, world=world)
        test_b = StreamBatches(config, d.test_split, d.eval_batch_size, train=False, device=device)
        return train_b, test_b, {"num_classes": train_b.num_classes, "in_channels": 3,
                                 "image_size": train_b.image_size}
    train_data, test_data = data or load_data(config)
    train_b = BatchLoader(train_data, d.batch_size // world, train=True, device=device, augment=d.augment,
                          crop_padding=d.crop_padding, flip=d.flip, seed=t.seed, channels_last=t.channels_last,
                          rank=rank, world_size=world)
    test_b = BatchLoader(test_data, d.eval_batch_size, train=False, device=device)
    return train_b, test_b, {"num_classes": train_data.num_classes, "in_channels": train_data.in_channels,
                             "image_size": train_data.image_size}


def build_model(cfg: RunConfig, num_classes: int, in_channels: int) -> SkipResNet:
    m = cfg.model
    overrides = dict(gate="none" if cfg.train.stage == "baseline" else m.gate, embed_dim=m.embed_dim,
                     hidden_dim=m.hidden_dim, num_classes=m.num_classes or num_classes,
                     in_channels=m.in_channels or in_channels)
    return create_model(m.name, **overrides)


def init_from(model: SkipResNet, path: str) -> None:
    """Start from another run's weights (HRL from SP): the backbone and, when present, the gates."""
    payload = load_checkpoint(path)
    source = build_model_from_checkpoint(payload, path)
    state = source.state_dict()
    if not model.is_gated:
        state = {k: v for k, v in state.items() if not k.startswith("gates.")}
    elif not source.is_gated:  # a plain network's weights into a gated one: gates start fresh
        state = {**model.state_dict(), **state}
    load_state(model, state, path)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _metrics_writer(path: Path, keep_until_step: int | None) -> Any:
    if keep_until_step is not None and path.exists():  # resume: drop lines written after the checkpoint
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= keep_until_step]
        path.write_text("".join(ln + "\n" for ln in kept))
    return path.open("a")


def train(config: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, data: tuple[ImageData, ImageData] | None = None,
          max_steps: int | None = None) -> dict[str, Any]:
    """Train one stage into ``run_dir``; returns the final evaluation. ``max_steps`` stops early (tests)."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    cfg = config.train
    rank, world = _distributed()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if rank == 0:
        prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if world > 1:
        dist.barrier()

    loader, test_loader, info = make_loaders(config, device, rank, world, data)
    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed
    model = build_model(config, info["num_classes"], info["in_channels"])
    if cfg.init and not resume:
        init_from(model, cfg.init)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizers = build_optimizers(model, cfg)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set gives no full batch of {config.data.batch_size // world} images per "
                         "process: lower data.batch_size")
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    table = model.mac_table(info["image_size"])
    state = new_stage_state(cfg, table, total_steps, device)
    random_gates = cfg.stage == "hrl" or cfg.drop_rate > 0  # steps draw from step_generator
    step = 0
    if resume:
        payload = load_checkpoint(run_dir / "checkpoints" / "last.pt", map_location=device)
        load_state(model, payload["model"], run_dir)
        for opt, s in zip(optimizers, payload["optimizers"]):
            opt.load_state_dict(s)
        step = int(payload["step"])
        if state.controller is not None:
            state.controller.load_state_dict(payload["controller"])
        if state.threshold is not None:
            state.threshold.load_state_dict(payload["threshold"])
        if state.baseline is not None:
            state.baseline.load_state_dict(payload["baseline"], device)
        torch.set_rng_state(payload["rng_cpu"])
        log.info("resumed %s at step %d", run_dir, step)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(finished: bool = False) -> None:
        if rank != 0:
            return
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteLossError(
                f"parameters became non-finite at step {step}; stopped without saving them. The last good "
                f"checkpoint is {run_dir / 'checkpoints' / 'last.pt'} -- lower the learning rate")
        save_checkpoint(run_dir / "checkpoints" / "last.pt", {
            "model_config": model.config.to_dict(), "run_config": config.to_dict(), "model": model.state_dict(),
            "optimizers": [o.state_dict() for o in optimizers], "step": step, "finished": finished,
            "controller": None if state.controller is None else state.controller.state_dict(),
            "threshold": None if state.threshold is None else state.threshold.state_dict(),
            "baseline": None if state.baseline is None else state.baseline.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        })

    metrics = None
    if rank == 0:
        write_config(config, run_dir / "config.yaml")
        metrics = _metrics_writer(run_dir / "metrics.jsonl", step if resume else None)

    def emit(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    eval_steps = max(1, round(cfg.eval_every * steps_per_epoch)) if cfg.eval_every > 0 else None
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    bar = tqdm(total=stop_at, initial=step, disable=not progress or rank != 0, unit="step",
               desc=f"{cfg.stage} {model.config.arch}-{model.config.depth}", dynamic_ncols=True)
    window: dict[str, float] = {}
    window_images, window_start = 0, time.perf_counter()
    try:
        with _StopFlag() as stop:
            while step < stop_at:
                epoch, in_epoch = divmod(step, steps_per_epoch)
                net.train()
                if cfg.stage == "hrl" and cfg.freeze_bn:
                    freeze_batchnorm(net)
                for x, y in loader.epoch(epoch, start_step=in_epoch):
                    set_lrs(optimizers, lr_at(step, steps_per_epoch, cfg), cfg)
                    gen = step_generator(device, cfg.seed, step, rank) if random_gates else None
                    with autocast(device, cfg.amp):
                        loss, stats = train_step(net, x, y, cfg, state, gen)
                    gate_logits = stats.pop("logits", None)
                    if not torch.isfinite(stats["loss"]):
                        raise NonFiniteLossError(
                            f"non-finite loss ({stats['loss'].item()}) at step {step}; stopped. The last good "
                            f"checkpoint is {run_dir / 'checkpoints' / 'last.pt'} -- lower the learning rate")
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for opt in optimizers:
                        opt.step()
                    step += 1
                    update_controllers(model, state, stats, gate_logits, world)
                    for k, v in stats.items():
                        window[k] = window.get(k, 0.0) + float(v)
                    window["n"] = window.get("n", 0) + 1
                    window_images += x.shape[0]
                    elapsed = time.perf_counter() - window_start
                    bar.update(1)
                    bar.set_postfix(img_s=f"{window_images * world / max(elapsed, 1e-9):.0f}",
                                    loss=f"{window['loss'] / window['n']:.3f}",
                                    acc=f"{100 * window['correct'] / max(window_images, 1):.1f}",
                                    skip=f"{100 * (1 - window['exec'] / window['n']):.0f}%", refresh=False)
                    if step % cfg.log_every == 0 or step == stop_at:
                        rec = {"step": step, "epoch": step / steps_per_epoch,
                               "lr": lr_at(step - 1, steps_per_epoch, cfg), "loss": window["loss"] / window["n"],
                               "train_acc": 100 * window["correct"] / max(window_images, 1),
                               "exec_rate": window["exec"] / window["n"], "mac_fraction": window["macs"] / window["n"],
                               "images_per_s": window_images * world / max(elapsed, 1e-9)}
                        if state.controller is not None:
                            rec["alpha"] = state.controller.alpha
                        if state.threshold is not None:
                            rec["target_mac_fraction"] = state.threshold.target_now()
                            rec["threshold_offset"] = state.threshold.offset
                        if "greedy_macs" in window:
                            rec["greedy_mac_fraction"] = window["greedy_macs"] / window["n"]
                        emit(rec)
                        window, window_images, window_start = {}, 0, time.perf_counter()
                    if stop.signal is not None:
                        checkpoint()
                        raise Interrupted(f"stopped by signal {stop.signal} at step {step}; checkpoint written, "
                                          f"continue with --resume {run_dir}")
                    if step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0:
                        checkpoint()
                    if eval_steps and step % eval_steps == 0 and step < stop_at and rank == 0:
                        result = evaluate(model, test_loader, tau=cfg.tau, amp=cfg.amp, progress=False)
                        emit({"step": step, "epoch": step / steps_per_epoch, **_prefixed(result, "test_")})
                        net.train()
                        if cfg.stage == "hrl" and cfg.freeze_bn:
                            freeze_batchnorm(net)
                    if step >= stop_at:
                        break
        checkpoint(finished=step >= total_steps)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    result: dict[str, Any] = {}
    if rank == 0:
        result = evaluate(model, test_loader, tau=cfg.tau, amp=cfg.amp, progress=progress)
        result.update(step=step, epochs=step / steps_per_epoch)
        emit_final = {"step": step, "epoch": step / steps_per_epoch, **_prefixed(result, "test_")}
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(emit_final) + "\n")
        (run_dir / "final.json").write_text(json.dumps(result, indent=2))
    if world > 1:
        dist.barrier()
    return result


def _all_mean(t: torch.Tensor) -> None:
    dist.all_reduce(t)
    t /= dist.get_world_size()


def _prefixed(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k: v for k, v in d.items() if not isinstance(v, (list, dict))}

