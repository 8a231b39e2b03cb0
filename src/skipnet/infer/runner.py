"""Compact inference: run each gated block only on the images whose gate fired (SPEC §8.1).

:class:`CompactRunner` is the one implementation, on every device: ``model(x, mode, executor="compact")``
calls it, and so do the benchmarks and the reports; the models keep only their masked forward. For a rival
(:class:`~skipnet.models.rivals.RivalResNet`: ACT, SACT, SDV) it runs the rival's pass,
:func:`skipnet.infer.rivals.run_rival` (a unit only on the images still running or at the positions still
active, a block only on the images that keep it), with this module's block routines. For a SkipNet a pass
goes stem -> first block -> for each gated block: gate, then the block on the images that run it -> head,
with the batch's activations in one of two bookkeepings:

* **ordered** (when the gates read the whole batch in image order: feed-forward gates, the modes ``sample``
  and ``straight_through``, autograd): a block run by some images gathers them, runs, and scatters the
  outputs back (two copies of the running images' activations);
* **fragmented** (RNN gates with hard decisions and no autograd, the usual inference): the outputs stay where
  they were computed (:class:`~skipnet.infer.batch.FragmentedBatch`; one copy), and the gate is told only
  which images' inputs changed (:class:`~skipnet.infer.gates.RNNGates`).

Either way a block no image runs costs nothing (a skipped transition block pays its projection shortcut),
and a block every image runs is run on the whole batch. When nearly every image runs a block, running it on
the whole batch and putting back the few skipped images' shortcut costs less than copying the running ones:
the crossover (:meth:`RunnerConfig.crossover`). Each image gets either ``F(x)`` or ``S(x)`` whichever way
it is computed, so the result equals the masked executor's in eval mode, to float rounding.

Kernels (:mod:`skipnet.ops`): the merge ``relu(r + s)`` of a block run on a large enough batch is done in
place by ``skipnet::add_relu_pool_``, which also returns the spatial means the next RNN gate reads; the RNN
gate runs as ``skipnet::rnn_gate_step``. Both fall back to their PyTorch references (other devices and
dtypes, no compiler), with the same code around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import ops
from ..models.blocks import ResidualBlock
from ..models.executors import RUNNER_ATTR
from ..models.gates import RNNGateBank
from ..models.rivals import RivalOutput, RivalResNet
from ..models.skipnet import SkipNetOutput, SkipResNet
from .batch import FragmentedBatch, index_tensor, take_rows
from .gates import ModuleGates, NoGates, RNNGates
from .rivals import run_rival

_HOST_MODES = ("greedy", "fixed", "all", "none")  # hard decisions without gradient: RNNGates can take them


@dataclass(frozen=True)
class RunnerConfig:
    """When compact inference does what: the settings that trade copies, kernels and threads.
    ``benchmarks/bench_runner.py`` measures them on a machine; docs/RESULTS.md has the figures behind the
    defaults, with their dates.

    ``copy_cost``: the cost of copying one image's activations, as a fraction of running a basic block of
    width C on it, times C (both scale with H x W; the convolutions also with C). With k copies per running
    image, running the B - n skipped images too is cheaper once n / B exceeds :meth:`crossover`.
    ``gate_kernel``, ``merge_kernel``: whether the RNN gate step and the inference merge may use their CPU
    kernels (``False``: the PyTorch reference; results equal to float rounding). ``gate_kernel_max_batch``:
    the gate kernel runs on one thread; above this batch size, when PyTorch has several threads, the
    reference's (threaded) ops take the gate. ``merge_kernel_min_numel``: below this many values a merge
    costs less as PyTorch's ops than as a kernel call behind its checks."""

    copy_cost: float = 0.9
    gate_kernel: bool = True
    gate_kernel_max_batch: int = 256
    merge_kernel: bool = True
    merge_kernel_min_numel: int = 1 << 16

    def crossover(self, channels: int, copies: int = 2) -> float:
        """The fraction of the batch running a block of input width ``channels`` from which running the whole
        batch (and restoring the skipped images) is cheaper than ``copies`` copies of the running images."""
        return 1.0 / (1.0 + copies * self.copy_cost / channels)


class CompactRunner:
    """Compact inference for a :class:`~skipnet.models.SkipResNet` or a rival
    (:class:`~skipnet.models.rivals.RivalResNet`) in eval mode (module docstring).

    ``runner(x, mode, tau=, decisions=, temperature=, generator=, explore=)`` takes the arguments of
    ``model(x, mode, executor="compact", ...)`` and returns the same :class:`~skipnet.models.SkipNetOutput`
    (a rival: ``runner(x)``, SDV also ``decisions=`` and ``generator=``; its :class:`RivalOutput`);
    ``gates=False`` (mode ``fixed`` only) skips the gate computation (probabilities NaN): what the gates' share
    of the latency is measured with. A plain network (no gates) runs every block. Reusable and thread-safe:
    gate buffers are kept per batch size between passes. ``torch.compile`` does not trace into a pass (its
    routing is data-dependent host logic): it runs eagerly there."""

    def __init__(self, model: SkipResNet | RivalResNet, config: RunnerConfig | None = None):
        self.model = model
        self.config = config or RunnerConfig()
        self._free: dict[tuple, list[RNNGates]] = {}

    def __call__(self, x: Tensor, mode: str | None = None, *, tau: float = 0.5, decisions: Tensor | None = None,
                 temperature: float = 1.0, generator: torch.Generator | None = None, explore: float = 0.0,
                 drop_rate: float = 0.0, gates: bool = True) -> SkipNetOutput | RivalOutput:
        if torch.compiler.is_compiling():
            return _eager(self._run)(x, mode, tau, decisions, temperature, generator, explore, drop_rate, gates)
        return self._run(x, mode, tau, decisions, temperature, generator, explore, drop_rate, gates)

    def _run(self, x: Tensor, mode: str | None, tau: float, decisions: Tensor | None, temperature: float,
             generator: torch.Generator | None, explore: float, drop_rate: float,
             gates: bool) -> SkipNetOutput | RivalOutput:
        model = self.model
        if isinstance(model, RivalResNet):
            if mode is not None or (tau, temperature, explore, drop_rate, gates) != (0.5, 1.0, 0.0, 0.0, True):
                raise ValueError(f"a rival ({model.method!r}) takes no decision mode, threshold, temperature, "
                                 "exploration, drop rate or gates=False: those are SkipNet's gates' options")
            return run_rival(self, x, decisions, generator)
        if model.training:  # (SkipResNet.forward trains compact itself, with autograd, in its own loop)
            raise ValueError("the compact runner is for inference: call model.eval() first (a SkipNet in training "
                             "runs compact through model(x, mode, executor='compact'))")
        table, mode, fixed = model.prepare(x, mode, executor="compact", tau=tau, decisions=decisions,
                                           temperature=temperature, drop_rate=drop_rate)
        batch = x.shape[0]
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))  # (B, C0, H', W')
        if model.gates is None:
            for block in model.blocks:
                x = self.run_block(block, x, pool=False)[0]
            ones = x.new_ones(batch, model.num_gates)
            return SkipNetOutput(model._head(x), None, ones, None, table.per_image(ones))
        if not gates and mode != "fixed":
            raise ValueError(f"gates=False needs mode 'fixed' (decisions not taken by the gates); got {mode!r}")
        stepper = self._stepper(x, mode, tau, temperature, fixed, generator, explore, gates)
        x, perm = self._blocks(x, stepper, mode, fixed)
        logits = model._head(x)  # (B, classes), rows in the order perm
        if perm is not None:
            logits = torch.empty_like(logits).index_copy_(0, index_tensor(perm, logits.device), logits)
        probs = stepper.probs()  # (B, N)
        if mode == "fixed":
            dec = fixed if fixed.dtype == probs.dtype else fixed.to(probs.dtype)
        elif mode in ("all", "none"):
            dec = torch.full_like(probs, 1.0 if mode == "all" else 0.0)
        else:
            dec = stepper.decisions()
        log_probs = stepper.log_probs()
        if isinstance(stepper, RNNGates):
            self._release(stepper)
        return SkipNetOutput(logits, probs, dec, log_probs, table.per_image(dec))

    # --- the loop -------------------------------------------------------------------------------------------

    def _blocks(self, x: Tensor, gates: Any, mode: str, fixed: Tensor | None) -> tuple[Tensor, np.ndarray | None]:
        """Every block after the stem; returns the final activations and the image in each of their rows
        (``None``: image order)."""
        blocks, batch, ordered = self.model.blocks, x.shape[0], gates.ordered
        x, pooled = self.run_block(blocks[0], x)
        change: Any = x if pooled is None else pooled  # what changed for the next gate: see .gates
        perm: np.ndarray | None = None  # the rows of x hold the images perm (None: image order)
        frags: FragmentedBatch | None = None  # the batch when it lives in several tensors
        if fixed is not None:  # the decisions on the host, once per pass
            if batch == 1:
                fixed_n = [int(v > 0.5) for v in fixed.tolist()[0]]
            else:
                fixed_run = (fixed.detach() > 0.5).cpu().numpy()  # (B, N) bool
                fixed_n = fixed_run.sum(0).tolist()
        for i, block in enumerate(blocks[1:]):
            run, n = gates.step(i, x if ordered else change)
            if fixed is not None:
                n = fixed_n[i]
                if 0 < n < batch:
                    run = fixed_run[:, i]
            elif mode == "all":
                n = batch
            elif mode == "none":
                n = 0
            if n == 0 and block.downsample is None:
                change = None  # nothing changed: the next gate reuses the pooled inputs
                continue
            if ordered:  # gather, run, scatter back: the batch stays in image order
                x = change = self.run_images(block, x, run, n)
                continue
            if frags is not None and (n == batch or n == 0 or frags.single):
                x, perm = frags.whole()
                frags = None
            pooled = None
            if n == batch:
                x, pooled = self.run_block(block, x)
            elif n == 0:  # a skipped transition block still pays for its projection
                x = block.shortcut(x)
            elif frags is None and n >= self.config.crossover(x.shape[1], copies=1) * batch:
                idx = np.flatnonzero(run)
                pos = idx if perm is None else np.argsort(perm)[idx]  # the rows of those images
                x = self.run_rows(block, x, index_tensor(pos, x.device), n)
            else:
                frags = frags or FragmentedBatch(x, perm)
                idx = np.flatnonzero(run)
                if block.downsample is not None:  # every image gets new activations: runners and the others
                    change = self._transition(block, frags, idx, np.flatnonzero(run == 0))
                else:
                    sub, images = frags.gather(idx)  # (n, C, H, W): the one copy
                    f, pooled = self.merge(block, block.residual(sub), sub)
                    del sub  # (now: the next gather may reuse its memory, still in cache)
                    frags.push(f, images)
                    change = (images, index_tensor(images, f.device), f if pooled is None else pooled)
                continue
            rows = x if pooled is None else pooled
            change = rows if perm is None else (perm, index_tensor(perm, rows.device), rows)
        if frags is not None:
            x, perm = frags.whole()
        return x, perm

    def run_images(self, block: ResidualBlock, x: Tensor, run: np.ndarray | None, n: int) -> Tensor:
        """Run ``block`` for the ``n`` images ``run`` (B,) bool on the host (``None`` when n is 0 or B) of ``x``,
        in image order; the others get the shortcut. ``x`` is consumed (see :meth:`run_rows`)."""
        if n == x.shape[0]:
            return self.run_block(block, x, pool=False)[0]
        if n == 0:
            return block.shortcut(x)
        return self.run_rows(block, x, index_tensor(np.flatnonzero(run), x.device), n)

    def _transition(self, block: ResidualBlock, frags: FragmentedBatch, idx: np.ndarray, rest: np.ndarray) -> Tensor:
        """A transition block run by the images ``idx`` and skipped by ``rest`` (both non-empty): each group is
        gathered once (the runners get ``relu(F(x) + S(x))``, the others the projection ``S(x)``) and the two
        results become the new fragments. Returns every image's spatial means (B, C, 1, 1) for the next gate."""
        sub, images = frags.gather(idx)
        f, pooled = self.merge(block, block.residual(sub), block.shortcut(sub))
        others, kept = frags.gather(rest)
        s = block.shortcut(others)
        frags.assign([f, s], [images, kept])
        means = s.new_empty((frags.batch, s.shape[1], 1, 1))
        means.index_copy_(0, index_tensor(images, s.device), f.mean((2, 3), keepdim=True) if pooled is None else pooled)
        return means.index_copy_(0, index_tensor(kept, s.device), s.mean((2, 3), keepdim=True))

    # --- blocks ---------------------------------------------------------------------------------------------

    def merge(self, block: ResidualBlock, residual: Tensor, shortcut: Tensor,
              pool: bool = True) -> tuple[Tensor, Tensor | None]:
        """``block.merge(residual, shortcut)``, in place on ``residual`` (a fresh tensor) for the default merge,
        and with ``pool`` the result's spatial means (B, C, 1, 1) where the merge kernel computed them in the
        same pass (else ``None``)."""
        if type(block).merge is not ResidualBlock.merge:
            return block.merge(residual, shortcut), None
        cfg = self.config
        kernel = (cfg.merge_kernel and residual.numel() >= cfg.merge_kernel_min_numel
                  and residual.shape[0] >= torch.get_num_threads()  # (the kernel splits the batch over threads)
                  and not torch.is_grad_enabled())
        return ops.add_relu_pool_(residual, shortcut, pool, kernel=kernel)

    def run_block(self, block: ResidualBlock, x: Tensor, pool: bool = True) -> tuple[Tensor, Tensor | None]:
        """``block(x)`` with the merge in place (no autograd), and with ``pool`` the output's spatial means where
        the merge computed them (see :meth:`merge`), else ``None``."""
        if type(block).forward is not ResidualBlock.forward or torch.is_grad_enabled():
            return block(x), None
        return self.merge(block, block.residual(x), block.shortcut(x), pool)

    def run_rows(self, block: ResidualBlock, x: Tensor, idx: Tensor, n: int) -> Tensor:
        """Run ``block`` for the rows ``idx`` of ``x`` (``n`` of them, 0 < n < B); the other rows get the
        shortcut. ``x`` is consumed (with an identity shortcut the result is written into it). Above the
        crossover the whole batch runs and the skipped rows' shortcut is put back; below, the running rows are
        gathered and their outputs scattered back."""
        batch = x.shape[0]
        if n >= self.config.crossover(x.shape[1]) * batch:
            keep = torch.ones(batch, dtype=torch.bool, device=x.device)
            keep[idx] = False
            skipped = keep.nonzero().squeeze(1)
            s_skipped = block.shortcut(take_rows(x, skipped))
            return self.run_block(block, x, pool=False)[0].index_copy_(0, skipped, s_skipped)
        sub = take_rows(x, idx)  # (n, C, H, W)
        if block.downsample is None:
            f = self.merge(block, block.residual(sub), sub, pool=False)[0]
            return x.index_copy_(0, idx, f)  # writes into x: x is consumed
        s = block.shortcut(x)  # the projection, which a skipped block still pays for
        f = self.merge(block, block.residual(sub), take_rows(s, idx), pool=False)[0]
        return s.index_copy_(0, idx, f)

    # --- gates ----------------------------------------------------------------------------------------------

    def _stepper(self, x: Tensor, mode: str, tau: float, temperature: float, fixed: Tensor | None,
                 generator: torch.Generator | None, explore: float, gates: bool) -> Any:
        model = self.model
        if not gates:
            return NoGates(x.shape[0], model.num_gates, x.device)
        bank = model.gates
        if (isinstance(bank, RNNGateBank) and mode in _HOST_MODES and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled(x.device.type)):
            dtype = bank.fc.weight.dtype
            if x.dtype == dtype and dtype in (torch.float32, torch.float64, torch.float16):
                kernel = (self.config.gate_kernel and x.device.type == "cpu" and dtype == torch.float32
                          and (x.shape[0] <= self.config.gate_kernel_max_batch or torch.get_num_threads() == 1)
                          and ops.kernels_available())
                return self._acquire(bank, x, kernel).start(temperature, tau if mode == "greedy" else None)
        return ModuleGates(model, mode, tau, temperature, fixed, generator, explore)

    def _acquire(self, bank: RNNGateBank, x: Tensor, kernel: bool) -> RNNGates:
        try:  # one a previous pass released (list.pop is atomic: two threads never get the same one)
            return self._free[RNNGates.key_of(x.shape[0], x.device, x.dtype, kernel)].pop()
        except (KeyError, IndexError):
            return RNNGates(bank, x.shape[0], x.device, x.dtype, kernel)

    def _release(self, gates: RNNGates) -> None:
        if len(self._free) > 8 and gates.key not in self._free:
            self._free.clear()  # many batch sizes: keep the memory bounded
        stack = self._free.setdefault(gates.key, [])
        if len(stack) < 4:
            stack.append(gates)


def _eager(fn):
    """``fn`` run eagerly when called from code that ``torch.compile`` traces (a graph break)."""
    return torch.compiler.disable(fn, recursive=True)


def compact_runner(model: SkipResNet | RivalResNet) -> CompactRunner:
    """The model's default :class:`CompactRunner` (default settings), kept with the model (not saved with it)."""
    runner = model.__dict__.get(RUNNER_ATTR)
    if runner is None:
        runner = model.__dict__[RUNNER_ATTR] = CompactRunner(model)
    return runner
