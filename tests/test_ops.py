"""skipnet's custom ops (skipnet.ops): each CPU kernel against its PyTorch reference, the registrations that
torch.compile, torch.export and autograd rely on (torch.library.opcheck), and the build."""

import os
import subprocess
import sys
import sysconfig

import pytest
import torch

from skipnet import create_model, ops
from skipnet.infer import CompactRunner
from skipnet.ops import build

from .test_compile import _model

needs_kernels = pytest.mark.skipif(not ops.kernels_available(), reason="no C++ compiler: only the references run")


def _merge_inputs(channels_last=False, shape=(6, 16, 7, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    r, s = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    if channels_last:
        r, s = (t.contiguous(memory_format=torch.channels_last) for t in (r, s))
    return r, s


# --- the gated merge (training) -------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
def test_gated_merge_reference_matches_autograd(channels_last):
    r, s = (t.double() for t in _merge_inputs(channels_last, (4, 3, 5, 5)))
    r.requires_grad_()
    s.requires_grad_()
    g = torch.tensor([1.0, 0.0, 1.0, 0.3], dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(ops.GatedMergeReference.apply, (r, s, g))
    assert torch.autograd.gradcheck(ops.gated_merge, (r, s, g))  # float64: the reference
    out = ops.GatedMergeReference.apply(r, s, g)
    ref = torch.lerp(s, torch.relu(r + s), g.view(-1, 1, 1, 1))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ops.gated_merge_reference(r, s, g), ref)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (r, s, g), grad), torch.autograd.grad(ref, (r, s, g), grad)):
        torch.testing.assert_close(a, b)


@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("gates_", ["mixed", "all_run", "none_run", "fractional", "no_gate_grad"])
def test_gated_merge_kernel_matches_the_reference(channels_last, gates_):
    """Output and gradients of the kernel op equal the reference's (the same formulas; the gate's gradient sums
    in another order), for every kind of batch, including the all-run case where the output is F itself and
    both input gradients are one tensor."""
    r0, s0 = _merge_inputs(channels_last)
    g0 = {"mixed": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]), "all_run": torch.ones(6),
          "none_run": torch.zeros(6), "fractional": torch.rand(6)}.get(gates_, torch.tensor([1.0, 0, 0, 1, 1, 1]))
    grad = torch.randn(6, 16, 7, 9)

    def run():
        r, s = r0.clone().requires_grad_(), s0.clone().requires_grad_()
        g = g0.clone().requires_grad_(gates_ != "no_gate_grad")
        out = ops.gated_merge(r, s, g)
        (out * grad).sum().backward()
        return out.detach(), r.grad, s.grad, g.grad

    fast = run()
    with ops.reference_only():
        ref = run()
    assert torch.equal(fast[0], ref[0]) if gates_ != "fractional" else torch.allclose(fast[0], ref[0], atol=1e-6)
    torch.testing.assert_close(fast[1], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(fast[2], ref[2], rtol=0, atol=1e-6)
    if gates_ == "no_gate_grad":
        assert fast[3] is None and ref[3] is None
    else:
        torch.testing.assert_close(fast[3], ref[3], rtol=1e-5, atol=1e-4)
    assert fast[0].stride() == r0.stride() and fast[1].stride() == r0.stride()


@needs_kernels
def test_gated_merge_kernel_in_a_training_step_matches_the_reference():
    """A whole straight-through training step of a SkipNet (channels_last, float32) gives the same gradients
    with the merge kernel as with the reference (and the gates' pooled gradient as with autograd's mean)."""
    from skipnet.models import gates

    # (BatchNorm statistics and gate biases drawn as in the compile and inference tests, for the same draws)
    model = _model("cifar_resnet20").train().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    with torch.no_grad():  # move the gates' logits so that some blocks run for only part of the batch
        model.gates.fc.bias -= torch.logit(model(x, "straight_through").probs.double()).median().float()

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(x, "straight_through")
        (torch.nn.functional.cross_entropy(out.logits, y) + out.probs.mean()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], out.decisions

    fast, decisions = grads()
    runs = decisions.mean(0)
    assert (runs == 1).any() and ((0 < runs) & (runs < 1)).any()  # all-run and mixed blocks: every path
    with ops.reference_only(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(gates, "global_mean_pool", lambda t: t.mean((2, 3)))
        ref, _ = grads()
    assert len(fast) == len(ref)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("g", [[1.0, 1.0], [1.0, 0.0]])
def test_gated_merge_kernel_keeps_nan(g):
    """A NaN activation must reach the loss (the trainer stops on a non-finite loss) as it does through
    PyTorch's ops -- also from a skipped image's residual, as with lerp."""
    r, s = _merge_inputs(shape=(2, 4, 3, 3))
    r[1, 0, 0, 0] = float("nan")
    gate = torch.tensor(g)
    out = ops.gated_merge(r, s, gate)
    with ops.reference_only():
        ref = ops.gated_merge(r, s, gate)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(out[1, 0, 0, 0]) and torch.isfinite(out[0]).all()


# --- the inference merge ----------------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [16, 21])
def test_inference_merge_pools_in_the_same_pass(channels_last, channels):
    """The inference merge works in place and hands the next gate the channel means it computed on the way:
    the values of relu(R + S) exactly, the means to float rounding, NaN kept -- also for a channel count that
    is no multiple of a vector."""
    r, s = _merge_inputs(channels_last, (5, channels, 33, 31))
    r[2, 3, 4, 5] = float("nan")
    ref = torch.relu(r + s)
    out, pooled = ops.add_relu_pool_(r.clone(), s)
    plain, none = ops.add_relu_pool_(r.clone(), s, pool=False)
    reference, no_means = ops.add_relu_pool_(r.clone(), s, kernel=False)
    assert none is None and no_means is None
    for t in (out, plain, reference):
        torch.testing.assert_close(t, ref, rtol=0, atol=0, equal_nan=True)
    assert pooled.shape == (5, channels, 1, 1) and torch.isnan(pooled[2, 3]).all()
    torch.testing.assert_close(pooled, ref.mean((2, 3), keepdim=True), rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(ops.add_relu_pool_reference(r.clone(), s, True), pooled, rtol=1e-6, atol=1e-6,
                               equal_nan=True)


def test_inference_merge_takes_what_the_kernel_does_not():
    """float64, mismatched strides, a shortcut sharing r's memory: the reference, the same values."""
    r, s = _merge_inputs(shape=(3, 4, 5, 5))
    for a, b in ((r.double(), s.double()), (r, s.contiguous(memory_format=torch.channels_last))):
        out, pooled = ops.add_relu_pool_(a.clone(), b)
        torch.testing.assert_close(out, torch.relu(a + b))
        assert pooled is None
    x = r.clone()
    out, _ = ops.add_relu_pool_(x, x)
    torch.testing.assert_close(out, torch.relu(r + r))


# --- the RNN gate step ------------------------------------------------------------------------------------------

def _gate_args(batch, channels=16, width=None, seed=0, channels_last=False, rows=None):
    """A pass's buffers and a gate's parameters (RNN gate of embedding 10 and hidden size 10)."""
    g = torch.Generator().manual_seed(seed)
    e, h, n = 10, 10, 5
    width = width or channels
    bufs = (torch.zeros(batch, max(width, channels)), torch.randn(2, batch, h, generator=g), torch.zeros(batch, n),
            torch.zeros(batch, n))
    params = (torch.randn(e, channels, generator=g), torch.randn(e, generator=g), torch.randn(4 * h, e, generator=g),
              torch.randn(4 * h, h, generator=g), torch.randn(4 * h, generator=g), torch.randn(4 * h, generator=g),
              torch.randn(1, h, generator=g), torch.randn(1, generator=g))
    x = torch.randn(rows or batch, channels, 6, 5, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return bufs, x, params


@needs_kernels
@pytest.mark.parametrize("batch", [1, 3, 8, 19])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rnn_gate_step_kernel_matches_the_reference(batch, channels_last):
    """Three gates in a row (a full input, nothing changed, some images changed; a temperature; with and without
    a threshold): the kernel and the reference leave the same buffers, to float rounding (the kernel's exp is a
    polynomial), and count the same running images."""
    results = []
    for kernel in (True, False):
        bufs, x, params = _gate_args(batch, 16, channels_last=channels_last)
        (pooled, state, probs, dec) = bufs
        counts = [ops.rnn_gate_step(*bufs, x, None, 0, *params, 1.0, 0.5, kernel=kernel)]
        counts.append(ops.rnn_gate_step(*bufs, None, None, 1, *params, 0.7, None, kernel=kernel))
        idx = torch.arange(0, batch, 2)
        sub = x[: len(idx)] * 3
        counts.append(ops.rnn_gate_step(*bufs, sub, idx, 2, *params, 1.0, 0.4, kernel=kernel))
        results.append((counts, pooled, state, probs, dec))
    (ck, *fast), (cr, *ref) = results
    assert ck == cr
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)


@needs_kernels
def test_rnn_gate_step_rejects_misfits():
    """The kernel checks what it is given (a RuntimeError naming the op), as the reference does for its input."""
    bufs, x, params = _gate_args(3, 16)
    for kernel in (True, False):
        with pytest.raises(RuntimeError, match="skipnet::rnn_gate_step"):
            ops.rnn_gate_step(*bufs, torch.randn(3, 32, 4, 4), None, 0, *params, 1.0, 0.5, kernel=kernel)
        with pytest.raises(RuntimeError, match="skipnet::rnn_gate_step"):
            ops.rnn_gate_step(*bufs, torch.randn(2, 16, 4, 4), None, 0, *params, 1.0, 0.5, kernel=kernel)
    op = torch.ops.skipnet.rnn_gate_step.default
    with pytest.raises(RuntimeError, match="image index 3 of 3"):
        op(*bufs, torch.randn(2, 16, 4, 4), torch.tensor([0, 3]), 0, *params, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="gate 5 of 5"):
        op(*bufs, None, None, 5, *params, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="float32"):
        op(*bufs, x, None, 0, *(p.double() for p in params), 1.0, 0.5)


def test_rnn_gate_step_reference_is_the_gate_module():
    """The op's reference runs the gate module's own arithmetic: a full input at gate 0 gives the module's
    probability bit for bit."""
    torch.manual_seed(0)
    bank = create_model("cifar_resnet14").gates
    x = torch.randn(4, 16, 8, 8)
    logit, _ = bank(x, 0, bank.init_state(x))
    bufs = (torch.zeros(4, 64), torch.zeros(2, 4, 10), torch.zeros(4, bank.num_gates), torch.zeros(4, bank.num_gates))
    p = bank.proj[0]
    params = (p.weight, p.bias, bank.rnn.weight_ih, bank.rnn.weight_hh, bank.rnn.bias_ih, bank.rnn.bias_hh,
              bank.fc.weight, bank.fc.bias)
    with torch.no_grad():
        n = ops.rnn_gate_step_reference(*bufs, x, None, 0, *params, 1.0, 0.5)
    assert torch.equal(bufs[2][:, 0], torch.sigmoid(logit).detach())
    assert n == int((torch.sigmoid(logit) >= 0.5).sum())


# --- registrations and build ------------------------------------------------------------------------------------

def test_op_registrations():
    """torch.library's own checks of each op: schema (mutations declared), fake implementation (compile,
    export), autograd registration and the AOT dispatcher, on inputs the CPU kernels take (the references
    where no kernel is built)."""
    r, s = _merge_inputs(shape=(3, 4, 5, 5))
    g = torch.tensor([1.0, 0.0, 1.0])
    torch.library.opcheck(torch.ops.skipnet.gated_merge.default, (r.requires_grad_(), s.requires_grad_(), g))
    torch.library.opcheck(torch.ops.skipnet.gated_merge_backward.default,
                          (torch.randn(3, 4, 5, 5), r.detach(), s.detach(), g, True, True, True))
    torch.library.opcheck(torch.ops.skipnet.add_relu_pool_.default, (r.detach().clone(), s.detach(), True))
    bufs, x, params = _gate_args(3, 16)
    torch.library.opcheck(torch.ops.skipnet.rnn_gate_step.default, (*bufs, x, None, 0, *params, 1.0, None),
                          test_utils=("test_schema", "test_faketensor"))


@needs_kernels
def test_kernel_sources_compile_without_warnings():
    """The C++ sources build warning-free with the build's flags and -Werror (syntax and semantic checks)."""
    cpp_extension = build._cpp_extension()
    includes = [a for p in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
                for a in ("-isystem", p)]
    compiler = os.environ.get("CXX", "c++")
    for name in build.SOURCES:
        cmd = [compiler, "-std=c++20", "-fsyntax-only", "-Werror", *build.ATTEMPTS[0][0], *includes,
               "-DTORCH_EXTENSION_NAME=skipnet_ops_check", str(build.CSRC / name)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]


def test_without_a_compiler_everything_runs_on_the_references(tmp_path):
    """CC=false (as on a machine without a compiler): nothing is built, every op runs its PyTorch reference, and
    a compact pass, a masked training step and the FLOP count agree with the analytic MAC table."""
    code = """
import torch
from torch.utils.flop_counter import FlopCounterMode
from skipnet import create_model, ops
assert not ops.kernels_available()
torch.manual_seed(0)
model = create_model("cifar_resnet14").eval()
x = torch.randn(3, 3, 32, 32)
d = (torch.rand(3, model.num_gates) < 0.5).float()
with torch.no_grad():
    masked = model(x, "fixed", decisions=d)
    compact = model(x, "fixed", decisions=d, executor="compact")
    torch.testing.assert_close(compact.logits, masked.logits, rtol=0, atol=1e-5)
    with FlopCounterMode(display=False) as counter:
        model(x, "fixed", decisions=d, executor="compact")
assert counter.get_total_flops() // 2 == int(model.mac_table((32, 32)).per_image(d).sum())
model.train()
model(x, "straight_through").logits.sum().backward()
print("ok")
"""
    env = {**os.environ, "CC": "false", "SKIPNET_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert not list(tmp_path.glob("ops/*"))  # nothing was built


@needs_kernels
def test_flop_counter_counts_the_gate_kernel_as_the_reference():
    torch.manual_seed(0)
    model = create_model("cifar_resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    counts = []
    for ctx in (ops.reference_only(), torch.no_grad()):
        with torch.no_grad(), ctx, torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            model(x, "greedy", executor="compact")
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1]


@needs_kernels
def test_compact_inference_calls_the_gate_kernel_directly_outside_dispatch_modes():
    """A compact pass steps the RNN gates through the kernel's direct binding (no dispatcher: what batch-1
    latency needs), and through the op under a dispatch mode, so that the mode (here the FLOP counter) sees every
    gate. Both give the reference's decisions and probabilities."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet20").eval()
    runner = CompactRunner(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert runner._stepper(x, "greedy", 0.5, 1.0, None, None, 0.0, True).step_fn is build.direct_gate_step()
        with torch.utils.flop_counter.FlopCounterMode(display=False):
            stepper = runner._stepper(x, "greedy", 0.5, 1.0, None, None, 0.0, True)
        assert stepper.step_fn is torch.ops.skipnet.rnn_gate_step.default
        fast = runner(x, "greedy")
        with ops.reference_only():
            ref = runner(x, "greedy")
    assert torch.equal(fast.decisions, ref.decisions)
    torch.testing.assert_close(fast.probs, ref.probs, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-4, atol=1e-4)
