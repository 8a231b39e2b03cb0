"""Latency and throughput of the executors (SPEC §8.1, §8.4): measured time next to the MAC count.

:func:`run_bench` times, for each batch size and execution rate, the plain ResNet (``dense``), the SkipNet
with the ``masked`` and the ``compact`` executor, and ``per_image`` (the compact executor over the images
one at a time: what serving a batch at batch size 1 would do). It reports the median and p90 latency per
batch, images/s, the speed-up over ``dense`` and the compute-ideal speed-up of the same decisions
(``ideal_speedup`` = plain-network MACs / mean SkipNet MACs, gates included, from the analytic
:meth:`~skipnet.models.SkipResNet.mac_table`).

Method (airbench-style): eval mode under ``torch.inference_mode()``; every executor of one (batch size,
rate) group is warmed up, then the executors are timed *interleaved*, one call each per round, so that a
change in machine load hits them alike and the ratios stay fair; wall clock on the CPU, CUDA events after a
synchronise on a GPU. Record :func:`bench_environment` (torch version, device, threads, load) with the rows.

Decisions: for a preset name (random weights) the SkipNet runs in ``mode="fixed"`` with per-image, per-gate
Bernoulli(rate) decisions drawn from ``seed`` (the gates still run and are charged); with
``decisions_from_model=True`` a trained model takes its own greedy decisions and the rate is measured.
The draws are nested: an image's executed blocks at rate 0.25 are a subset of those at 0.5.

Small batches: one timed call covers at least ``min_images`` images (default 32). A batch smaller than that
is timed as ``draws`` = ceil(min_images / B) different batches in a row -- their own images and decisions --
and the latency is per batch; the ideal speed-up is that of all their decisions. One draw at batch 1 is one
set of coin flips (17 for SkipNet-38), whose mix of cheap and dear blocks the MAC count does not see (at
batch 1 a first-stage block of a CIFAR ResNet can take longer than a later one of the same MACs), so one
draw's speed-up could land well off the rate's own.

Executors: ``dense`` is the plain network, ``compact`` and ``per_image`` the gated one, all three through
:class:`~skipnet.infer.CompactRunner` (the same block code, the same merge kernel); ``masked`` is the model's
own forward. Extra executor ``compact_no_gates``: the compact runner with the gate computation bypassed
(``gates=False``, same fixed decisions). ``gate_share`` of a compact row = 1 - time(no gates) /
time(compact): the gate's share of the latency (RNN gates only: the share the targets speak of).

Memory format: ``memory_format`` ("contiguous", the default: the models' own layout, or "channels_last")
applies to the networks and the inputs alike, dense and SkipNet. Which is faster depends on the machine and
the thread count (``benchmarks/bench_executors.py --memory-format-check`` measures it; docs/RESULTS.md has
the figures); the speed-up ratios barely depend on it.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .infer import CompactRunner
from .models import RNNGateBank, SkipResNet, create_model

EXECUTOR_NAMES = ("dense", "masked", "compact", "per_image", "compact_no_gates")
DEFAULT_EXECUTORS = ("dense", "masked", "compact", "per_image")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def bench_environment(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """What the numbers depend on: versions, device, threads, dtype, git commit, load (CPU)."""
    device = torch.device(device)
    env: dict = {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "dtype": str(dtype).replace("torch.", ""),
        "mkldnn": torch.backends.mkldnn.is_available(),
        **_git_state(),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def run_bench(
    model: str | SkipResNet,
    *,
    batch_sizes: Sequence[int] = (1, 8, 64, 256),
    exec_rates: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    executors: Sequence[str] = DEFAULT_EXECUTORS,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 2,
    repeats: int | None = None,
    budget_s: float = 2.0,
    input_size: int | tuple[int, int] | None = None,
    in_channels: int | None = None,
    seed: int = 0,
    decisions_from_model: bool = False,
    tau: float = 0.5,
    inputs: Tensor | None = None,
    gate: str = "rnn",
    memory_format: str = "contiguous",
    per_image_max_calls: int = 96,
    clock: str = "wall",
    min_images: int = 32,
) -> list[dict]:
    """Time the executors; one row (a dict) per (batch size, rate, executor). See the module docstring.

    ``model``: a preset name (built with ``gate`` and random weights; the plain network gets the same
    backbone weights) or a :class:`SkipResNet` (trained, say; it is put in eval mode and moved to ``device``,
    ``dtype`` and ``memory_format``). ``exec_rates``: execution rates for random
    fixed decisions; ignored with ``decisions_from_model`` (then the model's greedy decisions at ``tau``,
    one group per batch size, and the rate is measured). ``inputs``: images (M, C, H, W) to draw batches
    from, cycled (default: seeded Gaussian noise of ``input_size`` (32 for CIFAR presets, 224 for
    ImageNet ones) and ``in_channels``). ``repeats``: timed rounds per group; ``None`` picks 5-50 rounds to
    fill about ``budget_s`` seconds. ``per_image`` is affordable at large batches because each of its calls
    already runs B forward passes: it gets at most ``per_image_max_calls // (B * draws)`` rounds (at least 1); each
    row records its ``repeats``. ``clock``: ``"wall"`` (latency; CUDA events on a GPU) or ``"cpu"``: the
    process's CPU time, which other processes' load on a shared machine does not inflate -- equal to the
    latency only with ``torch.set_num_threads(1)`` (CPU only). ``min_images``: a timed call runs
    ``draws`` = ceil(min_images / batch) batches, each with its own images and decisions (see the module
    docstring); rows record ``draws``. Rows hold plain Python numbers (JSON-ready).
    """
    device = torch.device(device)
    unknown = set(executors) - set(EXECUTOR_NAMES)
    if unknown:
        raise ValueError(f"unknown executor(s) {sorted(unknown)}; choose from {EXECUTOR_NAMES}")
    if clock not in ("wall", "cpu") or (clock == "cpu" and device.type != "cpu"):
        raise ValueError(f"clock must be 'wall', or 'cpu' on a CPU device; got {clock!r} on {device}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {memory_format!r}; choose from {sorted(MEMORY_FORMATS)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be positive integers; got {batch_sizes}")
    if not decisions_from_model and (not exec_rates or not all(0.0 <= r <= 1.0 for r in exec_rates)):
        raise ValueError(f"execution rates must lie in [0, 1]; got {exec_rates}")
    if warmup < 0 or (repeats is not None and repeats < 1):
        raise ValueError(f"need warmup >= 0 and repeats >= 1; got {warmup}, {repeats}")
    if min_images < 1:
        raise ValueError(f"min_images must be a positive integer; got {min_images}")
    if getattr(model, "method", None):  # ACT, SACT, SDV: no gates to replay
        raise ValueError(f"run_bench times SkipNets; time this {model.method.upper()} model with "
                         "benchmarks/bench_rivals.py <run> (plain, masked and compact beside its MACs)")
    gated, plain, name = _build_pair(model, gate, in_channels)
    if not gated.is_gated:
        raise ValueError("run_bench needs a gated model (the plain network is built from it)")
    fmt = MEMORY_FORMATS[memory_format]
    for m in (gated, plain):
        m.to(device=device, dtype=dtype, memory_format=fmt).eval()
    cfg = gated.config
    if input_size is None:
        input_size = inputs.shape[-2:] if inputs is not None else (224 if cfg.arch == "imagenet" else 32)
    hw = (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
    table = gated.mac_table(hw)
    groups = [None] if decisions_from_model else list(exec_rates)

    rows: list[dict] = []
    for batch in batch_sizes:
        draws = math.ceil(min_images / batch)
        x = _batch(inputs, batch * draws, cfg.in_channels, hw, seed).to(device=device, dtype=dtype,
                                                                        memory_format=fmt)
        uniform = torch.rand(batch * draws, gated.num_gates, generator=torch.Generator().manual_seed(seed))
        xs = x.split(batch)
        for rate in groups:
            with torch.inference_mode():
                if rate is None:
                    dec = torch.cat([gated(xb, "greedy", tau=tau, executor="compact").decisions.float() for xb in xs])
                else:
                    dec = (uniform < rate).float()
            dec = dec.to(device)
            fns = _callables(gated, plain, xs, dec.split(batch), rate is None, tau, executors)
            times = _time_interleaved(fns, warmup, repeats, budget_s, per_image_max_calls, batch * draws, device,
                                      clock)
            times = {k: [t / draws for t in v] for k, v in times.items()}  # per batch
            macs = float(table.per_image(dec.cpu()).mean())
            ideal = table.plain / macs
            measured = float(dec.mean())
            dense_med = statistics.median(times["dense"]) if "dense" in times else None
            no_gates = statistics.median(times["compact_no_gates"]) if "compact_no_gates" in times else None
            for ex in executors:
                t = times[ex]
                med = statistics.median(t)
                row = {
                    "model": name,
                    "executor": ex,
                    "batch_size": batch,
                    "exec_rate": measured if rate is None else float(rate),
                    "measured_exec_rate": measured,
                    "latency_ms_p50": med * 1e3,
                    "latency_ms_p90": _quantile(t, 0.9) * 1e3,
                    "images_per_s": batch / med,
                    "speedup_vs_dense": dense_med / med if dense_med is not None else None,
                    "ideal_speedup": 1.0 if ex == "dense" else ideal,
                    "macs_per_image": float(table.plain) if ex == "dense" else macs,
                    "repeats": len(t),
                    "draws": draws,
                    "clock": clock,
                }
                if dense_med is not None:  # the speed-up reached, as a fraction of the compute-ideal one
                    row["efficiency"] = row["speedup_vs_dense"] / row["ideal_speedup"]
                if ex == "compact" and no_gates is not None:
                    row["gate_share"] = 1.0 - no_gates / med
                rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of :func:`run_bench` rows."""
    cols = [
        ("model", "model", "{}"), ("executor", "executor", "{}"), ("batch_size", "batch", "{:d}"),
        ("exec_rate", "rate", "{:.2f}"), ("latency_ms_p50", "p50 ms", "{:.2f}"), ("latency_ms_p90", "p90 ms", "{:.2f}"),
        ("images_per_s", "img/s", "{:.1f}"), ("speedup_vs_dense", "speedup", "{:.3f}"),
        ("ideal_speedup", "ideal", "{:.3f}"), ("efficiency", "eff", "{:.3f}"), ("gate_share", "gate", "{:.1%}"),
        ("repeats", "reps", "{:d}"),
    ]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([f.format(r[k]) if r.get(k) is not None else "" for k, _, f in cols])
    widths = [max(len(line[j]) for line in cells) for j in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if j > 1 else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- helpers ---------------------------------------------------------------------------------------------------

def _build_pair(model: str | SkipResNet, gate: str, in_channels: int | None) -> tuple[SkipResNet, SkipResNet, str]:
    """The gated network and the plain one holding the same backbone weights."""
    if isinstance(model, str):
        overrides = {} if in_channels is None else {"in_channels": in_channels}
        gated = create_model(model, gate=gate, **overrides)
        name = model if gate == "rnn" else f"{model}[{gate}]"
    elif isinstance(model, SkipResNet):
        gated = model
        c = model.config
        name = f"{c.arch}_resnet{c.depth}[{c.gate}]" if c.arch == "cifar" else f"resnet{c.depth}[{c.gate}]"
    else:
        raise ValueError(f"expected a preset name or a SkipResNet; got {type(model).__name__}")
    plain = SkipResNet(replace(gated.config, gate="none"))
    result = plain.load_state_dict(gated.state_dict(), strict=False)
    if result.missing_keys:
        raise ValueError(f"backbone weights did not transfer to the plain network: missing {result.missing_keys}")
    return gated, plain, name


def _batch(inputs: Tensor | None, batch: int, channels: int, hw: tuple[int, int], seed: int) -> Tensor:
    if inputs is None:
        return torch.randn(batch, channels, *hw, generator=torch.Generator().manual_seed(seed))
    if inputs.dim() != 4 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty (M, C, H, W) batch; got shape {tuple(inputs.shape)}")
    reps = math.ceil(batch / inputs.shape[0])
    return inputs.repeat(reps, 1, 1, 1)[:batch].float().contiguous()


def _callables(
    gated: SkipResNet, plain: SkipResNet, xs: Sequence[Tensor], decs: Sequence[Tensor], greedy: bool, tau: float,
    executors: Sequence[str],
) -> dict[str, Callable[[], object]]:
    """One callable per executor, each running every batch of ``xs`` (with its decisions ``decs``) once."""
    gated_runner, plain_runner = CompactRunner(gated), CompactRunner(plain)

    def skipnet(xb: Tensor, db: Tensor, **kw) -> object:
        if greedy:
            return gated_runner(xb, "greedy", tau=tau, **kw)
        return gated_runner(xb, "fixed", decisions=db, **kw)

    def compact(**kw) -> Callable[[], None]:
        def run() -> None:
            for xb, db in zip(xs, decs):
                skipnet(xb, db, **kw)

        return run

    def masked() -> None:
        for xb, db in zip(xs, decs):
            if greedy:
                gated(xb, "greedy", tau=tau)
            else:
                gated(xb, "fixed", decisions=db)

    def dense() -> None:
        for xb in xs:
            plain_runner(xb)

    def per_image() -> None:
        for xb, db in zip(xs, decs):
            for i in range(xb.shape[0]):
                skipnet(xb[i : i + 1], db[i : i + 1])

    if "compact_no_gates" in executors:
        if greedy:
            raise ValueError("compact_no_gates needs fixed decisions (not decisions_from_model)")
        if not isinstance(gated.gates, RNNGateBank):
            raise ValueError("compact_no_gates measures the RNN gates' share of the latency: it needs RNN gates")

    table = {
        "dense": dense,
        "masked": masked,
        "compact": compact(),
        "per_image": per_image,
        "compact_no_gates": compact(gates=False),
    }
    return {k: table[k] for k in executors}


def _time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int | None, budget_s: float, per_image_max_calls: int,
    batch: int, device: torch.device, clock: str,
) -> dict[str, list[float]]:
    """Warm every callable up, then time them round-robin; seconds per call."""
    cuda = device.type == "cuda"
    timer = time.process_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        # One timed round to size the rest.
        for k, fn in fns.items():
            times[k].append(_time_one(fn, cuda, device, timer))
        if repeats is None:
            round_s = sum(t[0] for t in times.values())
            repeats = int(min(50, max(5, budget_s / max(round_s, 1e-9))))
        per_image_rounds = min(repeats, max(1, per_image_max_calls // batch))
        for r in range(1, repeats):
            for k, fn in fns.items():
                if k == "per_image" and r >= per_image_rounds:
                    continue
                times[k].append(_time_one(fn, cuda, device, timer))
    return times


def _time_one(fn: Callable[[], object], cuda: bool, device: torch.device, timer: Callable[[], float]) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = timer()
    fn()
    return timer() - t0


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default); the single value for one sample."""
    return float(np.quantile(np.asarray(values, dtype=np.float64), q))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "cpu"
    return str(device)


def _git_state() -> dict:
    """The commit of the source tree this module runs from, and whether it has uncommitted changes."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return {"commit": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}
