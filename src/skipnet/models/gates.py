"""Gate designs (SPEC §3).

A *gate bank* holds the gates of all N gated blocks of a network. It computes, for gated block ``i`` and
its input ``x`` (B, C_i, H, W), one logit per image: ``p_i = sigmoid(logit)`` is the probability of running
the block. Deciding (straight-through, sampling, thresholding) happens elsewhere (:mod:`.decisions`).

Gates that carry state (the RNN gate) get it passed in and return it -- nothing is stored on the module,
so a model is re-entrant and safe under DDP and ``torch.compile`` (which, like FLOP counters and other
dispatch modes, gets the PyTorch path).

For inference on the CPU a gate bank may also offer a :class:`HostGateStepper` (``host_stepper``): the same
gates, run step by step with their decisions made on the host, which the network's inference loop uses.
The RNN gate's tensors are tiny -- at batch 1 a gate is ~15 PyTorch calls of a few microseconds each (~55 us
in all) next to a ~200 us block -- so its stepper runs each gate as one call into a small C kernel
(:func:`native_gate_library`, built by :mod:`.native`: compiled once and cached; it pools only the images
whose input changed and reads the parameters in place). PyTorch ops stand in where no compiler is
available, for float64, and for batches above 32 when PyTorch runs on several threads. The bank keeps one
cache, of its parameters' addresses (``_native_cache``), rebuilt whenever they move, and the steppers of
finished passes (``_free_steppers``, per batch size), whose buffers the next pass reuses.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .native import load_kernel

GATE_TYPES = ("rnn", "ffgate1", "ffgate2")


class GateBank(nn.Module):
    """Base class: ``init_state`` then ``forward(x, i, state) -> (logits (B,), state)`` for i = 0..N-1."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.channels = list(channels)

    @property
    def num_gates(self) -> int:
        return len(self.channels)

    def init_state(self, x: Tensor) -> Any:
        return None

    def forward(self, x: Tensor, index: int, state: Any) -> tuple[Tensor, Any]:  # pragma: no cover
        raise NotImplementedError

    def layers(self, index: int) -> list[nn.Module]:  # pragma: no cover
        """The layers gate ``index`` applies, in order (for compute accounting)."""
        raise NotImplementedError

    def output_layers(self) -> list[nn.Linear]:  # pragma: no cover
        """Every layer that produces a logit (scaling them by 1/T sharpens or flattens every gate once)."""
        raise NotImplementedError

    def output_biases(self) -> list[nn.Parameter]:
        """The bias of every layer that produces a logit: adding d to all of them moves every gate's decision
        threshold by -d (what a compute controller steers)."""
        return [layer.bias for layer in self.output_layers()]

    def host_stepper(self, x: Tensor, temperature: float = 1.0, tau: float | None = None) -> HostGateStepper | None:
        """A :class:`HostGateStepper` for one inference pass (no autograd) over the CPU batch ``x``
        (B, C, H, W), deciding greedily at ``tau`` if given, or ``None`` where this gate design has none
        (the caller then uses ``forward``)."""
        return None


class _GlobalMeanPool(torch.autograd.Function):
    """``x.mean((2, 3))`` whose backward returns the gradient broadcast over H and W (a stride-0 view)
    instead of autograd's materialised (B, C, H, W) division: a gate's input also feeds its block, and
    autograd adds the view into that gradient in the pass it makes anyway."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        return x.mean((2, 3))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        b, c, h, w = ctx.shape
        return (grad / (h * w)).view(b, c, 1, 1).expand(b, c, h, w)


def global_mean_pool(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C): the gates' global average pool."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GlobalMeanPool.apply(x)
    return x.mean((2, 3))


class _FFGate(nn.Module):
    """One feed-forward gate: conv layers, global average pool, linear C -> 1 logit."""

    def __init__(self, channels: int, design: str):
        super().__init__()
        layers: list[nn.Module] = []
        if design == "ffgate1":
            # 2x2 max-pool -> 3x3 conv s1 + BN + ReLU -> 3x3 conv s2 + BN + ReLU
            layers += [nn.MaxPool2d(2)]
            layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True)]
        layers += [nn.Conv2d(channels, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        z = global_mean_pool(self.features(x))  # (B, C)
        return self.fc(z).squeeze(1)  # (B,)


class FFGateBank(GateBank):
    """FFGate-I (``ffgate1``) or FFGate-II (``ffgate2``): independent parameters per gated block."""

    def __init__(self, channels: list[int], design: str = "ffgate1"):
        super().__init__(channels)
        if design not in ("ffgate1", "ffgate2"):
            raise ValueError(f"unknown feed-forward gate design {design!r}; expected 'ffgate1' or 'ffgate2'")
        self.design = design
        self.gates = nn.ModuleList(_FFGate(c, design) for c in channels)

    def forward(self, x: Tensor, index: int, state: Any) -> tuple[Tensor, Any]:
        return self.gates[index](x), state

    def layers(self, index: int) -> list[nn.Module]:
        return [self.gates[index].features, self.gates[index].fc]

    def output_layers(self) -> list[nn.Linear]:
        return [g.fc for g in self.gates]


class RNNGateBank(GateBank):
    """RNNGate: per block GAP + linear C -> embed; one LSTM cell shared by all gates; shared linear -> logit.

    The LSTM state (h, c) starts at zero for every image and is threaded through the forward pass.
    """

    def __init__(self, channels: list[int], embed_dim: int = 10, hidden_dim: int = 10):
        super().__init__(channels)
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        self.proj = nn.ModuleList(nn.Linear(c, embed_dim) for c in channels)
        self.rnn = nn.LSTMCell(embed_dim, hidden_dim)
        self.fc = nn.Linear(hidden_dim, 1)

    def init_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = x.new_zeros(x.shape[0], self.hidden_dim)
        return h, h

    def forward(self, x: Tensor, index: int, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Any]:
        e = self.proj[index](global_mean_pool(x))  # (B, embed)
        h, c = self.rnn(e, state)  # (B, hidden) each
        return self.fc(h).squeeze(1), (h, c)  # logits (B,)

    def layers(self, index: int) -> list[nn.Module]:
        return [self.proj[index], self.rnn, self.fc]

    def output_layers(self) -> list[nn.Linear]:
        return [self.fc]

    def host_stepper(self, x: Tensor, temperature: float = 1.0, tau: float | None = None) -> HostGateStepper | None:
        cpu = x.device.type == "cpu"
        if cpu and x.dtype == torch.float32 and (x.shape[0] <= NATIVE_MAX_BATCH or torch.get_num_threads() == 1):
            lib = native_gate_library()
            table = self._native_table() if lib is not None else None  # (valid: float32 CPU parameters)
            if table is not None:
                try:  # one a previous pass released (list.pop is atomic: two threads never get the same one)
                    stepper = self.__dict__.setdefault("_free_steppers", {})[x.shape[0]].pop()
                except (KeyError, IndexError):
                    return _RNNNativeStepper(self, x.shape[0], temperature, tau, table, lib)
                stepper.reset(temperature, tau, table)
                return stepper
        if not cpu or x.dtype != self.rnn.weight_ih.dtype:
            return None
        return _RNNTorchStepper(self, x, temperature)

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # nn.Module's: a copy of __dict__
        state.pop("_native_cache", None)  # addresses: meaningless in a copy or another process
        state.pop("_free_steppers", None)  # (their buffers' addresses too)
        return state

    def _native_table(self) -> _NativeTable | None:
        """The parameters' addresses for the C kernel, or ``None`` where it cannot read them (not contiguous
        float32 CPU tensors of the expected shapes). Read at the start of every pass -- a moved or replaced
        parameter has a new address -- and validated again when they change."""
        mods = self._modules  # (not nn.Module's attribute lookup: this runs every pass)
        rnn, fc = mods["rnn"]._parameters, mods["fc"]._parameters
        params = [rnn["weight_ih"], rnn["weight_hh"], rnn["bias_ih"], rnn["bias_hh"], fc["weight"], fc["bias"]]
        for m in mods["proj"]._modules.values():
            d = m._parameters
            params += (d["weight"], d["bias"])
        ptrs = [p.data_ptr() for p in params]
        table = self.__dict__.get("_native_cache")
        if table is None or table.ptrs != ptrs:
            table = _NativeTable(self, params, ptrs)
            self.__dict__["_native_cache"] = table  # a plain attribute: not a parameter, buffer or submodule
        return table if table.valid else None


# --- host steppers: the gates of one inference pass, decided on the host ---------------------------------------

class HostGateStepper:
    """The gates of one inference pass, stepped by the network's loop (no autograd, CPU).

    ``step(i, tau, src)`` runs gate ``i`` (in order, from 0) and records p_i for every image. ``src`` says
    how the gate input changed since the previous step: the new batch (a tensor: the activations, or their
    spatial means (B, C, 1, 1) when the merge computed them, which pool to themselves), ``(idx, idx_t, rows)``
    when the images ``idx`` (distinct; NumPy int64 and tensor forms) changed, to ``rows`` (all of them in
    another order, or some: the others kept theirs, having skipped an identity block), or ``None`` when
    nothing changed. With a threshold ``tau``
    (the same for every step of a pass) it returns the greedy decisions ``run = p_i >= tau`` (B,) on the
    host and their count, else ``(None, 0)``. After the last gate ``probs()`` is (B, N) and
    ``decisions()`` (B, N) float (greedy passes only)."""

    def step(self, index: int, tau: float | None, src: Any) -> tuple[np.ndarray | None, int]:  # pragma: no cover
        raise NotImplementedError

    def probs(self) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def decisions(self) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def release(self) -> None:
        """The pass is over (its probabilities and decisions were read): buffers may be reused."""


class _RNNTorchStepper(HostGateStepper):
    """The RNN gate with the module's own PyTorch ops (bit-identical probabilities). Keeps the pooled
    features between gates, so images whose gate input did not change are not pooled again."""

    def __init__(self, bank: RNNGateBank, x: Tensor, temperature: float):
        rnn, fc = bank.rnn._parameters, bank.fc._parameters
        self.cell = (rnn["weight_ih"], rnn["weight_hh"], rnn["bias_ih"], rnn["bias_hh"])
        self.fc = (fc["weight"], fc["bias"])
        self.proj = [(m._parameters["weight"], m._parameters["bias"]) for m in bank.proj]
        h = x.new_zeros(x.shape[0], bank.hidden_dim)
        self.state = (h, h)
        self.temperature = temperature
        self.pooled = x.new_zeros(0)
        self.p: list[Tensor] = []
        self.runs: list[np.ndarray] = []

    def step(self, index: int, tau: float | None, src: Any) -> tuple[np.ndarray | None, int]:
        if isinstance(src, Tensor):
            self.pooled = src.mean((2, 3))  # (B, C)
        elif src is not None:
            _, idx_t, rows = src
            if rows.shape[0] == self.state[0].shape[0]:  # every image, in another order (maybe another width)
                self.pooled = rows.new_empty(rows.shape[:2])
            self.pooled.index_copy_(0, idx_t, rows.mean((2, 3)))
        e = F.linear(self.pooled, *self.proj[index])  # (B, E)
        self.state = torch.lstm_cell(e, self.state, *self.cell)  # what nn.LSTMCell runs
        logit = F.linear(self.state[0], *self.fc).squeeze(1)  # (B,)
        if self.temperature != 1.0:
            logit = logit / self.temperature
        p = torch.sigmoid(logit)
        self.p.append(p)
        if tau is None:
            return None, 0
        run = (p >= tau).numpy()
        self.runs.append(run)
        return run, int(np.count_nonzero(run))

    def probs(self) -> Tensor:
        return torch.stack(self.p, 1)

    def decisions(self) -> Tensor:
        return torch.from_numpy(np.stack(self.runs, 1)).to(self.p[0].dtype)


class _RNNNativeStepper(HostGateStepper):
    """The RNN gate as one call per gate into the C kernel (float32), which pools the changed images and
    runs projection, LSTM step, output layer and decision for every image. The kernel reads the parameters
    in place (their addresses are checked every pass), so it always sees their current values, and checks
    the shapes it is given. Agrees with the module to float rounding (~1e-7)."""

    def __init__(self, bank: RNNGateBank, batch: int, temperature: float, tau: float | None, table: _NativeTable,
                 lib: Any):
        n = bank.num_gates
        self.state = np.empty((2, bank.hidden_dim, batch), dtype=np.float32)  # h, c (zeroed at gate 0)
        self.pooled = np.empty((max(bank.channels), batch), dtype=np.float32)
        self.scratch = np.empty((bank.embed_dim + 4 * bank.hidden_dim, batch), dtype=np.float32)
        self.runs = np.empty((n, batch), dtype=np.uint8)
        self.ctx = _GateCtx(batch=batch, embed=bank.embed_dim, hidden=bank.hidden_dim, gates=n,
                            pooled=self.pooled.ctypes.data, state=self.state.ctypes.data,
                            scratch=self.scratch.ctypes.data, runs=self.runs.ctypes.data)
        self.ctx_ref = ctypes.addressof(self.ctx)  # (an int: ctypes and the extension module alike)
        self.batch = batch
        self._step = lib.skipnet_gate_step
        self.bank = bank
        self.reset(temperature, tau, table)

    def reset(self, temperature: float, tau: float | None, table: _NativeTable) -> None:
        """Ready for a pass: these settings, the parameters' current addresses (``table``, kept alive while the
        kernel uses it) and new result tensors (the kernel zeroes the LSTM state at gate 0). A stepper handed back
        by :meth:`release` allocates nothing else."""
        ctx = self.ctx
        ctx.steps = ctx.width = 0
        ctx.temperature, ctx.tau, ctx.decide = temperature, 0.0 if tau is None else tau, tau is not None
        self.decide = tau is not None
        ctx.channels, ctx.proj = table.addresses
        ctx.w_ih, ctx.w_hh, ctx.b_ih, ctx.b_hh, ctx.w_fc, ctx.b_fc = table.shared
        self.table = table
        # This pass's results, written by the kernel gate by gate: returned as they are, not copied.
        self.out_p = torch.empty(self.batch, ctx.gates, dtype=torch.float32, device="cpu")
        self.out_d = torch.empty(self.batch, ctx.gates, dtype=torch.float32, device="cpu") if self.decide else None
        ctx.probs, ctx.decisions = self.out_p.data_ptr(), None if self.out_d is None else self.out_d.data_ptr()

    def release(self) -> None:
        """Hand the buffers back to the gate bank for its next pass at this batch size (after the last use of
        :meth:`probs` and :meth:`decisions`: their tensors are the caller's from then on)."""
        self.table = self.out_p = self.out_d = None  # (reset gives a free stepper the current parameters)
        self.ctx.probs = self.ctx.decisions = None
        free = self.bank.__dict__.setdefault("_free_steppers", {})
        if len(free) > 8 and self.batch not in free:
            free.clear()  # many batch sizes: keep the memory bounded
        stack = free.setdefault(self.batch, [])
        if len(stack) < 4:
            stack.append(self)

    def step(self, index: int, tau: float | None, src: Any) -> tuple[np.ndarray | None, int]:
        if src is None:
            n = self._step(self.ctx_ref, index, None, 0, 0, 0, 0, None)
        else:
            if type(src) is tuple:
                idx, _, x = src
                if idx.dtype != np.int64 or not idx.flags.c_contiguous:
                    raise ValueError("gate image indices must be a contiguous int64 array")
                idx_ptr = idx.ctypes.data
            else:
                x, idx_ptr = src, None
            nhwc = 0
            if x.dtype != _F32:
                x = x.contiguous().float()
            elif not x.is_contiguous():
                if x.is_contiguous(memory_format=_CHANNELS_LAST):
                    nhwc = 1
                else:
                    x = x.contiguous()
            shape = x.shape
            n = self._step(self.ctx_ref, index, x.data_ptr(), shape[0], shape[1], shape[2] * shape[3], nhwc, idx_ptr)
        if n < 0:
            raise ValueError(f"gate {index}: its input does not fit (error {n}: "
                             f"{_NATIVE_ERRORS.get(n, 'unknown')}); got {None if src is None else tuple(shape)}")
        return (self.runs[index], n) if self.decide else (None, 0)

    def probs(self) -> Tensor:
        return self._result(self.out_p, "probabilities")

    def decisions(self) -> Tensor:
        return self._result(self.out_d, "decisions (greedy passes only)")

    def _result(self, out: Tensor | None, what: str) -> Tensor:
        if out is None:
            raise RuntimeError(f"no {what}: the stepper was released, or the pass does not make them")
        steps = self.ctx.steps
        return out if steps == out.shape[1] else out[:, :steps].clone()


class _NativeTable:
    """Addresses of an RNN gate bank's parameters for the C kernel, validated once per set of storages."""

    def __init__(self, bank: RNNGateBank, params: list[Tensor], ptrs: list[int]):
        e, hid = bank.embed_dim, bank.hidden_dim
        shapes = [(4 * hid, e), (4 * hid, hid), (4 * hid,), (4 * hid,), (1, hid), (1,)]
        for c in bank.channels:
            shapes += [(e, c), (e,)]
        self.valid = len(params) == len(shapes) and all(
            tuple(p.shape) == shape and p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous()
            for p, shape in zip(params, shapes)
        )
        self.ptrs = ptrs
        self.storages = [p.untyped_storage() for p in params]  # alive while the kernel may read them
        self.shared = ptrs[:6]
        self.proj = np.asarray(ptrs[6:], dtype=np.uint64)  # (2N,): weight, bias per gate
        self.channels = np.asarray(bank.channels, dtype=np.int64)  # (N,)
        self.addresses = (self.channels.ctypes.data, self.proj.ctypes.data)  # (read once: .ctypes costs ~2 us)


# --- the C kernel ------------------------------------------------------------------------------------------------

# The kernel runs on one thread; above this batch size, with more than one thread, PyTorch's (parallel)
# pooling and matrix products take over.
NATIVE_MAX_BATCH = 32

_NATIVE_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

typedef struct {
    int64_t batch, embed, hidden, gates;      /* B, E, H, N */
    const int64_t *channels;                  /* (N): input width C_i of each gate */
    const uint64_t *proj;                     /* (2N): addresses of W_p (E, C_i) and b_p (E) of each gate */
    const float *w_ih, *w_hh, *b_ih, *b_hh;   /* LSTM cell: (4H, E), (4H, H), (4H), (4H); gates i, f, g, o */
    const float *w_fc, *b_fc;                 /* output layer: (1, H), (1) */
    float *pooled;                            /* (C, B) pooled gate input, feature-major */
    float *state;                             /* (2, H, B): h, c */
    float *scratch;                           /* (E + 4H, B) */
    float *probs;                             /* (B, N): p of each image and gate */
    float *decisions;                         /* (B, N): the greedy decisions as 0/1 (or null) */
    uint8_t *runs;                            /* (N, B): the same, for the caller's routing */
    float temperature;                        /* divides the logits */
    float tau;                                /* greedy threshold, */
    int32_t decide;                           /* used if decide != 0 */
    int64_t width;                            /* C of the pooled features (0: none yet) */
    int64_t steps;                            /* gates run so far */
} gate_ctx;

/* exp(x) for x in [-87, 88] (clamped), to ~1 ulp: 2^n e^r with |r| <= ln(2)/2 (Cephes' expf polynomial).
   Branch-free and call-free, so that the loops over images below vectorise. */
static inline float exp_(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round to nearest */
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

static inline float sigmoid_(float z) { return 1.0f / (1.0f + exp_(-z)); }

static inline float tanh_(float z) { return 2.0f * sigmoid_(2.0f * z) - 1.0f; }

/* out (rows, B) += w (rows, k) @ in (k, B): the inner loop runs over the images, so it vectorises without
   reordering any sum -- each image's sums run in index order, whatever B is. */
static void gemm_acc_(float *out, const float *w, const float *in, int64_t rows, int64_t k, int64_t B) {
    for (int64_t r = 0; r < rows; r++) {
        float *o = out + r * B;
        for (int64_t j = 0; j < k; j++) {
            const float wj = w[r * k + j], *x = in + j * B;
            for (int64_t b = 0; b < B; b++) o[b] += wj * x[b];
        }
    }
}

static void fill_rows_(float *out, const float *bias, int64_t rows, int64_t B) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < B; b++) out[r * B + b] = bias ? bias[r] : 0.0f;
}

static int64_t finish_(gate_ctx *ctx, int64_t index, float *logit);

/* Gate `index` for every image. If x is given, first pool it: x (rows, c, hw), C-contiguous -- or
   (rows, hw, c) with channels_last -- is the new input of images idx[r] (distinct; of images 0..B-1 if idx
   is null, then rows == B); the other images keep their pooled features. Then e = W_p m + b_p, one LSTM
   step (from h = c = 0 at gate 0), logit = w_fc h + b_fc and p = sigmoid(logit / temperature) into column
   `index` of probs (B, N); with decide, runs[index] = p >= tau (and the same as 0/1 into column `index` of
   decisions). Returns the number of images that run (0 without decide), or a negative error code when the
   input does not fit or the stepper was released. */
static int64_t gate_step_(gate_ctx *ctx, int64_t index, const float *x, int64_t rows, int64_t c, int64_t hw,
                          int channels_last, const int64_t *idx) {
    const int64_t B = ctx->batch, E = ctx->embed, H = ctx->hidden, G = 4 * H;
    if (!ctx->probs) return -4;  /* released: no pass to write to */
    if (index < 0 || index >= ctx->gates || index != ctx->steps) return -1;
    if (index == 0) memset(ctx->state, 0, (size_t)(2 * H * B) * sizeof(float));  /* a pass starts at h = c = 0 */
    const int64_t width = ctx->channels[index];
    if (x) {
        if (c != width || hw < 1) return -2;
        if (idx ? rows < 1 || rows > B : rows != B) return -3;
        for (int64_t r = 0; idx && r < rows; r++)
            if (idx[r] < 0 || idx[r] >= B) return -3;
        if (rows < B && width != ctx->width) return -2;  /* the other images' features are of another width */
        for (int64_t r = 0; r < rows; r++) {
            const int64_t b = idx ? idx[r] : r;
            if (channels_last) {  /* x (rows, hw, c): 16 channels at a time, their sums in registers */
                const float *src = x + r * hw * c;
                int64_t k0 = 0;
                for (; k0 + 16 <= c; k0 += 16) {
                    float acc[16] = {0};
                    for (int64_t j = 0; j < hw; j++)
                        for (int l = 0; l < 16; l++) acc[l] += src[j * c + k0 + l];
                    for (int l = 0; l < 16; l++) ctx->pooled[(k0 + l) * B + b] = acc[l] / (float)hw;
                }
                for (; k0 < c; k0++) {
                    float s = 0.0f;
                    for (int64_t j = 0; j < hw; j++) s += src[j * c + k0];
                    ctx->pooled[k0 * B + b] = s / (float)hw;
                }
                continue;
            }
            for (int64_t k = 0; k < c; k++) {
                const float *src = x + (r * c + k) * hw;
                float acc[16] = {0};
                int64_t j = 0;
                for (; j + 16 <= hw; j += 16)
                    for (int l = 0; l < 16; l++) acc[l] += src[j + l];
                float s = 0.0f;
                for (int l = 0; l < 16; l++) s += acc[l];
                for (; j < hw; j++) s += src[j];
                ctx->pooled[k * B + b] = s / (float)hw;
            }
        }
        ctx->width = width;
    } else if (width != ctx->width) {
        return -2;  /* the input changed width, so it must be given */
    }
    const float *wp = (const float *)(uintptr_t)ctx->proj[2 * index];
    const float *bp = (const float *)(uintptr_t)ctx->proj[2 * index + 1];
    float *e = ctx->scratch, *z = ctx->scratch + E * B, *h = ctx->state, *cell = ctx->state + H * B;
    if (B < 8) {  /* few images: image by image (the same sums in the same order as below) */
        for (int64_t b = 0; b < B; b++) {
            for (int64_t j = 0; j < E; j++) {
                float acc = bp[j];
                for (int64_t k = 0; k < width; k++) acc += wp[j * width + k] * ctx->pooled[k * B + b];
                e[j] = acc;
            }
            for (int64_t g = 0; g < G; g++) {
                float acc = ctx->b_ih[g];
                for (int64_t k = 0; k < E; k++) acc += ctx->w_ih[g * E + k] * e[k];
                for (int64_t k = 0; k < H; k++) acc += ctx->w_hh[g * H + k] * h[k * B + b];
                z[g] = acc + ctx->b_hh[g];
            }
            for (int64_t k = 0; k < H; k++) {
                const float cn = sigmoid_(z[H + k]) * cell[k * B + b] + sigmoid_(z[k]) * tanh_(z[2 * H + k]);
                cell[k * B + b] = cn;
                h[k * B + b] = sigmoid_(z[3 * H + k]) * tanh_(cn);
            }
        }
        return finish_(ctx, index, e);
    }
    fill_rows_(e, bp, E, B);
    gemm_acc_(e, wp, ctx->pooled, E, width, B);             /* e = W_p m + b_p          (E, B) */
    fill_rows_(z, ctx->b_ih, G, B);
    gemm_acc_(z, ctx->w_ih, e, G, E, B);
    gemm_acc_(z, ctx->w_hh, h, G, H, B);
    for (int64_t g = 0; g < G; g++)                         /* z = W_ih e + b_ih + W_hh h + b_hh  (4H, B) */
        for (int64_t b = 0; b < B; b++) z[g * B + b] += ctx->b_hh[g];
    for (int64_t k = 0; k < H; k++)
        for (int64_t b = 0; b < B; b++) {
            const float cn = sigmoid_(z[(H + k) * B + b]) * cell[k * B + b]
                             + sigmoid_(z[k * B + b]) * tanh_(z[(2 * H + k) * B + b]);
            cell[k * B + b] = cn;
            h[k * B + b] = sigmoid_(z[(3 * H + k) * B + b]) * tanh_(cn);
        }
    return finish_(ctx, index, e);
}

/* The logits from h, p = sigmoid(logit / temperature) and the decisions of gate `index`; `logit` is (B). */
static int64_t finish_(gate_ctx *ctx, int64_t index, float *logit) {
    const int64_t B = ctx->batch, H = ctx->hidden;
    const float *h = ctx->state;
    fill_rows_(logit, ctx->b_fc, 1, B);
    gemm_acc_(logit, ctx->w_fc, h, 1, H, B);
    if (ctx->temperature != 1.0f)
        for (int64_t b = 0; b < B; b++) logit[b] /= ctx->temperature;
    float *p = logit;
    for (int64_t b = 0; b < B; b++) p[b] = sigmoid_(logit[b]);
    const int64_t N = ctx->gates;
    for (int64_t b = 0; b < B; b++) ctx->probs[b * N + index] = p[b];
    int64_t count = 0;
    if (ctx->decide) {
        uint8_t *run = ctx->runs + index * B;
        for (int64_t b = 0; b < B; b++) {
            run[b] = p[b] >= ctx->tau;
            count += run[b];
        }
        for (int64_t b = 0; ctx->decisions && b < B; b++) ctx->decisions[b * N + index] = (float)run[b];
    }
    ctx->steps = index + 1;
    return count;
}

/* The public step: gate_step_ with subnormal floats flushed to zero (x86's FTZ and DAZ; the caller's mode is
   restored on return). A saturated LSTM cell (large gate inputs: sigmoid(z) ~ 1e-38) makes subnormal
   products, each ~100 cycles in the scalar loops: that made the whole step 2-3x slower, measured in a
   ResNet-110 at batch 1. Flushing changes values by less than 1.2e-38. */
int64_t skipnet_gate_step(gate_ctx *ctx, int64_t index, const float *x, int64_t rows, int64_t c, int64_t hw,
                          int channels_last, const int64_t *idx) {
#if defined(__SSE__)
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  /* FTZ | DAZ */
    const int64_t result = gate_step_(ctx, index, x, rows, c, hw, channels_last, idx);
    _mm_setcsr(csr);
    return result;
#else
    return gate_step_(ctx, index, x, rows, c, hw, channels_last, idx);
#endif
}
"""


class _GateCtx(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int64), ("embed", ctypes.c_int64), ("hidden", ctypes.c_int64), ("gates", ctypes.c_int64),
        ("channels", ctypes.c_void_p), ("proj", ctypes.c_void_p), ("w_ih", ctypes.c_void_p), ("w_hh", ctypes.c_void_p),
        ("b_ih", ctypes.c_void_p), ("b_hh", ctypes.c_void_p), ("w_fc", ctypes.c_void_p), ("b_fc", ctypes.c_void_p),
        ("pooled", ctypes.c_void_p), ("state", ctypes.c_void_p), ("scratch", ctypes.c_void_p),
        ("probs", ctypes.c_void_p), ("decisions", ctypes.c_void_p), ("runs", ctypes.c_void_p),
        ("temperature", ctypes.c_float), ("tau", ctypes.c_float), ("decide", ctypes.c_int32), ("width", ctypes.c_int64),
        ("steps", ctypes.c_int64),
    ]


_NATIVE_ERRORS = {-1: "gates must run in order", -2: "wrong number of channels", -3: "bad image indices",
                  -4: "the stepper was released"}
_F32, _CHANNELS_LAST = torch.float32, torch.channels_last  # (module globals: read once per gate step)


def native_gate_library() -> Any:
    """The C kernel of the RNN gate's inference stepper, or ``None`` (then PyTorch ops are used): built on
    first use by :func:`.native.load_kernel` (``SKIPNET_NATIVE=0`` turns it off)."""
    return load_kernel("rnn_gate", _NATIVE_SOURCE, _NATIVE_SIGNATURES)


_NATIVE_SIGNATURES = {"skipnet_gate_step": (
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
     ctypes.c_int, ctypes.c_void_p], ctypes.c_int64)}


def build_gates(kind: str, channels: list[int], embed_dim: int = 10, hidden_dim: int = 10) -> GateBank:
    """Build the gate bank ``kind`` (one of :data:`GATE_TYPES`) for blocks with these input channels."""
    if kind == "rnn":
        return RNNGateBank(channels, embed_dim, hidden_dim)
    if kind in ("ffgate1", "ffgate2"):
        return FFGateBank(channels, kind)
    raise ValueError(f"unknown gate type {kind!r}; expected one of {GATE_TYPES} (or 'none' for a plain ResNet)")


