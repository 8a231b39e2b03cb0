"""skipnet's custom ops: the residual merge (training and inference) and the RNN gate's inference step.

Each op is a ``torch.library`` op (namespace ``skipnet``) with

* a **PyTorch reference implementation** (``*_reference`` below, registered for every device): the fallback
  wherever the kernel does not apply, and the oracle of the tests;
* a **CPU kernel** for float32 (``skipnet/csrc/*.cpp``, built on first use by :mod:`.build`, registered for the
  CPU): the same arithmetic in one pass, where PyTorch would run a chain of small ops;
* a **fake implementation** (shapes only), so that ``torch.compile`` and ``torch.export`` trace through
  the op, and for ``gated_merge`` an **autograd formula** (``gated_merge_backward``, itself an op); the RNN
  gate step has a FLOP formula, so that :class:`torch.utils.flop_counter.FlopCounterMode` counts the gate as
  the reference's matrix products.

The functions at the end (:func:`gated_merge`, :func:`add_relu_pool_`, :func:`rnn_gate_step`) are what the
rest of the package calls: they use the kernel where it is built and applies (float32 CPU tensors in the
layouts it takes), else the reference. :func:`kernels_available` builds and loads the kernels once per
process; :func:`reference_only` turns them off within a block (tests, measurements).

The kernels' CPU preconditions are checked in Python before a call (dtype, device, one shape and the same
dense strides); the kernels check them again and raise ``RuntimeError`` when called directly with other
tensors. Whether and from which sizes the kernels pay for themselves is measured by
``benchmarks/bench_merge.py`` and ``benchmarks/bench_runner.py`` (figures in docs/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import build

__all__ = ["add_relu_pool_", "gated_merge", "kernels_available", "reference_only", "rnn_gate_step",
           "rnn_gate_step_reference", "kernel_applies"]

_lib = torch.library.Library("skipnet", "DEF")
_lib.define("gated_merge(Tensor r, Tensor s, Tensor g) -> Tensor")
_lib.define("gated_merge_backward(Tensor grad, Tensor f, Tensor s, Tensor g, bool from_r, bool need_s, bool need_g)"
            " -> (Tensor, Tensor, Tensor)")
_lib.define("add_relu_pool_(Tensor(a!) r, Tensor s, bool pool) -> Tensor")
_lib.define("rnn_gate_step(Tensor(a!) pooled, Tensor(b!) state, Tensor(c!) probs, Tensor(d!) decisions, Tensor? x, "
            "Tensor? idx, int index, Tensor w_p, Tensor b_p, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, "
            "Tensor w_fc, Tensor b_fc, float temperature, float? tau) -> int")


# --- reference implementations --------------------------------------------------------------------------------

def gated_merge_reference(r: Tensor, s: Tensor, g: Tensor) -> Tensor:
    """The gated merge of a batch (B, ...) with per-image weights ``g`` (B,): ``lerp(s, relu(r + s), g)`` --
    ``relu(r + s)`` (the block's output) where g = 1, the shortcut ``s`` where g = 0."""
    return torch.lerp(s, torch.relu(r + s), g.view(-1, *([1] * (r.dim() - 1))).to(r.dtype))


def gated_merge_backward_reference(grad: Tensor, f: Tensor, s: Tensor, g: Tensor, from_r: bool, need_s: bool,
                                   need_g: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`gated_merge_reference` from ``grad``, given ``f = relu(r + s)`` -- or ``r``
    itself when ``from_r``: ``grad_r = g 1[f > 0] grad``; ``grad_s = grad_r + (1 - g) grad`` (with ``need_s``;
    equal to ``grad_r`` when every g is 1); ``grad_g = sum over an image of grad (f - s)`` (with ``need_g``,
    float32). Gradients not asked for are empty tensors."""
    if from_r:
        f = torch.relu(f + s)
    g4 = g.view(-1, *([1] * (f.dim() - 1))).to(f.dtype)
    grad_r = torch.ops.aten.threshold_backward(grad * g4, f, 0)
    grad_s = torch.addcmul(grad_r, grad, 1 - g4) if need_s else f.new_empty(0)
    grad_g = (grad * (f - s)).flatten(1).sum(1).float() if need_g else f.new_empty(0)
    return grad_r, grad_s, grad_g


def add_relu_pool_reference(r: Tensor, s: Tensor, pool: bool) -> Tensor:
    """Inference merge in place: ``r = relu(r + s)``; with ``pool``, returns the result's spatial means
    (B, C, 1, 1), else an empty tensor."""
    torch.relu_(r.add_(s))
    return r.mean((2, 3), keepdim=True) if pool else r.new_empty(0)


def rnn_gate_step_reference(pooled: Tensor, state: Tensor, probs: Tensor, decisions: Tensor, x: Tensor | None,
                            idx: Tensor | None, index: int, w_p: Tensor, b_p: Tensor, w_ih: Tensor, w_hh: Tensor,
                            b_ih: Tensor, b_hh: Tensor, w_fc: Tensor, b_fc: Tensor, temperature: float,
                            tau: float | None) -> int:
    """Gate ``index`` of an RNN gate bank (:class:`~skipnet.models.gates.RNNGateBank`) for a batch of B images,
    in place on the pass's buffers: ``pooled`` (B, >= C) the gate inputs' spatial means, ``state`` (2, B, H)
    the LSTM's (h, c), ``probs`` and ``decisions`` (B, N).

    If ``x`` (rows, C, H, W) is given, it is the new input of the images ``idx`` (int64, distinct) -- of every
    image when ``idx`` is None (then rows = B) -- and their means replace theirs in ``pooled``; the other images
    keep theirs (their input did not change). Then, from h = c = 0 at gate 0: the projection of
    ``pooled[:, :C]`` (``w_p``, ``b_p``), one LSTM step, the output layer, p = sigmoid(logit / temperature)
    into ``probs[:, index]``; with a threshold ``tau``, ``decisions[:, index] = p >= tau`` (0/1) and the number
    of images that run is returned (else 0, and ``decisions`` is left alone)."""
    from ..models.gates import rnn_gate  # (the gate's own arithmetic: one definition)

    c = w_p.shape[1]
    if x is not None:
        if x.dim() != 4 or x.shape[1] != c:
            raise RuntimeError(f"skipnet::rnn_gate_step: gate {index} takes input of shape (rows, {c}, H, W); "
                               f"got {tuple(x.shape)}")
        m = x.mean((2, 3)).to(pooled.dtype)  # (rows, C)
        if idx is None:
            if x.shape[0] != pooled.shape[0]:
                raise RuntimeError(f"skipnet::rnn_gate_step: x has {x.shape[0]} rows for a batch of "
                                   f"{pooled.shape[0]} (give idx for some images)")
            pooled[:, :c] = m
        else:
            pooled[:, :c].index_copy_(0, idx, m)
    if index == 0:
        state.zero_()
    logit, h, cell = rnn_gate(pooled[:, :c], state[0], state[1], w_p, b_p, w_ih, w_hh, b_ih, b_hh, w_fc, b_fc)
    state[0] = h
    state[1] = cell
    if temperature != 1.0:
        logit = logit / temperature
    p = torch.sigmoid(logit)  # (B,)
    probs[:, index] = p
    if tau is None:
        return 0
    run = p >= tau
    decisions[:, index] = run
    return int(run.sum())


_lib.impl("gated_merge", gated_merge_reference, "CompositeExplicitAutograd")
_lib.impl("gated_merge_backward", gated_merge_backward_reference, "CompositeExplicitAutograd")
_lib.impl("add_relu_pool_", add_relu_pool_reference, "CompositeExplicitAutograd")
_lib.impl("rnn_gate_step", rnn_gate_step_reference, "CompositeExplicitAutograd")


# --- fake implementations (shapes only: torch.compile, torch.export) ------------------------------------------

@torch.library.register_fake("skipnet::gated_merge")
def _gated_merge_fake(r: Tensor, s: Tensor, g: Tensor) -> Tensor:
    return torch.empty_like(r)


@torch.library.register_fake("skipnet::gated_merge_backward")
def _gated_merge_backward_fake(grad, f, s, g, from_r, need_s, need_g):
    empty = f.new_empty(0)
    return (torch.empty_like(f), torch.empty_like(f) if need_s else empty,
            f.new_empty(f.shape[0], dtype=torch.float32) if need_g else f.new_empty(0))


@torch.library.register_fake("skipnet::add_relu_pool_")
def _add_relu_pool_fake(r: Tensor, s: Tensor, pool: bool) -> Tensor:
    return r.new_empty(r.shape[0], r.shape[1], 1, 1) if pool else r.new_empty(0)


@torch.library.register_fake("skipnet::rnn_gate_step")
def _rnn_gate_step_fake(pooled, state, probs, decisions, x, idx, index, w_p, b_p, w_ih, w_hh, b_ih, b_hh, w_fc,
                        b_fc, temperature, tau):
    return 0 if tau is None else torch.library.get_ctx().new_dynamic_size()


# --- autograd of the gated merge ------------------------------------------------------------------------------

def _gated_merge_setup(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    r, s, g = inputs
    ctx.g_dtype = g.dtype
    # When every image ran (most batches of straight-through training) keep F, the output, instead of R: the
    # backward then writes one tensor for both input gradients. A host read, so only for real CPU tensors
    # (not under tracing, where the general case is taken).
    ctx.all_run = type(g) is Tensor and g.device.type == "cpu" and bool(g.detach().eq(1).all())
    ctx.save_for_backward(output if ctx.all_run else r, s, g)


def _gated_merge_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    f, s, g = ctx.saved_tensors
    need_g = ctx.needs_input_grad[2]
    grad_r, grad_s, grad_g = torch.ops.skipnet.gated_merge_backward.default(
        grad, f, s, g, not ctx.all_run, not ctx.all_run, need_g)
    return grad_r, grad_r if ctx.all_run else grad_s, grad_g.to(ctx.g_dtype) if need_g else None


torch.library.register_autograd("skipnet::gated_merge", _gated_merge_backward, setup_context=_gated_merge_setup)


@register_flop_formula(torch.ops.skipnet.rnn_gate_step, get_raw=True)
def _rnn_gate_step_flops(pooled, state, probs, decisions, x, idx, index, w_p, b_p, w_ih, w_hh, *args,
                         out_val=None, **kwargs) -> int:
    """What the reference's matrix products count: projection, the LSTM's two, the output layer, per image."""
    batch, (e, c), hidden = pooled.shape[0], w_p.shape, w_hh.shape[1]
    return 2 * batch * (c * e + 4 * hidden * (e + hidden) + hidden)


# --- what the package calls -------------------------------------------------------------------------------------

_off = threading.local()  # reference_only() sets .depth in the thread that entered it


def kernels_available() -> bool:
    """Whether the CPU kernels are built and loaded (building them on the first call) and not turned off by
    :func:`reference_only` in this thread."""
    return not getattr(_off, "depth", 0) and build.load()


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Within the block (in this thread), every op's caller uses the PyTorch reference implementation."""
    _off.depth = getattr(_off, "depth", 0) + 1
    try:
        yield
    finally:
        _off.depth -= 1


def kernel_applies(r: Tensor, s: Tensor, threads: int | None = None) -> bool:
    """Whether the merge kernels take ``r`` and ``s``: built, float32 CPU tensors of one 4-D shape with the same
    dense strides (contiguous or channels_last), not empty; and, when PyTorch runs ``threads`` > 1 threads,
    kernels built with OpenMP (else PyTorch's threaded ops are faster)."""
    return (r.dtype == torch.float32 and s.dtype == torch.float32 and r.device.type == "cpu"
            and s.device.type == "cpu" and r.dim() == 4 and r.shape == s.shape and r.stride() == s.stride()
            and r.numel() > 0 and (r.is_contiguous() or r.is_contiguous(memory_format=torch.channels_last))
            and kernels_available()
            and (build.threaded() or (torch.get_num_threads() if threads is None else threads) == 1))


def gated_merge(r: Tensor, s: Tensor, g: Tensor) -> Tensor:
    """``lerp(s, relu(r + s), g)`` per image, differentiable in all three: the masked executor's merge in
    training. The kernel (one pass each way) where it applies, else :class:`GatedMergeReference`."""
    if g.numel() == r.shape[0] and kernel_applies(r, s):
        return torch.ops.skipnet.gated_merge.default(r, s, g)
    return GatedMergeReference.apply(r, s, g)


class GatedMergeReference(torch.autograd.Function):
    """:func:`gated_merge_reference` with a hand-written backward in PyTorch ops: five passes over the
    activations where autograd's formula for the expression takes eight; F = relu(R + S) is kept from the
    forward. Values and gradients equal autograd's (gradcheck in the tests)."""

    @staticmethod
    def forward(ctx, r: Tensor, s: Tensor, g: Tensor) -> Tensor:  # type: ignore[override]
        f = torch.add(r, s).relu_()
        g4 = g.view(-1, *([1] * (r.dim() - 1))).to(f.dtype)
        ctx.g_dtype = g.dtype
        ctx.save_for_backward(f, s, g4)
        return torch.lerp(s, f, g4)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        f, s, g4 = ctx.saved_tensors
        grad_r = torch.ops.aten.threshold_backward(grad * g4, f, 0)  # d/dR: g * 1[f > 0] * grad
        grad_s = torch.addcmul(grad_r, grad, 1 - g4)  # d/dS: (1 - g) * grad + d/dR
        grad_g = None
        if ctx.needs_input_grad[2]:
            diff = f - s
            if grad.stride() == diff.stride():
                grad_g = torch.bmm(_flat_rows(grad).unsqueeze(1), _flat_rows(diff).unsqueeze(2)).view(-1)
            else:
                grad_g = (grad * diff).flatten(1).sum(1)
            grad_g = grad_g.to(ctx.g_dtype)
        return grad_r, grad_s, grad_g


def _flat_rows(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C*H*W), a view for contiguous and channels_last tensors."""
    if t.is_contiguous():
        return t.view(t.shape[0], -1)
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1)


def add_relu_pool_(r: Tensor, s: Tensor, pool: bool = True, kernel: bool = True) -> tuple[Tensor, Tensor | None]:
    """Inference merge in place on ``r`` (a fresh tensor: the residual branch's output): ``relu(r + s)``,
    and with ``pool`` the result's spatial means (B, C, 1, 1) where the kernel computed them in the same pass
    (else ``None``: the reference does not spend a pass on them). ``kernel=False``: the reference."""
    if kernel and kernel_applies(r, s) and r.untyped_storage().data_ptr() != s.untyped_storage().data_ptr():
        pooled = torch.ops.skipnet.add_relu_pool_.default(r, s, pool)
        return r, pooled if pool else None
    return torch.relu_(r.add_(s)), None


def rnn_gate_step(*args, kernel: bool = True) -> int:
    """:func:`rnn_gate_step_reference`'s arguments and result, by the kernel where it is built and
    ``kernel`` (the buffers and parameters must then be float32 CPU tensors), else by the reference."""
    if kernel and kernels_available():
        return torch.ops.skipnet.rnn_gate_step.default(*args)
    return rnn_gate_step_reference(*args)
