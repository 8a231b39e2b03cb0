"""The core library: presets, gates, decision modes, executors, compute accounting, torchvision loading."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import skipnet
from skipnet import computation_percentage, create_model, from_torchvision, list_models
from skipnet.models import GATE_TYPES, decide

CIFAR = [n for n in list_models() if n.startswith("cifar_")]
IMAGENET = [n for n in list_models() if not n.startswith("cifar_")]
GATES = list(GATE_TYPES)


def _input(name, batch=2, **kw):
    size = 64 if name in IMAGENET else 32
    ch = kw.get("in_channels", 3)
    return torch.randn(batch, ch, size, size)


# FF gates on the deep bottleneck networks hold a C x C 3x3 conv per block (up to 2048 channels): seconds of
# initialisation each, and the paper only uses RNN gates on ImageNet. They are covered on resnet18/50.
PRESET_GATES = [(n, g) for n in CIFAR + IMAGENET for g in GATES if not (n in ("resnet101", "resnet152") and g != "rnn")]


def _random_decisions(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, model.num_gates, generator=g) < 0.5).float()


@pytest.mark.parametrize("name,gate", PRESET_GATES + [(n, "none") for n in CIFAR + IMAGENET])
def test_output_shapes_every_preset_and_gate(name, gate):
    torch.manual_seed(0)
    model = create_model(name, gate=gate, num_classes=7)
    x = _input(name, batch=2)
    for training in (True, False):
        model.train(training)
        out = model(x)
        n = model.num_gates
        assert out.logits.shape == (2, 7) and torch.isfinite(out.logits).all()
        assert out.decisions.shape == (2, n)
        assert out.macs.shape == (2,)
        if gate == "none":
            assert out.probs is None
            plain = float(model.mac_table(x.shape[2:]).plain)
            assert out.macs.tolist() == [plain, plain]
        else:
            assert out.probs.shape == (2, n) and ((out.probs >= 0) & (out.probs <= 1)).all()


@pytest.mark.parametrize(
    "name,gates", [("cifar_resnet38", 17), ("cifar_resnet74", 35), ("cifar_resnet110", 53), ("cifar_resnet152", 74),
                   ("resnet34", 15), ("resnet50", 15), ("resnet101", 32)]
)
def test_number_of_gates_matches_spec(name, gates):
    assert create_model(name).num_gates == gates


def test_grey_28x28_input_works():
    model = create_model("cifar_resnet20", in_channels=1, num_classes=10).eval()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.logits.shape == (3, 10)


def _ce_backward(model, mode, extra_log_prob=False):
    model.zero_grad(set_to_none=True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = model(x, mode)
    loss = F.cross_entropy(out.logits, y)
    if extra_log_prob:
        loss = loss + out.log_probs.sum()
    loss.backward()
    return [(n, p.grad) for n, p in model.named_parameters() if n.startswith("gates.")]


@pytest.mark.parametrize("gate", GATES)
def test_every_parameter_gets_gradient_in_straight_through(gate):
    torch.manual_seed(0)
    model = create_model("cifar_resnet14", gate=gate).train()
    _ce_backward(model, "straight_through")
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("gates."))


@pytest.mark.parametrize("gate", GATES)
def test_sample_mode_gradient_reaches_gates_only_through_log_probs(gate):
    torch.manual_seed(0)
    model = create_model("cifar_resnet14", gate=gate).train()
    grads = _ce_backward(model, "sample")
    assert all(g is None or g.abs().sum() == 0 for _, g in grads), "CE alone must not reach the gates"
    grads = _ce_backward(model, "sample", extra_log_prob=True)
    assert all(g is not None for _, g in grads)
    assert any(g.abs().sum() > 0 for _, g in grads)


@pytest.mark.parametrize("gate", GATES)
def test_greedy_mode_gives_gates_no_gradient(gate):
    torch.manual_seed(0)
    model = create_model("cifar_resnet14", gate=gate).train()
    grads = _ce_backward(model, "greedy")
    assert all(g is None or g.abs().sum() == 0 for _, g in grads)


@pytest.mark.parametrize("gate", GATES)
def test_backbone_grad_false_gives_the_same_pass_with_gradients_for_the_gates_only(gate):
    # backbone_grad=False: the same logits, probabilities and sampled decisions, but the stem, blocks and head
    # record no autograd -- the log-probabilities' gradient reaches the gates' parameters and nothing else.
    torch.manual_seed(0)
    model = create_model("cifar_resnet14", gate=gate).train()
    x = torch.randn(8, 3, 32, 32)
    ref = model(x, "sample", generator=torch.Generator().manual_seed(3))
    out = model(x, "sample", generator=torch.Generator().manual_seed(3), backbone_grad=False)
    for a, b in [(ref.logits, out.logits), (ref.probs, out.probs), (ref.decisions, out.decisions)]:
        torch.testing.assert_close(a, b)
    assert not out.logits.requires_grad
    out.log_probs.sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("gates."):
            assert p.grad is not None, name
        else:
            assert p.grad is None, f"{name} got a gradient"
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("gates."))


def test_log_probs_match_torch_bernoulli():
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", gate="rnn").train()
    out = model(torch.randn(8, 3, 32, 32), "sample")
    expected = torch.distributions.Bernoulli(probs=out.probs).log_prob(out.decisions)
    torch.testing.assert_close(out.log_probs, expected, rtol=1e-5, atol=1e-6)
    logits = torch.linspace(-30, 30, 61)
    g, lp = decide(logits, "sample", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(lp, torch.distributions.Bernoulli(logits=logits).log_prob(g))


def test_decision_modes_values():
    logits = torch.tensor([-2.0, -0.1, 0.0, 0.3, 3.0], requires_grad=True)
    p = torch.sigmoid(logits)
    st, _ = decide(logits, "straight_through")
    assert st.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    st.sum().backward()
    torch.testing.assert_close(logits.grad, p * (1 - p))  # d sigmoid / d logit
    soft, _ = decide(logits, "soft")
    torch.testing.assert_close(soft, p)
    greedy, _ = decide(logits, "greedy", tau=0.6)
    assert greedy.tolist() == (p >= 0.6).float().tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert decide(logits, "all")[0].tolist() == [1.0] * 5
    assert decide(logits, "none")[0].tolist() == [0.0] * 5
    fixed = torch.tensor([1, 0, 1, 0, 1])
    assert decide(logits, "fixed", fixed=fixed)[0].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="unknown decision mode"):
        decide(logits, "bogus")
    torch.manual_seed(0)
    samples = torch.stack([decide(torch.full((1000,), 1.0), "sample")[0] for _ in range(5)])
    assert abs(samples.mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02

    # gumbel: hard samples of Bernoulli(p) forward (reproducible from the generator), the gradient of the
    # relaxed sample sigmoid(logit + noise) backward: positive, and at most p(1-p)'s peak 1/4
    many = torch.tensor([-2.0, 0.0, 1.0]).repeat_interleave(20000).requires_grad_()
    g, lp = decide(many, "gumbel", generator=torch.Generator().manual_seed(3))
    assert lp is None and set(g.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(g.view(3, -1).mean(1), torch.sigmoid(torch.tensor([-2.0, 0.0, 1.0])), atol=0.01,
                               rtol=0)
    again, _ = decide(many, "gumbel", generator=torch.Generator().manual_seed(3))
    assert torch.equal(g, again)
    g.sum().backward()
    assert (many.grad > 0).all() and (many.grad <= 0.25).all()


def test_threshold_trades_compute():
    torch.manual_seed(0)
    model = create_model("cifar_resnet20").eval()
    x = torch.randn(6, 3, 32, 32)
    assert model(x, "greedy", tau=0.0).decisions.mean() == 1.0
    assert model(x, "greedy", tau=1.0).decisions.mean() == 0.0
    macs = [model(x, "greedy", tau=t).macs.mean().item() for t in (0.0, 0.3, 0.5, 0.7, 1.0)]
    assert macs == sorted(macs, reverse=True)


# --- compute accounting -------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth,conv_macs", [(38, 0.8328e8), (74, 1.6821e8), (110, 2.5315e8), (152, 3.5224e8)])
def test_reference_conv_macs(depth, conv_macs):
    table = create_model(f"cifar_resnet{depth}", gate="none").mac_table((32, 32))
    assert abs(table.conv_plain - conv_macs) / conv_macs < 5e-5


def test_block_and_gate_costs_match_spec():
    table = create_model("cifar_resnet38", gate="ffgate1").mac_table((32, 32))
    assert table.block_full[0] == 4_718_592  # one 16-channel basic block (SPEC: 4.7186e6)
    assert table.gates[0] / table.block_full[0] == pytest.approx(0.15625, rel=1e-4)  # FFGate-I (+ the linear)
    table2 = create_model("cifar_resnet38", gate="ffgate2").mac_table((32, 32))
    assert table2.gates[0] / table2.block_full[0] == pytest.approx(0.125, rel=1e-4)  # FFGate-II
    rnn = create_model("cifar_resnet38", gate="rnn").mac_table((32, 32))
    assert rnn.gates[0] == 16 * 10 + 4 * 10 * (10 + 10) + 10  # proj + LSTM + output layer
    assert max(rnn.gates) / table.block_full[0] < 0.0004  # ~0.03% of a block


@pytest.mark.parametrize("name,expected", [("resnet34", 3.6e9), ("resnet50", 4.1e9), ("resnet101", 7.8e9)])
def test_imagenet_reference_macs(name, expected):
    table = create_model(name, gate="none").mac_table((224, 224))
    assert abs(table.plain - expected) / expected < 0.03


def _flops(model, x, **kw):
    with FlopCounterMode(display=False) as counter:
        model(x, **kw)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name,gate", [("cifar_resnet20", "rnn"), ("cifar_resnet14", "ffgate1"),
                                       ("cifar_resnet14", "ffgate2"), ("cifar_resnet38", "none"), ("resnet18", "rnn"),
                                       ("resnet50", "ffgate2")])
def test_mac_table_matches_flop_counter(name, gate):
    torch.manual_seed(0)
    model = create_model(name, gate=gate).eval()
    x = _input(name, batch=1)
    table = model.mac_table(x.shape[2:])
    with torch.no_grad():
        dense = _flops(model, x, mode="all") if gate != "none" else _flops(model, x)
        assert dense == (table.dense if gate != "none" else table.plain)
        if gate == "none":
            return
        # Fixed decisions with the compact executor: skipped blocks are not run, so the counter sees the cost.
        for seed in range(3):
            d = _random_decisions(model, 1, seed)
            out = model(x, "fixed", decisions=d, executor="compact")
            assert _flops(model, x, mode="fixed", decisions=d, executor="compact") == int(out.macs.item())
        # A batch: the counter's total equals the sum of per-image MACs.
        xb = _input(name, batch=4)
        d = _random_decisions(model, 4, 7)
        out = model(xb, "fixed", decisions=d, executor="compact")
        assert _flops(model, xb, mode="fixed", decisions=d, executor="compact") == int(out.macs.sum().item())


def test_per_image_macs_and_computation_percentage_by_hand():
    model = create_model("cifar_resnet14", gate="rnn").eval()  # 6 blocks, 5 gates
    t = model.mac_table((32, 32))
    d = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]], dtype=torch.float32)
    out = model(torch.randn(3, 3, 32, 32), "fixed", decisions=d)
    always = t.stem + t.first_block + sum(t.gates) + t.head
    assert out.macs.tolist() == [
        always + sum(t.block_full),
        always + sum(t.block_skip),
        always + t.block_full[0] + t.block_skip[1] + t.block_full[2] + t.block_skip[3] + t.block_skip[4],
    ]
    assert t.block_skip[1] > 0 and t.block_skip[0] == 0  # gate 1 guards stage 2's transition block
    # rates per gate: 2/3, 1/3, 2/3, 1/3, 1/3 -> (1 + 7/3) / 6
    assert computation_percentage(out.decisions) == pytest.approx((1 + 7 / 3) / 6)
    # The same numbers whatever the decisions' dtype and layout (a NumPy product on the CPU for some dtypes,
    # PyTorch's for the others), and for expected MACs of fractional decisions.
    for dd in (d.double(), d.bool(), d.to(torch.uint8), d.half(), d.bfloat16(), d.clone().requires_grad_(),
               d.t().contiguous().t()):
        assert t.per_image(dd).dtype == torch.float64
        assert torch.equal(t.per_image(dd), out.macs)
    assert torch.equal(t.per_image(d[2:].expand(3, -1)), out.macs[2:].expand(3))
    frac = torch.full((2, 5), 0.5)
    assert torch.allclose(t.per_image(frac), torch.tensor([always + sum(t.block_skip) + 0.5 * (
        sum(t.block_full) - sum(t.block_skip))] * 2, dtype=torch.float64))


# --- executors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,gate", PRESET_GATES)
def test_compact_equals_masked_in_eval(name, gate):
    torch.manual_seed(0)
    model = create_model(name, gate=gate).eval()
    # Non-trivial BatchNorm statistics so that a wrong scatter would show.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    for batch in (1, 5):
        x = _input(name, batch=batch)
        cases = [("fixed", _random_decisions(model, batch, batch)), ("fixed", torch.ones(model.num_gates)),
                 ("fixed", torch.zeros(model.num_gates)), ("greedy", None)]
        with torch.no_grad():
            for mode, d in cases:
                masked = model(x, mode, decisions=d, executor="masked")
                compact = model(x, mode, decisions=d, executor="compact")
                # Deep random-init networks reach logits of ~1e2: compare relative to their scale.
                scale = masked.logits.abs().max().item()
                torch.testing.assert_close(compact.logits, masked.logits, rtol=0, atol=1e-5 * max(scale, 1.0))
                assert torch.equal(compact.decisions, masked.decisions)
                assert torch.equal(compact.macs, masked.macs)


def test_compact_does_not_modify_caller_input_and_refuses_decisions_with_gradient():
    model = create_model("cifar_resnet14").eval()
    x = torch.randn(3, 3, 32, 32)
    x0 = x.clone()
    model(x, "fixed", decisions=torch.tensor([1.0, 0, 1, 0, 1]), executor="compact")
    assert torch.equal(x, x0)
    model.train()
    model(x, "greedy", executor="compact")  # training: decisions without gradient run compact
    assert torch.equal(x, x0)
    for mode in ("straight_through", "gumbel"):  # these train the gates through the mask
        with pytest.raises(ValueError, match="without gradient"):
            model(x, mode, executor="compact")
    model.eval()
    with pytest.raises(ValueError, match="soft"):
        model(x, "soft", executor="compact")
    with pytest.raises(ValueError, match="unknown executor"):
        model(x, "greedy", executor="fast")


@pytest.mark.parametrize("mode", ["fixed", "greedy", "sample"])
def test_compact_training_equals_masked_with_running_batchnorm_statistics(mode):
    # In training the compact executor (ours, for HRL's passes) runs each block on the images that take it, with
    # autograd. With BatchNorm on its running statistics (eval-mode BN) it must give the masked executor's
    # outputs, decisions and gradients -- a wrong gather, scatter or shortcut shows here.
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", gate="rnn", in_channels=1).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.gates.fc.bias.data.fill_(0.0)  # (graded gates: greedy and sampled paths skip some blocks)
    x = torch.randn(6, 1, 28, 28)
    d = _random_decisions(model, 6) if mode == "fixed" else None
    outs, grads = {}, {}
    for ex in ("masked", "compact"):
        model.zero_grad()
        out = model(x, mode, decisions=d, executor=ex, generator=torch.Generator().manual_seed(3))
        loss = out.logits.square().sum() + (out.log_probs.sum() if out.log_probs is not None else 0)
        loss.backward()
        outs[ex], grads[ex] = out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert 0 < outs["compact"].decisions.mean() < 1
    assert torch.equal(outs["compact"].decisions, outs["masked"].decisions)
    torch.testing.assert_close(outs["compact"].logits, outs["masked"].logits, rtol=1e-5, atol=1e-5)
    for n, want in grads["masked"].items():  # a block no image ran has no gradient in compact, zero in masked
        got = grads["compact"].get(n, torch.zeros_like(want))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=n)


def test_compact_training_normalises_by_the_images_that_run_the_block():
    # With live BatchNorm the compact executor's residual branch sees only the images whose gate fired: their
    # outputs and the running statistics are those of the block run on that subset alone, the others get the
    # shortcut (a projection's BatchNorm sees every image). The masked executor mixes in the skipping images.
    from skipnet.models.executors import run_compact, run_masked

    torch.manual_seed(0)
    block = create_model("cifar_resnet20").blocks[3].train()  # stage 2's first block: a projection shortcut
    x = torch.randn(8, 16, 16, 16)
    g = torch.tensor([1.0, 0, 0, 1, 1, 0, 1, 0])
    run = g.bool()
    alone, masked = copy.deepcopy(block), copy.deepcopy(block)
    out = run_compact(block, x, g)
    shortcut = alone.downsample(x)  # every image through the projection ...
    want = alone.merge(alone.residual(x[run]), shortcut[run])  # ... the residual branch on the four alone
    torch.testing.assert_close(out[run], want)
    torch.testing.assert_close(out[~run], shortcut[~run])
    for (name, b), b_alone in zip(block.named_buffers(), alone.buffers()):
        torch.testing.assert_close(b, b_alone, msg=name)
    run_masked(masked, x, g)
    assert not torch.allclose(masked.bn1.running_mean, block.bn1.running_mean)
    # none or every image: the shortcut alone, or the block
    torch.testing.assert_close(run_compact(block, x, torch.zeros(8)), block.downsample(x))
    torch.testing.assert_close(run_compact(block.eval(), x, torch.ones(8)), block(x))


def test_all_gates_on_equals_plain_network_with_same_weights():
    torch.manual_seed(0)
    gated = create_model("cifar_resnet20", gate="rnn").eval()
    plain = create_model("cifar_resnet20", gate="none").eval()
    missing = plain.load_state_dict(gated.state_dict(), strict=False)
    assert not missing.missing_keys and all(k.startswith("gates.") for k in missing.unexpected_keys)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gated(x, "all").logits, plain(x).logits)
        torch.testing.assert_close(gated(x, "fixed", decisions=torch.ones(gated.num_gates)).logits, plain(x).logits)


def test_model_is_reentrant():
    torch.manual_seed(0)
    model = create_model("cifar_resnet14", gate="rnn").eval()
    a, b = torch.randn(2, 3, 32, 32), torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ra, rb = model(a).logits, model(b).logits
        model(b)  # an interleaved call must not leak state into the next
        torch.testing.assert_close(model(a).logits, ra)
        torch.testing.assert_close(model(torch.cat([a, b])).logits, torch.cat([ra, rb]), rtol=1e-4, atol=1e-5)


# --- torchvision --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_torchvision_weights_load(depth):
    torch.manual_seed(depth)
    tv = getattr(torchvision.models, f"resnet{depth}")(num_classes=20).eval()
    for m in tv.modules():  # make BN non-trivial so a misplaced tensor would change the output
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.weight.data.uniform_(0.5, 1.5)
    model = from_torchvision(tv, gate="rnn").eval()
    assert model.config.depth == depth and model.config.num_classes == 20
    own = model.state_dict()
    for key, value in tv.state_dict().items():
        assert torch.equal(own[key], value), key
    if depth <= 50:
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x, "all").logits, tv(x), rtol=1e-4, atol=1e-4)


def test_from_torchvision_rejects_other_models():
    with pytest.raises(ValueError, match="torchvision ResNet"):
        from_torchvision(torch.nn.Linear(2, 2))


# --- errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(2, 1, 32, 32), "got 1 channels"),
        (torch.randn(3, 32, 32), "3-D tensor"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "dtype torch.uint8"),
        (torch.randn(0, 3, 32, 32), "empty batch"),
        (torch.randn(2, 3, 2, 2), "too small"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(x, match):
    model = create_model("cifar_resnet8")
    with pytest.raises(ValueError, match=match) as err:
        model(x)
    assert "expected" in str(err.value)


def test_bad_configs_and_names():
    with pytest.raises(ValueError, match="6n\\+2"):
        create_model("cifar_resnet8", depth=9)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("cifar_resnet9")
    with pytest.raises(ValueError, match="unknown gate"):
        create_model("cifar_resnet8", gate="lstm")
    with pytest.raises(ValueError, match="unknown model option"):
        create_model("cifar_resnet8", width=3)
    model = create_model("cifar_resnet8")
    with pytest.raises(ValueError, match="fixed decisions"):
        model(torch.randn(2, 3, 32, 32), "fixed", decisions=torch.ones(3, 2))
    with pytest.raises(ValueError, match="needs decisions"):
        model(torch.randn(2, 3, 32, 32), "fixed")
    ffg = create_model("resnet18", gate="ffgate1")
    with pytest.raises(ValueError, match="FFGate-I"):
        ffg(torch.randn(1, 3, 40, 40))


def test_model_config_refuses_sizes_that_are_not_positive_integers():
    for key, value in (("num_classes", 2.5), ("num_classes", "3"), ("in_channels", 0), ("embed_dim", True),
                       ("hidden_dim", None), ("depth", 20.0)):
        with pytest.raises(ValueError, match=f"{key} must be a positive integer; got {value!r}"):
            create_model("cifar_resnet8", **{key: value})


@pytest.mark.parametrize("executor", ["masked", "compact"])
def test_fixed_decisions_must_be_zero_or_one(executor):
    """2 ran a block "twice" (MACs above the dense network's, masked != compact), -1 gave negative MACs, NaN
    NaN MACs, 0.5 half a block in masked and none in compact: all refused, naming what came. 0/1 as bool,
    integer or float is the contract, (B, N) or (N,)."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet8").eval()
    x = torch.randn(3, 3, 32, 32)
    n = model.num_gates
    with torch.inference_mode():
        for bad, shown in ((2.0, "2.0"), (-1.0, "-1.0"), (float("nan"), "nan"), (0.5, "0.5")):
            d = torch.ones(3, n)
            d[1, 0] = bad
            with pytest.raises(ValueError, match=f"values 0 or 1; got 1 other value\\(s\\): {shown}"):
                model(x, "fixed", decisions=d, executor=executor)
        with pytest.raises(ValueError, match=f"shape \\(3, {n}\\) or \\({n},\\).*got shape \\(2, {n}\\)"):
            model(x, "fixed", decisions=torch.ones(2, n), executor=executor)
        ref = model(x, "fixed", decisions=torch.tensor([1.0, 0.0]).expand(3, -1), executor="masked")
        for d in (torch.tensor([True, False]), torch.tensor([1, 0]), [1.0, 0.0], torch.tensor([[1.0, 0.0]] * 3)):
            out = model(x, "fixed", decisions=d, executor=executor)
            assert out.decisions.tolist() == [[1.0, 0.0]] * 3 and torch.equal(out.macs, ref.macs)
            torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    assert ref.macs.max() <= model.mac_table((32, 32)).dense


def test_input_dtype_must_match_the_model():
    """A float64 or float16 batch into a float32 network was torch's "expected scalar type Double but found
    Float"; now a ValueError naming both dtypes. A network converted to the batch's dtype runs, masked and
    compact alike, off the float32-only C kernels (which check the dtype), with the float32 network's
    decisions; under autocast a float32 batch stays fine."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet8").eval()
    x = torch.randn(4, 3, 32, 32)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match=f"model's dtype torch.float32; got {dtype}"):
            model(x.to(dtype))
    with torch.inference_mode():
        ref = model(x, "greedy", executor="compact")
        for dtype, atol in ((torch.float64, 1e-5), (torch.float16, 2e-2)):
            other = copy.deepcopy(model).to(dtype)
            outs = [other(x.to(dtype), "greedy", executor=ex) for ex in ("masked", "compact")]
            for out in outs:
                assert out.logits.dtype == dtype and torch.equal(out.decisions.float(), ref.decisions)
                torch.testing.assert_close(out.logits.float(), ref.logits, rtol=0, atol=atol)
                assert torch.equal(out.macs, ref.macs)
            torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=0, atol=atol)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x, "greedy", executor="compact").logits.dtype == torch.bfloat16


def test_config_rebuilds_the_network():
    model = create_model("cifar_resnet20", gate="ffgate2", num_classes=3, in_channels=1)
    clone = skipnet.SkipResNet(skipnet.SkipNetConfig(**model.config.to_dict()))
    clone.load_state_dict(model.state_dict())  # strict: same keys and shapes


def test_layout_sets_the_blocks_per_stage():
    # The block set SkipNet-20's policies keep on Fashion-MNIST (1/2/3), as a plain network of ResNet-14's size.
    model = create_model("cifar_resnet14", gate="rnn", layout=[1, 2, 3])  # a list (YAML, JSON) is accepted
    assert model.config.layout == (1, 2, 3)
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [1, 2, 3]
    assert model.stage_of_block == (0, 1, 1, 2, 2, 2) and model.num_gates == 5
    # Two transition blocks either way, every other block costs the same: 1/2/3 costs what 2/2/2 does (the gates
    # differ, by the width of their inputs).
    assert model.mac_table((32, 32)).plain == create_model("cifar_resnet14", gate="none").mac_table((32, 32)).plain
    with torch.no_grad():
        assert _flops(model.eval(), torch.randn(1, 3, 32, 32), mode="all") == model.mac_table((32, 32)).dense
    clone = skipnet.SkipResNet(skipnet.SkipNetConfig(**model.config.to_dict()))
    clone.load_state_dict(model.state_dict())
    odd = skipnet.SkipResNet(skipnet.SkipNetConfig(depth=16, gate="none", layout=(2, 2, 3)))  # no preset is 16 deep
    assert len(odd.blocks) == 7
    for layout, match in (([1, 2], "3 stages"), ([0, 3, 3], "at least 1"), (3, "e.g."), ([1, 2, 4], "depth of 16")):
        with pytest.raises(ValueError, match=match):
            create_model("cifar_resnet14", layout=layout)
    with pytest.raises(ValueError, match="CIFAR-style"):
        create_model("resnet18", layout=[1, 1, 1])


# --- gates ---------------------------------------------------------------------------------------------------

def test_gate_pool_gradient_is_the_mean_gradient():
    from skipnet.models.gates import global_mean_pool

    x = torch.randn(3, 4, 5, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(global_mean_pool, (x,))
    torch.testing.assert_close(global_mean_pool(x), x.mean((2, 3)))


def test_drop_rate_skips_blocks_at_random_in_straight_through_training():
    """Stochastic depth on the gated blocks: about drop_rate of the (image, block) pairs skip even with every
    gate open, drawn from the generator (same seed, same skips); the gates still get gradients; other modes
    refuse it."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet20").train()
    with torch.no_grad():
        model.gates.fc.bias.fill_(5.0)  # every gate open (and still a gradient through the sigmoid)
    x = torch.randn(64, 3, 32, 32)
    assert model(x, "straight_through").decisions.mean() == 1.0

    def run(seed):
        return model(x, "straight_through", drop_rate=0.25, generator=torch.Generator().manual_seed(seed))

    out = run(1)
    assert abs(out.decisions.mean().item() - 0.75) < 0.05
    assert torch.equal(out.decisions, run(1).decisions) and not torch.equal(out.decisions, run(2).decisions)
    assert torch.equal(out.macs, model.mac_table((32, 32)).per_image(out.decisions))
    out.logits.sum().backward()
    assert model.gates.rnn.weight_ih.grad is not None and model.gates.rnn.weight_ih.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="drop_rate"):
        model(x, "sample", drop_rate=0.25)
    with pytest.raises(ValueError, match="drop_rate"):
        model(x, "straight_through", drop_rate=1.0)
    with pytest.raises(ValueError, match="eval mode"):
        model.eval()(x, "straight_through", drop_rate=0.25)


def test_rnn_gate_function_is_the_modules_arithmetic():
    """RNNGateBank.forward is rnn_gate (which the inference op's reference also runs): bit for bit what
    projection, nn.LSTMCell and output layer give."""
    torch.manual_seed(0)
    bank = create_model("cifar_resnet14").gates
    x, h, c = torch.randn(3, 32, 8, 8), torch.randn(3, 10), torch.randn(3, 10)
    logit, (h1, c1) = bank(x, 2, (h, c))
    h2, c2 = bank.rnn(bank.proj[2](x.mean((2, 3))), (h, c))
    assert torch.equal(logit, bank.fc(h2).squeeze(1)) and torch.equal(h1, h2) and torch.equal(c1, c2)


def test_block_set_network_is_the_skipnet_with_its_decisions_fixed():
    # A static policy as an ordinary ResNet: the kept blocks' weights in a plain network of their layout give
    # the SkipNet's outputs with those decisions fixed (eval mode). Fails if a block is copied to the wrong
    # place, the stem or classifier is not carried, or the layout is miscounted.
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", gate="rnn", num_classes=7)
    for m in model.modules():  # BatchNorm statistics that are not the identity, so a misplaced block shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    keep = [0, 0, 1, 1, 0, 1, 1, 1]
    plain = skipnet.block_set_network(model, keep).eval()
    assert not plain.is_gated and plain.config.layout == (1, 2, 3) and plain.config.depth == 14
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x, "fixed", decisions=torch.tensor(keep, dtype=torch.float32)).logits
        torch.testing.assert_close(plain(x).logits, want)
        other = skipnet.block_set_network(model, [1, 0, 1, 1, 0, 1, 1, 1]).eval()  # another block of stage 1
        assert not torch.allclose(other(x).logits, want)
    with pytest.raises(ValueError, match="first of stage 2"):
        skipnet.block_set_network(model, [1, 1, 0, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="8 keep flags"):
        skipnet.block_set_network(model, keep[:7])
    with pytest.raises(ValueError, match="CIFAR-style"):
        skipnet.block_set_network(create_model("resnet18", gate="rnn"), [1] * 7)
