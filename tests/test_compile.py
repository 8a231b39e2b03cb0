"""The network under torch.compile and torch.export: compiled passes equal eager ones, and the eval graph with
fixed decisions exports. The aot_eager backend (Dynamo, AOTAutograd, the ops' fake implementations and
autograd formula; no code generation) needs no compiler; Inductor is tried on the merge where one works."""

import copy

import pytest
import torch

from skipnet import create_model, ops
from skipnet.ops import build


def _model(name="cifar_resnet8"):
    """A SkipNet with seeded, non-trivial BatchNorm statistics and gate biases (so that decisions vary)."""
    torch.manual_seed(0)
    model = create_model(name)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    for m in model.gates.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.bias, std=1.0)
    return model


def _train_step(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x, "straight_through")
    loss = torch.nn.functional.cross_entropy(out.logits, y) + out.probs.mean()
    loss.backward()
    return out, [p.grad.clone() for p in model.parameters()]


def test_compiled_masked_training_step_equals_eager():
    """A straight-through training step (the merge op with its autograd formula where the kernel is built)
    compiled with torch.compile gives eager's logits, decisions and gradients."""
    model = _model().train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    eager_out, eager_grads = _train_step(model, x, y)
    out, grads = _train_step(compiled, x, y)
    assert torch.equal(out.decisions, eager_out.decisions)
    torch.testing.assert_close(out.logits, eager_out.logits)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["greedy", "fixed"])
def test_compiled_compact_eval_equals_eager(mode):
    """Compact inference under torch.compile: the routing is data-dependent host logic, so the runner runs
    eagerly inside the compiled forward (a graph break); the result is eager's."""
    model = _model().eval()
    x = torch.randn(5, 3, 32, 32)
    d = (torch.rand(5, model.num_gates, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    kw = {"decisions": d} if mode == "fixed" else {}
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        ref = model(x, mode, executor="compact", **kw)
        out = compiled(x, mode, executor="compact", **kw)
        masked = compiled(x, mode, **kw)
    for o in (out, masked):
        assert torch.equal(o.decisions, ref.decisions) and torch.equal(o.macs, ref.macs)
        torch.testing.assert_close(o.logits, ref.logits, rtol=0, atol=1e-5)


class _FixedEval(torch.nn.Module):
    """The eval network as a function of images and fixed decisions (B, N): logits and per-image MACs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, decisions):
        out = self.model(x, "fixed", decisions=decisions)
        return out.logits, out.macs


def test_export_of_the_eval_graph_with_fixed_decisions():
    """torch.export of the eval network with the decisions as an input (the masked executor: one static graph;
    compact execution is data-dependent and does not export): the exported program gives eager's logits and
    MACs for other images and other decisions, with and without autograd at export time."""
    model = _model().eval()
    n = model.num_gates
    g = torch.Generator().manual_seed(1)
    x, d = torch.randn(4, 3, 32, 32), (torch.rand(4, n, generator=g) < 0.5).float()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            program = torch.export.export(_FixedEval(model), (x, d))
        x2, d2 = torch.randn(4, 3, 32, 32, generator=g), (torch.rand(4, n, generator=g) < 0.5).float()
        with torch.no_grad():
            logits, macs = program.module()(x2, d2)
            ref = model(x2, "fixed", decisions=d2)
        torch.testing.assert_close(logits, ref.logits)
        assert torch.equal(macs, ref.macs)


@pytest.mark.skipif(not build.compiler_available(), reason="Inductor generates C++: needs a compiler")
def test_inductor_compiles_around_the_merge_op():
    """Inductor treats the merge op as an external kernel, in the forward and in the backward graph."""

    def f(r, s, g):
        return (ops.gated_merge(r * 2, s, g) * 3).sum()

    torch.manual_seed(0)
    r, s = torch.randn(4, 8, 5, 5, requires_grad=True), torch.randn(4, 8, 5, 5, requires_grad=True)
    g = torch.tensor([1.0, 0.0, 1.0, 1.0], requires_grad=True)
    ref = torch.autograd.grad(f(r, s, g), (r, s, g))
    compiled = torch.compile(f, backend="inductor")
    got = torch.autograd.grad(compiled(r, s, g), (r, s, g))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
