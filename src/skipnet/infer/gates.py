"""The gates of one compact inference pass, stepped by :class:`~skipnet.infer.CompactRunner`.

A stepper runs the network's gates one after the other and records what the pass returns (probabilities,
decisions, log-probabilities). ``step(i, change)`` runs gate ``i`` and returns ``(run, n)``: the host-side
decisions (B,) (anything ``np.flatnonzero`` reads; ``None`` where the runner knows them: modes ``fixed``,
``all``, ``none``) and how many images run the block. Two kinds:

* :class:`RNNGates` (RNN gates, hard decisions, no autograd): the op ``skipnet::rnn_gate_step`` per gate --
  its CPU kernel in float32 (called directly, without the dispatcher, when no dispatch mode is active), else
  its PyTorch reference. It keeps the gate inputs' spatial means between
  gates, so ``change`` is only what changed since the previous gate: ``None`` (nothing: the images skipped an
  identity block), a tensor (every image, in image order: activations, or their means (B, C, 1, 1) where the
  merge computed them), or ``(idx, idx_t, rows)``: the images ``idx`` (NumPy int64 and the same as a tensor)
  now have ``rows`` -- some of them, or all in another order. The runner can then leave the batch's rows
  where they were computed.
* :class:`ModuleGates` (any gate bank, any mode, autograd): the gate modules themselves, through
  :meth:`~skipnet.models.SkipResNet.gate` and :func:`~skipnet.models.decisions.decide`. They read the whole
  batch in image order (``ordered``), which the runner then keeps.

:class:`NoGates` stands in for the gates (fixed decisions, nothing computed): what a benchmark measures the
gates' share of the latency with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import ops
from ..models.decisions import decide
from ..models.gates import RNNGateBank

try:  # whether a TorchDispatchMode (e.g. FlopCounterMode) is active: PyTorch's own check, in a private module
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode as _dispatch_mode_active
except ImportError:  # if it moves: always call the op, which every mode sees
    def _dispatch_mode_active() -> bool:
        return True


class RNNGates:
    """An RNN gate bank's gates for passes over batches of ``batch`` images on one device and dtype, through
    ``skipnet::rnn_gate_step`` (the kernel if ``kernel``, else the reference). The buffers of the gate inputs'
    means and of the LSTM state are reused pass after pass (:meth:`start`); each pass's probabilities and
    decisions are new tensors, the caller's."""

    ordered = False

    def __init__(self, bank: RNNGateBank, batch: int, device: torch.device, dtype: torch.dtype, kernel: bool):
        self.bank, self.batch, self.kernel = bank, batch, kernel
        self.key = self.key_of(batch, device, dtype, kernel)
        self.options = {"device": device, "dtype": dtype}
        self.pooled = torch.empty(batch, max(bank.channels), **self.options)  # (B, C_max): gate inputs' means
        self.state = torch.empty(2, batch, bank.hidden_dim, **self.options)  # h, c (zeroed at gate 0)
        self.unused = torch.empty(batch, bank.num_gates, **self.options)  # decisions of passes without tau
        self.step_op = torch.ops.skipnet.rnn_gate_step.default if kernel else ops.rnn_gate_step_reference
        self.direct = ops.build.direct_gate_step() if kernel else None

    @staticmethod
    def key_of(batch: int, device: torch.device, dtype: torch.dtype, kernel: bool) -> tuple:
        """What a pass needs of reused buffers: made under inference_mode they are inference tensors, which
        cannot be written outside it, so the mode is part of the key and a pass outside it never gets one."""
        return batch, device, dtype, kernel, torch.is_inference_mode_enabled()

    def start(self, temperature: float, tau: float | None) -> RNNGates:
        """Ready for a pass with these settings and the bank's current parameters."""
        mods = self.bank._modules  # (not nn.Module's attribute lookup: this runs every pass)
        rnn, fc = mods["rnn"]._parameters, mods["fc"]._parameters
        self.shared = (rnn["weight_ih"], rnn["weight_hh"], rnn["bias_ih"], rnn["bias_hh"], fc["weight"], fc["bias"])
        self.proj = [m._parameters for m in mods["proj"]._modules.values()]
        self.temperature, self.tau = temperature, tau
        # The kernel's direct binding skips the dispatcher (at batch 1 a call through torch.ops costs as much as
        # the step); under a dispatch mode (FlopCounterMode, fake tensors) the op is called, so the mode sees it.
        self.step_fn = self.step_op if self.direct is None or _dispatch_mode_active() else self.direct
        self.out_p = torch.empty(self.batch, self.bank.num_gates, **self.options)
        self.out_d = self.unused if tau is None else torch.empty_like(self.out_p)
        self.host_d = self.out_d.numpy() if self.out_d.device.type == "cpu" else None
        return self

    def step(self, index: int, change: Any) -> tuple[np.ndarray | None, int]:
        if change is None:
            x = idx = None
        elif type(change) is tuple:
            _, idx, x = change
        else:
            x, idx = change, None
        p = self.proj[index]
        n = self.step_fn(self.pooled, self.state, self.out_p, self.out_d, x, idx, index, p["weight"], p["bias"],
                         *self.shared, self.temperature, self.tau)
        if self.tau is None:
            return None, 0
        if self.host_d is not None:
            return self.host_d[:, index], n
        return self.out_d[:, index].cpu().numpy(), n

    def probs(self) -> Tensor:
        return self.out_p

    def decisions(self) -> Tensor:
        return self.out_d

    def log_probs(self) -> None:
        return None


class ModuleGates:
    """The gate modules, for any gate bank and decision mode, with autograd where it is on. Reads the block
    input of every image in image order."""

    ordered = True

    def __init__(self, model: Any, mode: str, tau: float, temperature: float, fixed: Tensor | None,
                 generator: torch.Generator | None, explore: float):
        self.model, self.mode, self.tau, self.temperature = model, mode, tau, temperature
        self.fixed, self.generator, self.explore = fixed, generator, explore
        self.state: Any = None
        self.p: list[Tensor] = []
        self.g: list[Tensor] = []
        self.lp: list[Tensor] = []
        self.host = mode not in ("fixed", "all", "none")  # (the runner knows those decisions)

    def step(self, index: int, x: Tensor) -> tuple[np.ndarray | None, int]:
        if index == 0:
            self.state = self.model.gates.init_state(x)
        logit, self.state = self.model.gate(x, index, self.state)  # (B,)
        if self.temperature != 1.0:
            logit = logit / self.temperature
        g, lp = decide(logit, self.mode, tau=self.tau, fixed=None if self.fixed is None else self.fixed[:, index],
                       generator=self.generator, explore=self.explore)
        self.p.append(torch.sigmoid(logit))
        self.g.append(g)
        if lp is not None:
            self.lp.append(lp)
        if not self.host:
            return None, 0
        run = (g.detach() > 0.5).cpu().numpy()  # (B,) bool: one host read per gate
        return run, int(np.count_nonzero(run))

    def probs(self) -> Tensor:
        return torch.stack(self.p, 1)

    def decisions(self) -> Tensor:
        return torch.stack(self.g, 1).detach()

    def log_probs(self) -> Tensor | None:
        return torch.stack(self.lp, 1) if self.lp else None


class NoGates:
    """No gate computation at all (fixed decisions only): probabilities are NaN."""

    ordered = False

    def __init__(self, batch: int, num_gates: int, device: torch.device):
        self.p = torch.full((batch, num_gates), float("nan"), device=device)

    def step(self, index: int, change: Any) -> tuple[None, int]:
        return None, 0

    def probs(self) -> Tensor:
        return self.p

    def log_probs(self) -> None:
        return None
