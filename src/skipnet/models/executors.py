"""Executors: how a gated block is run given per-image decisions g (B,).

* ``masked``: the block runs on the whole batch and outputs are mixed, ``S(x) + g * (F(x) - S(x))``.
  Differentiable in g (straight-through, soft) and what training uses: BatchNorm sees the whole batch.
* ``compact``: only the images whose gate fired run the residual branch, gathered into a sub-batch; a
  block no image needs is not run at all. Inference only (eval-mode BatchNorm), equal to ``masked`` to
  float tolerance. Needs hard 0/1 decisions, and reads them on the host (one sync per block on an
  accelerator). :func:`run_compact` consumes its input: with an identity shortcut the result is written
  into ``x``.

Compact execution costs copies of the activations of the images that run: :func:`run_compact_rows` gathers
and scatters them (two copies); the network's inference loop keeps a :class:`FragmentedBatch` instead,
which only gathers (one copy). When nearly every image runs, running the block on the whole batch and
copying the few skipped images' shortcut back costs less; both switch to that at :func:`crossover` (still
exact: each image gets either ``F(x)`` or ``S(x)``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .blocks import ResidualBlock
from .native import load_kernel

EXECUTORS = ("masked", "compact")
# Crossover: copying one image's activations costs about COPY_COST / C of running a basic block of width C on
# it (both scale with H*W; the convolutions also with C). With k copies per running image, running the
# B - n skipped images too is cheaper once n / B > 1 / (1 + k COPY_COST / C): for gather + scatter (k = 2)
# 0.90 at C = 16, 0.95 at 32, 0.97 at 64 -- the crossovers measured on the 2-core development CPU, batch 128.
COPY_COST = 0.9


def crossover(channels: int, copies: int = 2) -> float:
    """Fraction of the batch running a block of input width ``channels`` from which compact execution runs
    the whole batch and restores the skipped images, when the compact way costs ``copies`` copies of the
    running images' activations."""
    return 1.0 / (1.0 + copies * COPY_COST / channels)


def run_masked(block: ResidualBlock, x: Tensor, g: Tensor) -> Tensor:
    s = block.shortcut(x)
    r = block.residual(x)
    if type(block).merge is ResidualBlock.merge and torch.is_grad_enabled():
        return GatedMerge.apply(r, s, g)  # fused: one pass each way on the CPU (see GatedMerge)
    f = block.merge(r, s)
    return torch.lerp(s, f, g.view(-1, 1, 1, 1).to(f.dtype))


def _flat_rows(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C*H*W), a view for contiguous and channels_last tensors."""
    if t.is_contiguous():
        return t.view(t.shape[0], -1)
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1)


class GatedMerge(torch.autograd.Function):
    """``S + g * (relu(R + S) - S)`` for the default merge, with a hand-written backward.

    On the CPU in float32 both directions are one pass of a small C kernel (:data:`MERGE_SOURCE`, on
    PyTorch's threads) over the activations: forward reads R and S and writes the output, as a plain block's
    merge does; backward reads the incoming gradient, R and S (F = relu(R + S) is recomputed) -- or F, which
    is the output, when every image ran -- and writes the two input gradients and the gate's gradient
    sum_{chw} grad * (F - S). When every image of the batch runs the block (most batches in straight-through
    training) the two input gradients are one tensor (exact), which leaves a gated block the memory traffic
    of a plain one plus one read of S. Elsewhere (CUDA, float64, bf16, other
    layouts, ``torch.compile``) PyTorch ops compute the same: five passes in backward, against autograd's
    eight for the expression. Values and gradients equal autograd's (gradcheck and float32 comparisons in
    the tests)."""

    @staticmethod
    def forward(ctx, r: Tensor, s: Tensor, g: Tensor) -> Tensor:  # type: ignore[override]
        ctx.g_dtype = g.dtype
        lib = merge_library() if g.numel() == r.shape[0] and _native_rows(r, s) else None
        ctx.native = lib is not None
        if lib is not None:
            g32 = g.detach().to(torch.float32).contiguous()
            ctx.all_run = bool(g32.eq(1).all())  # a host read: the tensors are on the CPU
            out = torch.empty_like(r)  # r's strides (dense): the rows the kernel assumes
            batch = r.shape[0]
            lib.skipnet_merge_forward(r.data_ptr(), s.data_ptr(), g32.data_ptr(), batch, r.numel() // batch,
                                      out.data_ptr(), torch.get_num_threads())
            # backward needs F: the output itself when every image ran, else recomputed from R (no extra write)
            ctx.save_for_backward(out if ctx.all_run else r, s, g32)
            return out
        f = torch.add(r, s).relu_()
        g4 = g.view(-1, 1, 1, 1).to(f.dtype)
        ctx.save_for_backward(f, s, g4)
        return torch.lerp(s, f, g4)

    @staticmethod
    @once_differentiable  # (F and g are saved as constants: a second derivative would be wrong, so it raises)
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        if ctx.native:
            return _merge_backward_native(ctx, grad)
        f, s, g4 = ctx.saved_tensors
        grad_r = torch.ops.aten.threshold_backward(grad * g4, f, 0)  # d/dR: g * 1[f > 0] * grad
        grad_s = torch.addcmul(grad_r, grad, 1 - g4)  # d/dS: (1 - g) * grad + d/dR
        grad_g = None
        if ctx.needs_input_grad[2]:
            diff = f - s
            if grad.stride() == diff.stride():
                grad_g = torch.bmm(_flat_rows(grad).unsqueeze(1), _flat_rows(diff).unsqueeze(2)).view(-1)
            else:
                grad_g = (grad * diff).sum((1, 2, 3))
            grad_g = grad_g.to(ctx.g_dtype)
        return grad_r, grad_s, grad_g


def _merge_backward_native(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    f, s, g32 = ctx.saved_tensors  # f: F, or R when not every image ran
    if grad.dtype != f.dtype or grad.stride() != f.stride():
        grad = torch.empty_like(f).copy_(grad)
    batch = f.shape[0]
    grad_r = torch.empty_like(f)
    grad_s = None if ctx.all_run else torch.empty_like(f)
    grad_g = torch.empty(batch, dtype=torch.float32, device=f.device) if ctx.needs_input_grad[2] else None
    merge_library().skipnet_merge_backward(
        grad.data_ptr(), f.data_ptr(), s.data_ptr(), g32.data_ptr(), batch, f.numel() // batch, not ctx.all_run,
        grad_r.data_ptr(),
        None if grad_s is None else grad_s.data_ptr(), None if grad_g is None else grad_g.data_ptr(),
        torch.get_num_threads())
    return grad_r, grad_r if grad_s is None else grad_s, None if grad_g is None else grad_g.to(ctx.g_dtype)


# Below this many values a merge costs less as PyTorch's ops than as a kernel call behind the checks (~10 us
# of Python): the batch-1 CIFAR blocks (16K values) stay on PyTorch's ops.
NATIVE_MERGE_MIN_NUMEL = 1 << 16


def plain_eager(x: Tensor) -> bool:
    """True for an ordinary tensor run eagerly: no tensor subclass (fake, functional), no dispatch mode (a
    FLOP counter, fake-tensor tracing), no compilation and no ``torch.jit.trace`` -- which would not see work
    done outside PyTorch (the C kernels, the host-stepped gates)."""
    return (type(x) is Tensor and not torch._C._len_torch_dispatch_stack() and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing())


def _native_rows(r: Tensor, s: Tensor) -> bool:
    """Whether the merge kernel can take ``r`` and ``s``: float32 CPU tensors of one shape and the same dense
    strides (contiguous or channels_last), so that image b is values [b K, (b+1) K) of each, in different
    storages (the inference kernel takes them as ``restrict``), run eagerly (:func:`plain_eager`; tracing and
    compilation get the PyTorch ops)."""
    return (r.dtype == torch.float32 and s.dtype == torch.float32 and r.device.type == "cpu"
            and s.device.type == "cpu" and r.dim() == 4 and r.shape == s.shape and r.stride() == s.stride()
            and r.numel() > 0 and (r.is_contiguous() or r.is_contiguous(memory_format=torch.channels_last))
            and type(s) is Tensor and plain_eager(r)
            and r.untyped_storage().data_ptr() != s.untyped_storage().data_ptr())


_P, _I, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_MERGE_SIGNATURES = {
    "skipnet_merge_forward": ([_P, _P, _P, _I, _I, _P, _INT], None),
    "skipnet_merge_backward": ([_P, _P, _P, _P, _I, _I, _INT, _P, _P, _P, _INT], None),
    "skipnet_add_relu_pool": ([_P, _P, _I, _I, _I, _INT, _P, _INT], None),
}


def merge_library() -> Any:
    """The gated-merge kernels, or ``None`` (then PyTorch ops are used); see :mod:`.native` (which builds
    them once per process)."""
    return load_kernel("gated_merge", MERGE_SOURCE, _MERGE_SIGNATURES, openmp=True)


MERGE_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>

/* The gated merge of B images of K values each (image b is values [b K, (b+1) K) of every array: contiguous
   or channels_last tensors of the same strides), image b weighted by g[b]:
   out = lerp(s, relu(r + s), g) -- torch.lerp's formula, exact for g in {0, 1}. */
void skipnet_merge_forward(const float *r, const float *s, const float *g, int64_t B, int64_t K, float *out,
                           int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const float w = g[b], u = 1.0f - w;
        const float *rb = r + b * K, *sb = s + b * K;
        float *ob = out + b * K;
        for (int64_t k = 0; k < K; k++) {  /* also for w in {0, 1}: a NaN anywhere shows, as with lerp */
            float v = rb[k] + sb[k];
            v = v < 0.0f ? 0.0f : v;  /* relu, NaN kept (as torch.relu) */
            ob[k] = w < 0.5f ? sb[k] + w * (v - sb[k]) : v - (v - sb[k]) * u;
        }
    }
}

/* Its backward from the incoming gradient d, given f = relu(r + s) -- or r itself when from_r, then f is
   recomputed: grad_r = g 1[f > 0] d, grad_s = grad_r + (1 - g) d (not written when grad_s is null: every g
   is 1, so it equals grad_r) and, when grad_g is given, grad_g[b] = sum_k d (f - s) -- 16 partial sums per
   image, so the loop vectorises. One pass over d, f (or r) and s. */
void skipnet_merge_backward(const float *d, const float *f, const float *s, const float *g, int64_t B,
                            int64_t K, int from_r, float *grad_r, float *grad_s, float *grad_g, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const float w = g[b], u = 1.0f - w;
        const float *db = d + b * K, *fb = f + b * K, *sb = s + b * K;
        float *rb = grad_r + b * K, *qb = grad_s ? grad_s + b * K : NULL;
        float acc[16] = {0};
        const int64_t K16 = grad_g ? K - K % 16 : 0;
        for (int64_t k = 0; k < K16; k += 16)
            for (int l = 0; l < 16; l++) {
                const float dv = db[k + l], sv = sb[k + l];
                float fv = fb[k + l];
                if (from_r) {
                    fv += sv;
                    fv = fv < 0.0f ? 0.0f : fv;
                }
                acc[l] += dv * (fv - sv);
                const float rv = fv > 0.0f ? w * dv : 0.0f;
                rb[k + l] = rv;
                if (qb) qb[k + l] = rv + u * dv;
            }
        for (int64_t k = K16; k < K; k++) {
            const float dv = db[k], sv = sb[k];
            float fv = fb[k];
            if (from_r) {
                fv += sv;
                fv = fv < 0.0f ? 0.0f : fv;
            }
            if (grad_g) acc[0] += dv * (fv - sv);
            const float rv = fv > 0.0f ? w * dv : 0.0f;
            rb[k] = rv;
            if (qb) qb[k] = rv + u * dv;
        }
        if (grad_g) {
            float t = 0.0f;
            for (int l = 0; l < 16; l++) t += acc[l];
            grad_g[b] = t;
        }
    }
}

/* Inference merge in place, r = relu(r + s), for B images of C channels x HW positions (channels_last:
   (HW, C) per image, else (C, HW)); with pooled, also each image's channel means of the result
   (pooled[b C + c]), which the next gate would otherwise read the whole output again for. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__GNUC__) && __GNUC__ >= 6 \
    && !defined(__clang__) && !defined(SKIPNET_NO_CLONES)
__attribute__((target_clones("avx512f", "avx2", "default")))  /* one build per vector width, picked at load */
#endif
void skipnet_add_relu_pool(float *r, const float *s, int64_t B, int64_t C, int64_t HW, int channels_last,
                           float *pooled, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
    for (int64_t b = 0; b < B; b++) {
        float *rb = r + b * C * HW;
        const float *sb = s + b * C * HW;
        if (channels_last) {
            float acc[C];
            for (int64_t c = 0; c < C; c++) acc[c] = 0.0f;
            for (int64_t j = 0; j < HW; j++) {
                float *restrict rj = rb + j * C;  /* (restrict: r and s do not overlap, so this loop vectorises) */
                const float *restrict sj = sb + j * C;
                for (int64_t c = 0; c < C; c++) {
                    float v = rj[c] + sj[c];
                    v = v < 0.0f ? 0.0f : v;
                    rj[c] = v;
                    acc[c] += v;
                }
            }
            if (pooled)
                for (int64_t c = 0; c < C; c++) pooled[b * C + c] = acc[c] / (float)HW;
            continue;
        }
        for (int64_t c = 0; c < C; c++) {
            float *rc = rb + c * HW;
            const float *sc = sb + c * HW;
            float acc[16] = {0};
            const int64_t n16 = HW - HW % 16;
            for (int64_t j = 0; j < n16; j += 16)
                for (int l = 0; l < 16; l++) {
                    float v = rc[j + l] + sc[j + l];
                    v = v < 0.0f ? 0.0f : v;
                    rc[j + l] = v;
                    acc[l] += v;
                }
            for (int64_t j = n16; j < HW; j++) {
                float v = rc[j] + sc[j];
                v = v < 0.0f ? 0.0f : v;
                rc[j] = v;
                acc[0] += v;
            }
            if (pooled) {
                float total = 0.0f;
                for (int l = 0; l < 16; l++) total += acc[l];
                pooled[b * C + c] = total / (float)HW;
            }
        }
    }
}
"""


def _format(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor in that layout (so that copies keep the layout the convolutions use)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x.index_select(0, idx)`` in ``x``'s memory layout."""
    fmt = _format(x)
    if fmt == torch.contiguous_format:
        return x.index_select(0, idx)
    out = torch.empty((len(idx), *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    return torch.index_select(x, 0, idx, out=out)


def merge_into(block: ResidualBlock, residual: Tensor, shortcut: Tensor) -> Tensor:
    """``block.merge(residual, shortcut)``, in place on ``residual`` (a fresh tensor) for the default merge
    (the same arithmetic, so the same values, without two temporaries)."""
    return merge_pool_into(block, residual, shortcut, pool=False)[0]


def merge_pool_into(block: ResidualBlock, residual: Tensor, shortcut: Tensor,
                    pool: bool = True) -> tuple[Tensor, Tensor | None]:
    """:func:`merge_into`, and with ``pool`` the result's spatial means (B, C, 1, 1) when they come from the
    same pass over it (the C kernel: float32 on the CPU), else ``None``. On the CPU in float32 the default
    merge is one pass of that kernel for any network, plain or gated; elsewhere PyTorch's two in-place ops."""
    if type(block).merge is not ResidualBlock.merge:
        return block.merge(residual, shortcut), None
    lib = None
    threads = torch.get_num_threads()
    if (residual.numel() >= NATIVE_MERGE_MIN_NUMEL and residual.shape[0] >= threads and not torch.is_grad_enabled()
            and _native_rows(residual, shortcut)):
        lib = merge_library()  # (the kernel splits the batch over the threads: at least one image each)
    if lib is None:
        return torch.relu_(residual.add_(shortcut)), None
    b, c, h, w = residual.shape
    pooled = torch.empty(b, c, 1, 1, dtype=residual.dtype, device=residual.device) if pool else None
    lib.skipnet_add_relu_pool(residual.data_ptr(), shortcut.data_ptr(), b, c, h * w, not residual.is_contiguous(),
                              None if pooled is None else pooled.data_ptr(), threads)
    return residual, pooled


def run_block(block: ResidualBlock, x: Tensor) -> Tensor:
    """``block(x)`` for inference (no autograd): the merge is done in place, which saves two batch-sized
    temporaries (~5% of a CIFAR block at batch 256 on CPU). Equal to ``block(x)``."""
    return run_block_pooled(block, x, pool=False)[0]


def run_block_pooled(block: ResidualBlock, x: Tensor, pool: bool = True) -> tuple[Tensor, Tensor | None]:
    """:func:`run_block`, and with ``pool`` the output's spatial means where the merge computed them (see
    :func:`merge_pool_into`), else ``None``."""
    if type(block).forward is not ResidualBlock.forward or torch.is_grad_enabled():
        return block(x), None
    return merge_pool_into(block, block.residual(x), block.shortcut(x), pool)


def run_compact_rows(block: ResidualBlock, x: Tensor, idx: Tensor, n: int) -> tuple[Tensor, Tensor | None]:
    """Run ``block`` for the images ``idx`` (int64, on ``x``'s device, ``n`` of them, 0 < n < B); the others
    get the shortcut. Returns ``(out, f)``: the new batch and, when the outputs of the running images were
    computed as a sub-batch, those outputs ``f`` (n, ...) in ``idx`` order (else ``None``: every row of
    ``out`` may have changed). ``x`` is consumed (with an identity shortcut ``out`` is ``x``, updated)."""
    batch = x.shape[0]
    if n >= crossover(x.shape[1]) * batch:
        # Whole batch, then put back the few skipped images' shortcut: exact, and no gather of n images.
        keep = torch.ones(batch, dtype=torch.bool, device=x.device)
        keep[idx] = False
        skipped = keep.nonzero().squeeze(1)
        s_skipped = block.shortcut(_rows(x, skipped))
        return run_block(block, x).index_copy_(0, skipped, s_skipped), None
    sub = _rows(x, idx)  # (n, C, H, W)
    if block.downsample is None:
        f = merge_into(block, block.residual(sub), sub)
        return x.index_copy_(0, idx, f), f  # writes into x: x is consumed
    s = block.shortcut(x)  # the projection, which a skipped block still pays for
    f = merge_into(block, block.residual(sub), _rows(s, idx))
    return s.index_copy_(0, idx, f), None


class FragmentedBatch:
    """The activations of a batch during compact inference, left where they were computed instead of being
    scattered back into one tensor after every block.

    Image ``b`` is row ``row[b]`` of fragment ``frag[b]``. Running an identity-shortcut block on some images
    gathers their rows (one copy, in fragment order), runs the block on that sub-batch and keeps the result
    as a new fragment; fragments no image lives in any more are dropped. Work on the whole batch (every
    image runs) uses :meth:`whole`: one tensor whose rows hold the images in the order ``perm`` (``None``:
    image order) -- all per-image computations, so the order only matters for the caller's final output. A
    transition block, which gives every image new activations, gathers the images that run it and the others
    (one copy each) and :meth:`assign` s the two results."""

    def __init__(self, x: Tensor):
        self.batch = x.shape[0]
        self.reset(x, None)

    def reset(self, x: Tensor, perm: np.ndarray | None) -> None:
        """The batch is now ``x``, its rows holding the images ``perm`` (``None``: image order)."""
        self.frags: list[Tensor | None] = [x]
        self.live = [self.batch]  # images living in each fragment
        self.frag = np.zeros(self.batch, dtype=np.int64)
        self.row = np.arange(self.batch)
        if perm is not None:
            self.row[perm] = np.arange(self.batch)
        self.perm = perm
        self.single = True

    def assign(self, parts: list[Tensor], images: list[np.ndarray]) -> None:
        """The batch is now the fragments ``parts``, row ``j`` of ``parts[k]`` holding image ``images[k][j]``
        (together every image once)."""
        self.frags = list(parts)
        self.live = [len(im) for im in images]
        for k, im in enumerate(images):
            self.frag[im] = k
            self.row[im] = np.arange(len(im))
        self.perm = None
        self.single = False

    def replace(self, x: Tensor) -> None:
        """The whole batch (see :meth:`whole`) is now ``x``, rows in the same order."""
        self.frags[0] = x

    def whole(self) -> tuple[Tensor, np.ndarray | None]:
        """The batch as one tensor and the image in each row (``None``: image order); gathers if it is in
        several fragments."""
        if not self.single:
            x, order = self.gather(np.arange(self.batch))
            self.reset(x, order)
        return self.frags[0], self.perm

    def gather(self, idx: np.ndarray) -> tuple[Tensor, np.ndarray]:
        """The rows of images ``idx`` as one dense tensor (the fragments' layout), fragment by fragment, and
        the image in each row."""
        frag, row = self.frag[idx], self.row[idx]
        key = np.argsort(frag * self.batch + row, kind="stable")
        order, frag, row = idx[key], frag[key], row[key]
        first = self.frags[int(frag[0])]
        out = torch.empty((len(idx), *first.shape[1:]), dtype=first.dtype, device=first.device,
                          memory_format=_format(first))
        ks, starts = np.unique(frag, return_index=True)
        ends = [*starts[1:].tolist(), len(idx)]
        for k, a, b in zip(ks.tolist(), starts.tolist(), ends):
            src, rows = self.frags[k], row[a:b]
            if rows[-1] - rows[0] == b - a - 1:  # a run of consecutive rows: a plain copy
                out[a:b].copy_(src[int(rows[0]) : int(rows[-1]) + 1])
            else:
                torch.index_select(src, 0, torch.from_numpy(rows).to(src.device), out=out[a:b])
        return out, order

    def push(self, x: Tensor, images: np.ndarray) -> None:
        """``x`` holds the new activations of ``images``, row by row."""
        k = len(self.frags)
        for j, count in enumerate(np.bincount(self.frag[images], minlength=k).tolist()):
            if count:
                self.live[j] -= count
                if self.live[j] == 0:
                    self.frags[j] = None  # free it
        self.frags.append(x)
        self.live.append(len(images))
        self.frag[images] = k
        self.row[images] = np.arange(len(images))
        self.single = len(images) == self.batch
        if self.single:
            self.frags, self.live, self.frag[:] = [x], [self.batch], 0
            self.perm = images.copy()


def run_compact(block: ResidualBlock, x: Tensor, g: Tensor) -> Tensor:
    idx = torch.nonzero(g > 0.5).squeeze(1)  # images that run the block
    n = idx.numel()
    if n == x.shape[0]:
        return run_block(block, x)
    if n == 0:
        return block.shortcut(x)  # identity (x itself) or the projection, which a skipped block still pays for
    return run_compact_rows(block, x, idx, n)[0]


def get_executor(name: str) -> Callable[[ResidualBlock, Tensor, Tensor], Tensor]:
    if name == "masked":
        return run_masked
    if name == "compact":
        return run_compact
    raise ValueError(f"unknown executor {name!r}; expected one of {EXECUTORS}")
