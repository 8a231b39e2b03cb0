"""Compact inference (skipnet.infer): the runner against the masked executor and the gate modules, its
bookkeeping, its settings and its gate steppers."""

import copy
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from skipnet import create_model, ops
from skipnet.infer import CompactRunner, RunnerConfig, compact_runner
from skipnet.infer.batch import FragmentedBatch
from skipnet.infer.gates import ModuleGates, RNNGates


def _nontrivial(model):
    """Random BN statistics and gate biases spread around 0, so decisions vary and a wrong row would show."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    if model.gates is not None:
        for m in model.gates.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.bias, std=1.0)
    return model


def _random_decisions(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, model.num_gates, generator=g) < 0.5).float()


def _input(name, batch):
    size = 64 if name.startswith("resnet") else 32
    return torch.randn(batch, 3, size, size)


def _stepper(runner, x, mode="greedy", **kw):
    """The gate stepper a pass of ``runner`` over ``x`` would use (without autograd)."""
    with torch.no_grad():
        return runner._stepper(x, mode, kw.get("tau", 0.5), 1.0, None, None, 0.0, True)


@pytest.mark.parametrize("name,batch", [("cifar_resnet20", 1), ("cifar_resnet20", 5), ("cifar_resnet20", 33),
                                        ("resnet18", 2)])
def test_runner_matches_the_module_path(name, batch):
    """Without autograd compact inference steps the RNN gates through skipnet::rnn_gate_step (the kernel at small
    batches, where built) and keeps the batch fragmented; with autograd on the masked forward runs the gate
    modules. Same decisions and MACs, the same probabilities and logits to float rounding, for greedy (several
    thresholds, a temperature), fixed, all and none."""
    torch.manual_seed(0)
    model = _nontrivial(create_model(name)).eval()
    x = _input(name, batch)
    assert isinstance(_stepper(compact_runner(model), x), RNNGates)
    d = _random_decisions(model, batch, 3)
    cases = [dict(mode="greedy", tau=t) for t in (0.3, 0.5, 0.7)] + [
        dict(mode="greedy", temperature=0.5), dict(mode="fixed", decisions=d), dict(mode="all"), dict(mode="none")]
    for kw in cases:
        ref = model(x, **kw)  # autograd on: the module path
        for executor in ("masked", "compact"):
            with torch.no_grad():
                fast = model(x, executor=executor, **kw)
            torch.testing.assert_close(fast.probs, ref.probs.detach(), rtol=0, atol=1e-6)
            assert torch.equal(fast.decisions, ref.decisions), (kw, executor)
            assert torch.equal(fast.macs, ref.macs)
            scale = max(ref.logits.abs().max().item(), 1.0)
            torch.testing.assert_close(fast.logits, ref.logits.detach(), rtol=0, atol=1e-5 * scale)
            assert fast.log_probs is None


def test_runner_reuses_gate_buffers_across_inference_mode_and_no_grad():
    """The RNN gate buffers a pass keeps for the next are inference tensors when made under inference_mode;
    a later pass of the same batch size under no_grad (or the other way round) gets its own, not those."""
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    runner = CompactRunner(model, RunnerConfig(gate_kernel=False, merge_kernel=False))  # the buffers' writes
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        first = runner(x, "greedy")
    with torch.no_grad():
        again = runner(x, "greedy")
    with torch.inference_mode():
        third = runner(x, "greedy")
    for out in (again, third):
        assert torch.equal(out.decisions, first.decisions)
        torch.testing.assert_close(out.logits, first.logits, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["sample", "straight_through"])
def test_runner_takes_every_hard_mode_through_the_gate_modules(mode):
    """Modes that need the logits (sampling: log-probabilities) run the gate modules in image order; the same
    generator gives the masked executor's decisions, and the logits agree."""
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    x = torch.randn(6, 3, 32, 32)
    assert isinstance(_stepper(compact_runner(model), x, mode), ModuleGates)
    with torch.no_grad():
        ref = model(x, mode, generator=torch.Generator().manual_seed(1))
        out = model(x, mode, executor="compact", generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.decisions, ref.decisions)
    assert (out.log_probs is None) == (mode != "sample")
    if mode == "sample":
        torch.testing.assert_close(out.log_probs, ref.log_probs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)


def test_runner_without_the_kernels_matches_it_with_them():
    """``ops.reference_only`` and a RunnerConfig without kernels: every op by its PyTorch reference; the same
    decisions, probabilities to float rounding."""
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = model(x, "greedy", executor="compact")
        with ops.reference_only():
            assert not _stepper(compact_runner(model), x).kernel
            fallback = model(x, "greedy", executor="compact")
        plain = CompactRunner(model, RunnerConfig(gate_kernel=False, merge_kernel=False))(x, "greedy")
    assert not _stepper(CompactRunner(model, RunnerConfig(gate_kernel=False, merge_kernel=False)), x).kernel
    for other in (fallback, plain):
        assert torch.equal(fast.decisions, other.decisions)
        torch.testing.assert_close(fast.probs, other.probs, rtol=0, atol=1e-6)
        torch.testing.assert_close(fast.logits, other.logits)


def test_runner_sees_parameter_changes():
    """The gate op reads the parameters as they are at each step: in-place updates (also through .data),
    replaced storages and non-contiguous parameters all show in the next pass."""
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    x = torch.randn(1, 3, 32, 32)
    proj = model.gates.proj[2]

    def check():
        with torch.no_grad():
            fast = model(x, executor="compact").probs
        torch.testing.assert_close(fast, model(x).probs.detach(), rtol=0, atol=1e-6)

    with torch.no_grad():
        model(x, executor="compact")
        proj.weight.data.mul_(-3.0)  # in place, no version bump
    check()
    with torch.no_grad():
        proj.weight.data = torch.randn_like(proj.weight) * 5  # a new storage
        model.gates.fc.bias.data = model.gates.fc.bias.data + 0.5
    check()
    proj.weight.data = proj.weight.data.t().contiguous().t()  # same values, not contiguous
    check()


def test_runner_with_saturated_gates_and_the_callers_float_mode():
    """Large gate inputs saturate the LSTM (sigmoid ~ 1e-38), whose products go subnormal; the gate kernel
    flushes those to zero (for speed) and must leave the caller's floating-point mode as it found it. The
    probabilities still match the module's, and PyTorch still makes subnormals after a pass."""
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    with torch.no_grad():
        for proj in model.gates.proj:
            proj.weight.mul_(1e4)
    x = torch.randn(3, 3, 32, 32)
    ref = model(x)  # autograd on: the module path
    with torch.no_grad():
        fast = model(x, executor="compact")
        again = model(x, executor="compact")  # a second pass reuses the first pass's gate buffers
    with torch.no_grad():  # the first gate's LSTM input: large enough to saturate the cell's sigmoids
        h = model.blocks[0](model.maxpool(model.relu(model.bn1(model.conv1(x)))))
        assert model.gates.proj[0](h.mean((2, 3))).abs().max() > 100
    for out in (fast, again):
        torch.testing.assert_close(out.probs, ref.probs.detach(), rtol=0, atol=1e-6)
        assert torch.equal(out.decisions, ref.decisions)
    tiny = torch.tensor([1e-38]) / 16
    assert 0.0 < tiny.item() < 1e-38  # not flushed: the kernel restored the mode


def test_runner_takes_fixed_decisions_that_require_grad():
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    x = torch.randn(3, 3, 32, 32)
    d = _random_decisions(model, 3, 0).requires_grad_()
    with torch.no_grad():
        out = model(x, "fixed", decisions=d, executor="compact")
    assert torch.equal(out.decisions, d.detach())


@pytest.mark.parametrize("batch", [1, 2])
def test_results_belong_to_their_pass(batch):
    """Each pass's probabilities and decisions are new tensors, which the caller keeps: the next pass (the same
    gate buffers, other images) leaves them alone."""
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    x1, x2 = torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32)
    ref = model(x1, executor="compact")  # autograd on: the gate modules
    with torch.no_grad():
        a = model(x1, executor="compact")
        b = model(x2, executor="compact")
    torch.testing.assert_close(a.probs, ref.probs.detach(), rtol=0, atol=1e-6)
    assert torch.equal(a.decisions, ref.decisions) and not torch.equal(a.probs, b.probs)


def test_runner_from_several_threads():
    """Threads running one model share its runner's gate buffers: each pass gets its own."""
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    xs = [torch.randn(b, 3, 32, 32) for b in (1, 2, 1, 2, 1, 2, 1, 2)]
    with torch.no_grad():
        ref = [model(x, executor="compact") for x in xs]

    def run(x):
        with torch.no_grad():
            return [model(x, executor="compact") for _ in range(5)]

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(run, xs))
    for r, many in zip(ref, outs):
        for o in many:
            assert torch.equal(o.decisions, r.decisions)
            torch.testing.assert_close(o.probs, r.probs, rtol=0, atol=1e-6)
            torch.testing.assert_close(o.logits, r.logits, rtol=1e-5, atol=1e-5)


def test_runner_takes_channels_last():
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    clone = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for batch in (3, 9):
        x = torch.randn(batch, 3, 32, 32)
        d = _random_decisions(model, batch, 1)
        for kw in (dict(mode="greedy"), dict(mode="fixed", decisions=d)):
            with torch.no_grad():
                ref = model(x, executor="compact", **kw)
                cl = clone(x.to(memory_format=torch.channels_last), executor="compact", **kw)
            assert torch.equal(ref.decisions, cl.decisions)
            torch.testing.assert_close(ref.logits, cl.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("executed", [39, 37, 20])
def test_compact_crossover_equals_masked(executed):
    """When nearly every image runs a block, compact execution runs it on the whole batch and restores the
    skipped images (RunnerConfig.crossover); below, it gathers the running images. Both equal masked
    execution, in the fragmented bookkeeping (no autograd) and the ordered one (autograd)."""
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    runner = compact_runner(model)
    cfg = runner.config
    batch = 40
    # 39 of 40 cross over at every width, 37 only in the 16-channel stage, 20 nowhere
    assert cfg.crossover(16) * batch < 37 < cfg.crossover(32) * batch < cfg.crossover(64) * batch < 39
    x = torch.randn(batch, 3, 32, 32)
    d = torch.ones(batch, model.num_gates)
    for i in range(model.num_gates):  # a different set of skipped images per gate
        d[torch.randperm(batch)[: batch - executed], i] = 0
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            masked = model(x, "fixed", decisions=d, executor="masked")
            compact = model(x, "fixed", decisions=d, executor="compact")
        scale = max(masked.logits.abs().max().item(), 1.0)
        torch.testing.assert_close(compact.logits, masked.logits, rtol=0, atol=1e-5 * scale)
    block = model.blocks[1]
    xb = torch.randn(batch, 16, 32, 32)
    with torch.no_grad():
        out = runner.run_rows(block, xb.clone(), torch.arange(executed), executed)
        ref = model.blocks[1](xb)
        ref[executed:] = xb[executed:]
    torch.testing.assert_close(out, ref)


def test_runner_config_moves_the_crossover():
    """The crossover is the runner's setting: a copy cost of 0 never crosses over, a huge one always does; the
    results stay those of the masked executor."""
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    x = torch.randn(12, 3, 32, 32)
    d = _random_decisions(model, 12, 4)
    with torch.no_grad():
        ref = model(x, "fixed", decisions=d)
        for cost in (0.0, 1e6):
            cfg = RunnerConfig(copy_cost=cost)
            assert cfg.crossover(16) == (1.0 if cost == 0 else pytest.approx(0.0, abs=1e-4))
            out = CompactRunner(model, cfg)(x, "fixed", decisions=d)
            torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)


def test_fragmented_batch_tracks_every_image():
    """The compact inference loop's bookkeeping: after any sequence of partial updates every image's
    activation is found, gathered once, and the whole batch comes back with the right image per row."""
    rng = np.random.default_rng(0)
    batch = 12
    ref = torch.randn(batch, 2, 3, 3)
    state = FragmentedBatch(ref.clone())
    for step in range(40):
        idx = np.flatnonzero(rng.random(batch) < rng.choice([0.1, 0.5, 0.9, 1.0]))
        if len(idx) == 0:
            continue
        sub, images = state.gather(idx)
        assert sorted(images.tolist()) == idx.tolist()
        torch.testing.assert_close(sub, ref[torch.from_numpy(images)], rtol=0, atol=0)
        new = sub * 2 + step
        ref[torch.from_numpy(images)] = new
        state.push(new, images)
        assert sum(f is not None for f in state.frags) <= batch + 1
        if step % 7 == 0:
            whole, perm = state.whole()
            order = torch.arange(batch) if perm is None else torch.from_numpy(perm)
            torch.testing.assert_close(whole, ref[order], rtol=0, atol=0)


def test_runner_is_not_copied_or_pickled_with_the_model():
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, executor="compact")
        assert "_compact_runner" in model.__dict__
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
            assert "_compact_runner" not in clone.__dict__
            out = clone(x, executor="compact")
            torch.testing.assert_close(out.probs, ref.probs)
            assert torch.equal(out.decisions, ref.decisions)
            assert compact_runner(clone).model is clone


def test_runner_without_gates():
    """``gates=False``: the fixed decisions' blocks run, no gate is computed (probabilities NaN) -- what the
    gates' share of the latency is measured with; only with fixed decisions."""
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14")).eval()
    x = torch.randn(3, 3, 32, 32)
    d = _random_decisions(model, 3, 2)
    runner = CompactRunner(model)
    with torch.no_grad():
        ref = model(x, "fixed", decisions=d, executor="compact")
        out = runner(x, "fixed", decisions=d, gates=False)
        with pytest.raises(ValueError, match="gates=False needs mode 'fixed'"):
            runner(x, "greedy", gates=False)
    torch.testing.assert_close(out.logits, ref.logits)
    assert torch.equal(out.decisions, ref.decisions) and torch.equal(out.macs, ref.macs)
    assert torch.isnan(out.probs).all()


def test_plain_network_runs_through_the_runner():
    """A plain network's compact pass runs every block with the inference merge: the module forward's logits."""
    torch.manual_seed(0)
    model = _nontrivial(create_model("cifar_resnet14", gate="none")).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model(x, executor="compact")
    torch.testing.assert_close(out.logits, ref.logits)
    assert torch.equal(out.macs, ref.macs) and out.probs is None
    model.train()
    model(x, executor="compact")  # a plain network in training takes the module forward
    with pytest.raises(ValueError, match="eval"):
        CompactRunner(model)(x)
