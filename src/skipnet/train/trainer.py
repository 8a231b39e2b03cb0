"""The training loop for every stage, read top to bottom: :func:`train` sets a run up, :func:`train_one_epoch`
runs the steps, :func:`~skipnet.train.evaluate.evaluate` measures.

What a step computes belongs to the stage object (:mod:`.stages`); the run folder (config, metrics,
checkpoints) to :mod:`.runs`. Runs on one device, or on several under ``torchrun`` (DDP: each rank takes its
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

from ..data import BatchLoader, ImageData, load_dataset
from ..models import SkipResNet, create_model
from ..models.rivals import RivalResNet, create_rival
from ..progress import progress_bar
from .checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint, load_state
from .config import RIVAL_STAGES, RunConfig
from .device import autocast, resolve_device
from .evaluate import evaluate
from .operating import fit_tau
from .runs import (
    NonFiniteLossError,
    RunBusyError,
    RunExistsError,
    RunFolder,
    RunLock,
    config_differences,
    discard_failed_start,
    prefixed,
    prepare_run_dir,
    resume_point,
)
from .stages import Stage, make_stage

log = logging.getLogger(__name__)

__all__ = ["Interrupted", "NonFiniteLossError", "RunBusyError", "RunExistsError", "train", "train_one_epoch", "lr_at"]


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""


def lr_at(step: int, steps_per_epoch: int, cfg) -> float:
    """The backbone learning rate at a global step of the stage: warm-up, then step decay at ``milestones``
    (epochs) or a cosine from ``lr`` to 0 over ``cosine_epochs`` (default: the stage), of which the stage
    runs the part from ``cosine_start``."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr
    if cfg.schedule == "cosine":
        length = (cfg.epochs if cfg.cosine_epochs is None else cfg.cosine_epochs) * steps_per_epoch
        t = (cfg.cosine_start * steps_per_epoch + step - cfg.warmup_steps) / max(length - cfg.warmup_steps, 1)
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    passed = sum(1 for m in cfg.milestones if step >= round(m * steps_per_epoch))
    return cfg.lr * cfg.gamma**passed


def set_lrs(optimizers: list[torch.optim.Optimizer], lr: float, cfg) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            # the gates follow the backbone schedule unless they have their own (constant) lr
            scheduled = group.get("role") == "backbone" or cfg.gate_lr is None
            group["lr"] = lr if scheduled else cfg.gate_lr


def step_generator(device: torch.device, seed: int, step: int, rank: int) -> torch.Generator:
    """The RNG of one step's gate sampling, a function of (seed, step, rank): resume needs no RNG state."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1009 + rank)
    return g


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
        fit_b = StreamBatches(config, d.train_split, d.eval_batch_size, train=False, device=device)
        return train_b, test_b, {"num_classes": train_b.num_classes, "in_channels": 3,
                                 "image_size": train_b.image_size, "name": Path(d.root).name, "train_eval": fit_b}
    train_data, test_data = data or load_data(config)
    train_b = BatchLoader(train_data, d.batch_size // world, train=True, device=device, augment=d.augment,
                          crop_padding=d.crop_padding, flip=d.flip, seed=t.seed, channels_last=t.channels_last,
                          rank=rank, world_size=world)
    test_b = BatchLoader(test_data, d.eval_batch_size, train=False, device=device)
    fit_b = BatchLoader(train_data, d.eval_batch_size, train=False, device=device)
    return train_b, test_b, {"num_classes": train_data.num_classes, "in_channels": train_data.in_channels,
                             "image_size": train_data.image_size, "name": train_data.name, "train_eval": fit_b}


def build_model(cfg: RunConfig, num_classes: int, in_channels: int) -> SkipResNet | RivalResNet:
    m = cfg.model
    for key, given, found in (("num_classes", m.num_classes, num_classes), ("in_channels", m.in_channels, in_channels)):
        if given is not None and given != found:
            raise ValueError(f"model.{key} is {given} but the data has {found}: leave it unset to take the data's")
    if cfg.train.stage in RIVAL_STAGES:  # ACT, SACT or random skipping on the preset's plain ResNet
        if m.layout is not None or m.depth is not None:
            raise ValueError(f"model.layout and model.depth are not available to the {cfg.train.stage} stage (its "
                             "presets keep their depth and n, n, n layout)")
        return create_rival(cfg.train.stage, m.name, num_classes=m.num_classes or num_classes,
                            in_channels=m.in_channels or in_channels,
                            **({"drop_rate": cfg.train.drop_rate} if cfg.train.stage == "sdv" else
                               {"halt_eps": m.halt_eps}))
    overrides = dict(gate="none" if cfg.train.stage == "baseline" else m.gate, embed_dim=m.embed_dim,
                     hidden_dim=m.hidden_dim, num_classes=m.num_classes or num_classes,
                     in_channels=m.in_channels or in_channels)
    if m.layout is not None:
        overrides["layout"] = m.layout
    if m.depth is not None:
        overrides["depth"] = m.depth
    return create_model(m.name, **overrides)


def init_from(model: SkipResNet, path: str) -> None:
    """Start from another run's weights (HRL from SP): the backbone and, when present, the gates. A rival
    (ACT, SACT, SDV) takes the source's whole backbone (a plain ResNet's, a SkipNet's without its gates, or
    another rival's); its halting units start fresh unless the source has them too."""
    payload = load_checkpoint(path)
    source = build_model_from_checkpoint(payload, path)
    state = source.state_dict()
    if isinstance(model, RivalResNet):
        own = model.state_dict()
        fresh = {k: v for k, v in own.items() if k.startswith("halting.") and k not in state}
        state = {**fresh, **{k: v for k, v in state.items() if k in own}}  # (a missing backbone key: an error)
    elif not model.is_gated:
        state = {k: v for k, v in state.items() if not k.startswith("gates.")}
    elif not source.is_gated:  # a plain network's weights into a gated one: gates start fresh
        state = {**model.state_dict(), **state}
    load_state(model, state, path)


def fit_operating_tau(model: SkipResNet, batches: Any, cfg) -> float:
    """Set tau so that greedy inference spends ``target_macs`` on the first ``fit_images`` training images
    (unaugmented; see :mod:`.operating`)."""
    images, count = [], 0
    for x, _ in batches:
        images.append(x[: cfg.fit_images - count])
        count += images[-1].shape[0]
        if count >= cfg.fit_images:
            break
    tau, fraction = fit_tau(model, images, cfg.target_macs)
    log.info("operating tau %.4f: greedy MACs %.3f of the plain network on %d training images (target %.3f)",
             tau, fraction, count, cfg.target_macs)
    return tau


def sharpen_gates(model: SkipResNet, temperature: float) -> None:
    """Divide the gates' output layers by ``temperature`` once (the paper's ImageNet HRL: 0.05 sharpens the
    policy when the stage starts). The change is in the weights, so checkpoints carry it."""
    if temperature == 1.0 or model.gates is None:
        return
    with torch.no_grad():
        for layer in model.gates.output_layers():
            layer.weight.div_(temperature)
            layer.bias.div_(temperature)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


# --- the loop -------------------------------------------------------------------------------------------------

@dataclass
class Schedule:
    """Where the loop is and when it writes: steps are global (over epochs), ``stop_at`` <= ``total``."""

    steps_per_epoch: int
    total: int
    stop_at: int
    log_every: int
    checkpoint_every: int
    eval_every: int | None  # steps, or None: only at the end


@dataclass
class Window:
    """Statistics summed over the steps since the last metric line."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    start: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.sums, self.steps, self.images, self.start = {}, 0, 0, time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor], images: int) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.steps += 1
        self.images += images

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.steps, 1)

    def images_per_s(self, world: int) -> float:
        return self.images * world / max(time.perf_counter() - self.start, 1e-9)

    def record(self, step: int, sched: Schedule, lr: float, world: int) -> dict[str, Any]:
        rec = {"step": step, "epoch": step / sched.steps_per_epoch, "lr": lr, "loss": self.mean("loss"),
               "train_acc": 100 * self.sums["correct"] / max(self.images, 1), "exec_rate": self.mean("exec"),
               "mac_fraction": self.mean("macs"), "images_per_s": self.images_per_s(world)}
        for key in ("expected_macs", "greedy_macs"):
            if key in self.sums:
                rec[key.replace("macs", "mac_fraction")] = self.mean(key)
        if "ce" in self.sums:  # HRL: "loss" is the surrogate (CE + REINFORCE - entropy); this is the CE
            rec["train_ce"] = self.mean("ce")
        if "ponder" in self.sums:  # ACT/SACT: the mean ponder cost (N + R summed over stages)
            rec["ponder"] = self.mean("ponder")
        return rec


def train_one_epoch(net: nn.Module, model: SkipResNet, stage: Stage, optimizers: list[torch.optim.Optimizer],
                    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], step: int, sched: Schedule, *,
                    folder: RunFolder, stop: _StopFlag, test_loader: Any, bar: Any, window: Window,
                    rank: int = 0, world: int = 1) -> int:
    """Run the steps of one epoch (from ``step``, a global step, until the epoch or ``sched.stop_at`` ends);
    log (``window`` sums the statistics since the last metric line, across epochs), checkpoint and evaluate
    on the way. Returns the global step reached."""
    cfg = stage.cfg
    device = next(model.parameters()).device
    stage.train_mode(net)
    for x, y in batches:
        lr = lr_at(step, sched.steps_per_epoch, cfg)
        set_lrs(optimizers, lr, cfg)
        gen = step_generator(device, cfg.seed, step, rank) if stage.draws_random else None
        with autocast(device, cfg.amp):
            loss, stats = stage.loss(net, x, y, gen)
        if not torch.isfinite(stats["loss"]):
            raise NonFiniteLossError(f"non-finite loss ({stats['loss'].item()}) at step {step}; stopped. "
                                     f"{folder.kept()} -- lower the learning rate"
                                     + (" or leave BatchNorm live (train.freeze_bn=false)"
                                        if stage.freezes_bn else ""))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        step += 1
        stage.after_step(stats)
        window.add(stats, x.shape[0])
        bar.update(1)
        bar.set_postfix(img_s=f"{window.images_per_s(world):.0f}", loss=f"{window.mean('loss'):.3f}",
                        acc=f"{100 * window.sums['correct'] / max(window.images, 1):.1f}",
                        skip=f"{100 * (1 - window.mean('exec')):.0f}%", refresh=False)
        if step % sched.log_every == 0 or step == sched.stop_at:
            folder.emit({**window.record(step, sched, lr, world), **stage.log_fields()})
            window.reset()
        if stop.signal is not None:
            folder.checkpoint(model, optimizers, stage, step, sched.total)
            raise Interrupted(f"stopped by signal {stop.signal} at step {step}; checkpoint written, continue "
                              f"with --resume {folder.path}")
        if step % sched.checkpoint_every == 0 or step % sched.steps_per_epoch == 0:
            folder.checkpoint(model, optimizers, stage, step, sched.total)
        if sched.eval_every and step % sched.eval_every == 0 and step < sched.stop_at and rank == 0:
            result = evaluate(model, test_loader, tau=cfg.tau, amp=cfg.amp, progress=False)
            folder.emit({"step": step, "epoch": step / sched.steps_per_epoch, **prefixed(result, "test_")})
            stage.train_mode(net)
        if step >= sched.stop_at:
            break
    return step


def train(config: RunConfig | None, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, data: tuple[ImageData, ImageData] | None = None,
          max_steps: int | None = None) -> dict[str, Any]:
    """Train one stage into ``run_dir``; returns the final evaluation. ``max_steps`` stops early (tests).

    The process holds the run folder's lock for the run's life. ``resume`` continues from the folder's
    checkpoint with the checkpoint's config (``config`` may be None; if given it must agree). A fresh start
    that fails before its first checkpoint removes what it wrote."""
    run_dir = Path(run_dir)
    rank, world = _distributed()
    lock = RunLock(run_dir) if rank == 0 else None
    fresh_failed = False
    try:
        if rank == 0 and not resume:
            prepare_run_dir(run_dir, overwrite=overwrite)
        payload = None
        if resume:
            saved, payload = resume_point(run_dir)
            differ = config_differences(config, saved) if config is not None else []
            if differ:
                raise ValueError(f"--resume continues {run_dir} with its checkpoint's config, which differs from "
                                 f"the one given: {'; '.join(differ[:6])}")
            config = saved
        if config is None:
            raise ValueError("a fresh run needs a config")
        fresh_failed = not resume
        result = _train(config, run_dir, payload, progress=progress, data=data, max_steps=max_steps, rank=rank,
                        world=world)
        fresh_failed = False
        return result
    finally:
        if lock is not None:
            if fresh_failed:
                discard_failed_start(run_dir, lock)
            lock.release()


def _train(config: RunConfig, run_dir: Path, payload: dict[str, Any] | None, *, progress: bool,
           data: tuple[ImageData, ImageData] | None, max_steps: int | None, rank: int, world: int) -> dict[str, Any]:
    """One stage from scratch or ``init``, or resumed from ``payload`` (the run's checkpoint)."""
    resume = payload is not None
    cfg = config.train
    if cfg.stage in ("hrl", "calibrate") and not cfg.init and not resume:
        raise ValueError(f"stage {cfg.stage!r} starts from a trained SP network: set train.init (--init) to the "
                         "SP run folder or checkpoint")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.barrier()
    if payload is not None and payload.get("finished") and (run_dir / "final.json").is_file():
        log.info("%s finished its schedule already (step %d); nothing to resume", run_dir, payload["step"])
        return json.loads((run_dir / "final.json").read_text()) if rank == 0 else {}

    # the data, the model, the stage and its optimisers
    loader, test_loader, info = make_loaders(config, device, rank, world, data)
    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed
    model = build_model(config, info["num_classes"], info["in_channels"])
    if cfg.init and not resume:
        init_from(model, cfg.init)
        if cfg.stage == "hrl":
            sharpen_gates(model, cfg.temperature)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set gives no full batch of {config.data.batch_size // world} images per "
                         "process: lower data.batch_size")
    total = math.ceil(cfg.epochs * steps_per_epoch)
    stage = make_stage(cfg, model, model.mac_table(info["image_size"]), total, device, world)
    optimizers = stage.build_optimizers()

    step = 0
    if payload is not None:
        load_state(model, payload["model"], run_dir)
        for opt, s in zip(optimizers, payload["optimizers"]):
            opt.load_state_dict(s)
        step = int(payload["step"])
        if "stage" not in payload and cfg.stage in ("hrl", "calibrate"):
            raise CheckpointError(f"{run_dir} was written by an older skipnet (before stage objects): its "
                                  f"{cfg.stage} controller state cannot be resumed; start the stage again from "
                                  "its init")
        stage.load_state_dict(payload.get("stage") or {})
        torch.set_rng_state(payload["rng_cpu"])
        log.info("resumed %s at step %d", run_dir, step)
    net: nn.Module = model
    if world > 1:
        # compact passes leave a block no image of this process ran without gradients: let DDP find those
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=config.train.executor == "compact")

    folder = RunFolder(run_dir if rank == 0 else None, config, resumed_at=step if resume else None,
                       run_id=payload.get("run_id") if payload is not None else None)
    folder.image_size = list(info["image_size"])
    sched = Schedule(steps_per_epoch, total, total if max_steps is None else min(total, max_steps),
                     cfg.log_every, cfg.checkpoint_every,
                     max(1, round(cfg.eval_every * steps_per_epoch)) if cfg.eval_every > 0 else None)
    bar = progress_bar(sched.stop_at, initial=step, enabled=progress and rank == 0, unit="step",
                       desc=f"{cfg.stage} {info['name']} {model.config.arch}-{model.config.depth}")
    window = Window()
    try:
        with _StopFlag() as stop:
            while step < sched.stop_at:
                epoch, in_epoch = divmod(step, steps_per_epoch)
                step = train_one_epoch(net, model, stage, optimizers, loader.epoch(epoch, start_step=in_epoch),
                                       step, sched, folder=folder, stop=stop, test_loader=test_loader, bar=bar,
                                       window=window, rank=rank, world=world)
        if cfg.fit_tau and cfg.target_macs is not None and step >= total and rank == 0:
            folder.tau = fit_operating_tau(model, info["train_eval"], cfg)
        folder.checkpoint(model, optimizers, stage, step, total)
    finally:
        bar.close()
        folder.close()
    result: dict[str, Any] = {}
    if rank == 0:
        result = evaluate(model, test_loader, tau=folder.tau, amp=cfg.amp, progress=progress)
        result.update(step=step, epochs=step / steps_per_epoch, total_steps=total, finished=step >= total,
                      run_id=folder.run_id, tau=folder.tau)
        folder.finish(result)
    if world > 1:
        dist.barrier()
    return result
