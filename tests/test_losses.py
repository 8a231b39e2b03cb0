"""The HRL objective (SPEC §5): small hand-computed cases, and a toy bandit on which the REINFORCE gradient
of :func:`hrl_loss` is compared with the exact gradient of the expected objective."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from skipnet.models.decisions import bernoulli_log_prob, decide
from skipnet.train import hrl_loss, per_gate_returns
from skipnet.train.hrl import (
    AlphaController,
    GateBaseline,
    GateRateController,
    ThresholdController,
    needed_shift,
    uniform_gate_rate,
)
from skipnet.train.losses import distill_loss, target_rate_loss

LN2, LN43 = math.log(2.0), math.log(4.0 / 3.0)


def _case():
    # Two classes. Image 0: logits (0, 0), label 0 -> CE = ln 2. Image 1: logits (ln 3, 0), label 0 -> ln(4/3).
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    decisions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    log_probs = torch.tensor([[-0.1, -0.2, -0.3], [-0.4, -0.5, -0.6]], requires_grad=True)
    return logits, labels, decisions, log_probs


def _ce(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none")


def test_per_gate_returns_by_hand():
    ce = torch.tensor([LN2, LN43])
    _, _, g, _ = _case()
    r = per_gate_returns(ce, g, alpha=0.3, beta=1.0)
    # alpha/N = 0.1. Image 0 skipped gates 1, 2 -> future skips (2, 2, 1); image 1 skipped gate 0 -> (1, 0, 0).
    expected = torch.tensor([[0.2 - LN2, 0.2 - LN2, 0.1 - LN2], [0.1 - LN43, -LN43, -LN43]])
    torch.testing.assert_close(r, expected)
    r2 = per_gate_returns(ce, g, alpha=0.3, beta=0.5, costs=torch.tensor([3.0, 1.0, 2.0]))
    # weighted skips: image 0 (0, 1, 2) -> future (3, 3, 2); image 1 (3, 0, 0) -> (3, 0, 0)
    expected2 = torch.tensor([[0.3 - LN2 / 2, 0.3 - LN2 / 2, 0.2 - LN2 / 2], [0.3 - LN43 / 2, -LN43 / 2, -LN43 / 2]])
    torch.testing.assert_close(r2, expected2)


def test_per_gate_alphas_price_each_gates_skips_by_hand():
    ce = torch.tensor([LN2, LN43])
    _, _, g, _ = _case()
    # N = 3, alphas (0.3, 0.6, -0.3) / 3 = (0.1, 0.2, -0.1) per skip. Image 0 skipped gates 1, 2 -> its skip
    # rewards (0, 0.2, -0.1), summed from each gate on: (0.1, 0.1, -0.1); image 1 skipped gate 0: (0.1, 0, 0).
    r = per_gate_returns(ce, g, alpha=torch.tensor([0.3, 0.6, -0.3]), beta=1.0)
    expected = torch.tensor([[0.1 - LN2, 0.1 - LN2, -0.1 - LN2], [0.1 - LN43, -LN43, -LN43]])
    torch.testing.assert_close(r, expected)
    # equal per-gate prices are the one shared alpha
    torch.testing.assert_close(per_gate_returns(ce, g, alpha=torch.full((3,), 0.3), beta=1.0,
                                                costs=torch.tensor([3.0, 1.0, 2.0])),
                               per_gate_returns(ce, g, alpha=0.3, beta=1.0, costs=torch.tensor([3.0, 1.0, 2.0])))
    with pytest.raises(ValueError, match="one entry per gate"):
        per_gate_returns(ce, g, alpha=torch.tensor([0.3, 0.6]), beta=1.0)
    with pytest.raises(ValueError, match="cap"):
        per_gate_returns(ce, g, alpha=torch.tensor([0.3, 0.6, 0.1]), beta=1.0, cap=0.5)


def test_gate_rate_controller_holds_each_gate_at_its_own_rate():
    c = GateRateController(alpha=0.5, targets=torch.tensor([0.5, 0.5, 1.0]), lr=1.0, alpha_max=2.0, ema=0.0)
    a = c.update(torch.tensor([0.9, 0.2, 1.0]))
    # gate 0 runs too often: its skips pay more; gate 1 too rarely: they pay less, and below zero (an equality
    # constraint: the price of a skip can turn into a cost); gate 2 is at its target: unchanged
    torch.testing.assert_close(a, torch.tensor([0.9, 0.2, 0.5], dtype=torch.float64))
    for _ in range(5):
        a = c.update(torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(a, torch.tensor([2.0, -2.0, 0.5], dtype=torch.float64))  # clipped at +-alpha_max
    restored = GateRateController(0.0, torch.tensor([0.5, 0.5, 1.0]), 1.0, 2.0, 0.0)
    restored.load_state_dict(c.state_dict())
    torch.testing.assert_close(restored.alpha, c.alpha)
    torch.testing.assert_close(restored.update(torch.tensor([0.5, 0.5, 1.0])), c.update(torch.tensor([0.5, 0.5, 1.0])))
    ramp = GateRateController(0.0, torch.tensor([0.5, 0.8]), lr=1.0, alpha_max=9.0, ema=0.0, ramp_steps=2)
    ramp.update(torch.tensor([0.9, 0.6]))  # each gate's ramp starts at its own first rate, or at its target
    torch.testing.assert_close(ramp.target_now(), torch.tensor([0.7, 0.8], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        GateRateController(0.0, torch.tensor([0.5, 1.5]), 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="expected 2 gate rates"):
        ramp.update(torch.tensor([0.5, 0.5, 0.5]))


def test_target_rate_loss_by_hand():
    # gate 0's mean probability over the batch is 0.6 against a target of 0.5, gate 1's 0.2 against 0.5:
    # ((0.1)^2 + (0.3)^2) / 2 = 0.05; the gradient reaches every probability, d/dp_{b,j} = (mean_j - t_j) / B
    probs = torch.tensor([[0.8, 0.1], [0.4, 0.3]], requires_grad=True)
    loss = target_rate_loss(probs, torch.tensor([0.5, 0.5]))
    assert loss.item() == pytest.approx(0.05)
    loss.backward()
    torch.testing.assert_close(probs.grad, torch.tensor([[0.05, -0.15], [0.05, -0.15]]))
    assert target_rate_loss(probs.detach(), 0.5).item() == pytest.approx(0.05)  # one target for every gate


def test_uniform_gate_rate_spends_the_target_macs():
    from skipnet.cost import build_mac_table
    from skipnet.models import create_model

    table = build_mac_table(create_model("cifar_resnet20", gate="rnn"), (32, 32))
    for target in (0.5, 0.65, 0.9):
        rate = uniform_gate_rate(table, target)
        spent = float(table.per_image(torch.full((1, table.num_gates), rate, dtype=torch.float64))[0])
        assert spent == pytest.approx(target * table.plain, rel=1e-9)
    with pytest.raises(ValueError, match="out of reach"):
        uniform_gate_rate(table, 0.05)


@pytest.mark.parametrize("reduction,rl_weight", [("sum", 0.01), ("mean", 1.28), ("mean", 0.5)])
def test_hrl_loss_value_gradient_signs_and_reduction(reduction, rl_weight):
    logits, labels, g, lp = _case()
    out = hrl_loss(_ce(logits, labels), lp, g, alpha=0.3, beta=1.0, rl_weight=rl_weight, reduction=reduction)
    r = torch.tensor([[0.2 - LN2, 0.2 - LN2, 0.1 - LN2], [0.1 - LN43, -LN43, -LN43]])
    per_image = -(r * lp.detach()).sum(1)
    reinforce = per_image.sum() if reduction == "sum" else per_image.mean()
    ce = (LN2 + LN43) / 2
    torch.testing.assert_close(out.ce, torch.tensor(ce))
    torch.testing.assert_close(out.total, torch.tensor(ce) + rl_weight * reinforce)
    out.total.backward()
    # d total / d log pi(g_{b,i}) = -w * r_{b,i} (/B for the mean): a positive return raises its log-prob,
    # and image b's return reaches only image b's log-probabilities.
    scale = rl_weight if reduction == "sum" else rl_weight / 2
    torch.testing.assert_close(lp.grad, -scale * r)
    # The returns are constants: the CE gradient is that of the plain mean cross-entropy.
    expected_logit_grad = torch.tensor([[-0.25, 0.25], [-0.125, 0.125]])
    torch.testing.assert_close(logits.grad, expected_logit_grad)


def test_reduction_sum_grows_with_the_batch_and_mean_does_not():
    # What the reductions mean (and what the DDP scaling relies on): repeating every image of a batch twice
    # doubles the summed REINFORCE gradient and leaves the averaged one unchanged. The CE part is a mean.
    logits, labels, g, lp = _case()

    def grads(k: int, reduction: str):
        lp_k = lp.detach().repeat(k, 1).requires_grad_()
        logits_k = logits.detach().repeat(k, 1).requires_grad_()
        out = hrl_loss(_ce(logits_k, labels.repeat(k)), lp_k, g.repeat(k, 1), alpha=0.3, rl_weight=0.5,
                       reduction=reduction)
        gl, gz = torch.autograd.grad(out.total, (lp_k, logits_k))
        return gl.view(k, *lp.shape).sum(0), gz.view(k, *logits.shape).sum(0)

    (sum1, ce1), (sum2, ce2) = grads(1, "sum"), grads(2, "sum")
    torch.testing.assert_close(sum2, 2 * sum1)
    torch.testing.assert_close(ce2, ce1)
    (mean1, _), (mean2, _) = grads(1, "mean"), grads(2, "mean")
    torch.testing.assert_close(mean2, mean1)
    torch.testing.assert_close(sum1, 2 * mean1)  # batch of 2: sum = 2 x mean


def test_each_image_return_multiplies_its_own_log_prob():
    # The authors' ImageNet code broadcast a (B,) by a (B, 1) tensor into B x B; here changing image 1's
    # loss must leave image 0's REINFORCE gradient unchanged.
    logits, labels, g, lp = _case()
    hrl_loss(_ce(logits, labels), lp, g, alpha=0.3, rl_weight=1.0).total.backward()
    first = lp.grad.clone()
    lp.grad = None
    logits2 = torch.tensor([[0.0, 0.0], [-5.0, 5.0]], requires_grad=True)
    hrl_loss(_ce(logits2, labels), lp, g, alpha=0.3, rl_weight=1.0).total.backward()
    torch.testing.assert_close(lp.grad[0], first[0])
    assert not torch.allclose(lp.grad[1], first[1])


def test_baseline_is_subtracted_from_the_returns():
    logits, labels, g, lp = _case()
    b = torch.tensor([0.5, -0.5, 0.0])
    out = hrl_loss(_ce(logits, labels), lp, g, alpha=0.3, rl_weight=1.0, reduction="sum", baseline=b)
    torch.testing.assert_close(out.advantages, out.returns - b)
    out.total.backward()
    torch.testing.assert_close(lp.grad, -(out.returns - b))


def test_per_image_baseline_stays_with_its_image():
    # baseline (B, N), e.g. the returns of each image's own greedy path: row b is subtracted from image b only
    logits, labels, g, lp = _case()
    b = torch.tensor([[0.5, -0.5, 0.0], [1.0, 2.0, 3.0]])
    out = hrl_loss(_ce(logits, labels), lp, g, alpha=0.3, rl_weight=1.0, reduction="sum", baseline=b)
    torch.testing.assert_close(out.advantages, out.returns - b)
    out.total.backward()
    first = lp.grad.clone()
    torch.testing.assert_close(first, -(out.returns - b))
    lp.grad = None
    b2 = b.clone()
    b2[1] = -7.0
    hrl_loss(_ce(logits, labels), lp, g, alpha=0.3, rl_weight=1.0, reduction="sum", baseline=b2).total.backward()
    torch.testing.assert_close(lp.grad[0], first[0])
    with pytest.raises((RuntimeError, ValueError)):  # neither (N,) nor (B, N)
        hrl_loss(_ce(logits, labels), lp, g, baseline=torch.zeros(3, 3))


def test_hrl_loss_rejects_bad_arguments():
    logits, labels, g, lp = _case()
    ce = _ce(logits, labels)
    with pytest.raises(ValueError, match="reduction"):
        hrl_loss(ce, lp, g, reduction="batchmean")
    with pytest.raises(ValueError, match="differ"):
        hrl_loss(ce, lp[:, :2], g)
    with pytest.raises(ValueError, match="per-image losses"):
        hrl_loss(ce.unsqueeze(1), lp, g)
    with pytest.raises(ValueError, match="expected ce"):
        hrl_loss(ce[:1], lp, g)


def test_alpha_controller_follows_a_ramped_target():
    c = AlphaController(alpha=1.0, target=0.5, lr=1.0, alpha_max=10.0, ema=0.0, ramp_steps=4)
    assert c.update(0.9) == pytest.approx(1.0)  # the ramp starts at the first cost: no error yet
    assert c.target_now() == pytest.approx(0.8)  # then falls by (0.9 - 0.5) / 4 a step
    assert c.update(0.9) == pytest.approx(1.1)  # 0.1 above the ramp, not 0.4 above the final target
    assert c.target_now() == pytest.approx(0.7)
    restored = AlphaController(alpha=0.0, target=0.5, lr=1.0, alpha_max=10.0, ema=0.0, ramp_steps=4)
    restored.load_state_dict(c.state_dict())
    assert restored.target_now() == pytest.approx(0.7) and restored.alpha == pytest.approx(1.1)
    c.update(0.9)
    c.update(0.9)
    assert c.target_now() == pytest.approx(0.5) and c.update(0.5) == pytest.approx(c.alpha)  # held at the target


def test_alpha_controller_moves_towards_target_and_baseline_averages():
    c = AlphaController(alpha=1.0, target=0.5, lr=2.0, alpha_max=10.0, ema=0.0)
    assert c.update(0.9) == pytest.approx(1.8)  # too expensive: more reward for skipping
    assert c.update(0.2) == pytest.approx(1.2)  # too cheap: less
    assert c.update(0.0) == pytest.approx(0.2)
    assert c.update(0.0) == 0.0  # never negative
    fixed = AlphaController(alpha=0.1, target=None, lr=2.0, alpha_max=10.0, ema=0.9)
    assert fixed.update(1.0) == 0.1
    restored = AlphaController(0.0, 0.5, 2.0, 10.0, 0.0)
    restored.load_state_dict(c.state_dict())
    assert restored.alpha == c.alpha
    base = GateBaseline(momentum=0.5)
    base.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(base.value, torch.tensor([2.0, 3.0]))
    base.update(torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(base.value, torch.tensor([1.0, 1.5]))


def test_skip_reward_cap_bounds_what_an_image_can_earn():
    ce = torch.tensor([LN2, LN43])
    _, _, g, _ = _case()
    # uncapped future skips / N: image 0 (2/3, 2/3, 1/3), image 1 (1/3, 0, 0); cap 0.5 clips only image 0's
    r = per_gate_returns(ce, g, alpha=0.3, beta=1.0, cap=0.5)
    expected = torch.tensor([[0.15 - LN2, 0.15 - LN2, 0.1 - LN2], [0.1 - LN43, -LN43, -LN43]])
    torch.testing.assert_close(r, expected)


def test_needed_shift_by_hand():
    z = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    saved = torch.tensor([1.0, 2.0])  # per image and block: 0.5 and 1.0 of the batch mean
    # wanted most to least: 3 (1.0), 2 (0.5), 0.5 (0.5), -1 (1.0); a budget of 1.5 runs the first two
    assert needed_shift(z, saved, 1.5) == pytest.approx(-1.25)
    assert ((z - 1.25 >= 0).float() * saved).sum() / 2 == 1.5
    assert needed_shift(z, saved, 0.5) == pytest.approx(-4.0)  # nothing fits: all close
    assert needed_shift(z, saved, 5.0) == pytest.approx(2.0)  # everything fits: all open


def test_threshold_controller_follows_a_ramp_then_holds_the_target():
    z, saved = torch.tensor([[2.0, -1.0], [0.5, 3.0]]), torch.tensor([0.25, 0.5])
    c = ThresholdController(0.5, ramp_steps=2, gain=0.5, max_step=0.5)
    assert c.target_now() == 0.5  # nothing measured yet
    d = c.update(1.0, z, saved, base=0.1)  # the ramp starts at the first measured cost
    assert needed_shift(z, saved, 1.0 - 0.1) == 2.0 and d == 0.5  # all fit: half the shift, clipped to max_step
    assert c.target_now() == pytest.approx(0.75)
    d2 = c.update(1.0, z, saved, base=0.1)
    assert d2 == pytest.approx(0.5 * 0.25)  # budget 0.65 runs all but the -1: threshold between 0.5 and -1
    assert c.target_now() == 0.5 and c.steps == 2 and c.offset == pytest.approx(d + d2)
    e = ThresholdController(0.5, ramp_steps=2, gain=0.5)
    e.load_state_dict(c.state_dict())
    assert e.target_now() == c.target_now() and e.update(0.4, z, saved, 0.1) == c.update(0.4, z, saved, 0.1)
    with pytest.raises(ValueError, match="target"):
        ThresholdController(1.5, 10, 0.5)
    with pytest.raises(ValueError, match="gain"):
        ThresholdController(0.5, 10, 2.0)


# --- a toy bandit: the REINFORCE gradient of hrl_loss against the exact gradient of the expected objective ----
#
# N = 3 independent Bernoulli gates, pi(g_j = 1) = sigmoid(theta_j), and a fixed "cross-entropy" for each of
# the 2^N decision vectors. hrl_loss minimises, in expectation,
#     J(theta) = E_g[ beta * CE(g) - (alpha / N) * sum_j (1 - g_j) C_j ].
# Its REINFORCE term weights log pi(g_i) by the reward-to-go r_i (SPEC §5); the skip rewards of gates j < i are
# independent of g_i, so they vanish in expectation and E[-sum_i r_i grad log pi(g_i)] = grad J exactly.

N_GATES = 3
THETA = (0.4, -0.6, 1.2)
COSTS = torch.tensor([1.0, 2.5, 0.5], dtype=torch.float64)
ALPHA, BETA = 0.9, 0.7
CONFIGS = torch.tensor(list(itertools.product([0.0, 1.0], repeat=N_GATES)), dtype=torch.float64)  # (8, N)
CE_TABLE = torch.tensor([2.4, 1.5, 2.1, 1.2, 1.2, 0.7, 0.9, 0.4], dtype=torch.float64)  # CE of each config


def _config_index(g):
    return (g * 2 ** torch.arange(N_GATES - 1, -1, -1, dtype=g.dtype)).sum(-1).long()  # row of CONFIGS


def _expected_objective(p):
    """J for execution probabilities p (N,): the exact expectation over the 2^N decision vectors."""
    probs = (CONFIGS * p + (1 - CONFIGS) * (1 - p)).prod(1)
    cost = BETA * CE_TABLE - ALPHA / N_GATES * ((1 - CONFIGS) * COSTS).sum(1)
    return (probs * cost).sum()


def _analytic_gradient(explore: float = 0.0):
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    p = (1 - explore) * torch.sigmoid(theta) + explore / 2  # the policy that acts
    return torch.autograd.grad(_expected_objective(p), theta)[0]


def test_config_table_indexing():
    assert _config_index(CONFIGS).tolist() == list(range(2**N_GATES))


@pytest.mark.parametrize("baseline", [None, "per_gate"])
def test_bandit_reinforce_gradient_equals_the_exact_gradient_by_enumeration(baseline):
    # E over g of the per-sample REINFORCE gradient, weighted exactly by pi(g): equal to grad J to rounding.
    # A baseline that does not depend on the decisions changes no expectation.
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    b = None if baseline is None else torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    p = torch.sigmoid(theta).detach()
    total = torch.zeros(N_GATES, dtype=torch.float64)
    for k, g in enumerate(CONFIGS):
        weight = (g * p + (1 - g) * (1 - p)).prod()  # pi(g), a constant
        lp = bernoulli_log_prob(theta, g)
        out = hrl_loss(CE_TABLE[k:k + 1], lp[None], g[None], alpha=ALPHA, beta=BETA, rl_weight=1.0,
                       reduction="sum", costs=COSTS, baseline=b)
        total += weight * torch.autograd.grad(out.total, theta)[0]
    expected = _analytic_gradient()
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-12)
    assert expected.abs().min() > 0.03  # every component matters


@pytest.mark.parametrize("explore", [0.0, 0.3])
def test_bandit_sampled_reinforce_gradient_matches_the_exact_gradient(explore):
    # 200k images, each with its own logits row (so each image's gradient can be read off), decided by the
    # model's own sampler; mean reduction. With exploration the policy that acts is p' = (1 - eps) p + eps / 2:
    # the estimate must match the gradient of J under p', not under p.
    batch = 200_000
    logits = torch.tensor(THETA, dtype=torch.float64).repeat(batch, 1).requires_grad_()
    gen = torch.Generator().manual_seed(0)
    gs, lps = zip(*(decide(logits[:, j], "sample", generator=gen, explore=explore) for j in range(N_GATES)))
    g, lp = torch.stack(gs, 1), torch.stack(lps, 1)
    out = hrl_loss(CE_TABLE[_config_index(g)], lp, g, alpha=ALPHA, beta=BETA, rl_weight=1.0, reduction="mean",
                   costs=COSTS)
    per_image = torch.autograd.grad(out.total, logits)[0] * batch  # (B, N): each image's gradient
    estimate, stderr = per_image.mean(0), per_image.std(0) / math.sqrt(batch)
    expected = _analytic_gradient(explore)
    assert ((estimate - expected).abs() < 4 * stderr).all(), (estimate, expected, stderr)
    assert (stderr < 0.05 * expected.abs()).all()  # precise enough to tell a wrong gradient apart
    if explore:
        wrong = _analytic_gradient(0.0)  # as if the sampling policy were p
        assert ((estimate - wrong).abs() > 10 * stderr).any()


def test_explore_samples_from_the_mixed_policy_and_returns_its_log_prob():
    eps, per_logit = 0.2, 100_000
    values = torch.tensor([-40.0, -2.0, 0.0, 1.5, 40.0])
    logits = values.repeat_interleave(per_logit).requires_grad_()
    g, lp = decide(logits, "sample", generator=torch.Generator().manual_seed(1), explore=eps)
    p_mixed = (1 - eps) * torch.sigmoid(values) + eps / 2  # never below eps / 2, never above 1 - eps / 2
    freq = g.view(len(values), per_logit).mean(1)
    sigma = (p_mixed * (1 - p_mixed) / per_logit).sqrt()
    assert ((freq - p_mixed).abs() < 4 * sigma).all(), (freq, p_mixed)
    # log pi'(g) of the policy that acted, finite even where p itself saturates
    pm = (1 - eps) * torch.sigmoid(logits) + eps / 2
    torch.testing.assert_close(lp, torch.where(g == 1, pm.log(), (1 - pm).log()))
    assert torch.isfinite(lp).all()
    # its gradient is that of log p'(g) (d/dz log p' = (1 - eps) p (1 - p) / p' for g = 1)
    (grad,) = torch.autograd.grad(lp.sum(), logits)
    p = torch.sigmoid(logits.detach())
    dp = (1 - eps) * p * (1 - p)
    torch.testing.assert_close(grad, torch.where(g == 1, dp / pm.detach(), -dp / (1 - pm.detach())))
    # explore 0 is the plain policy
    g0, lp0 = decide(logits, "sample", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(lp0, bernoulli_log_prob(logits, g0))
    with pytest.raises(ValueError, match="explore"):
        decide(logits, "sample", explore=1.0)


def test_model_sample_mode_with_explore_reports_the_log_prob_of_the_acting_policy():
    import skipnet

    torch.manual_seed(0)
    model = skipnet.create_model("cifar_resnet8", gate="rnn", in_channels=1, num_classes=4)
    x = torch.randn(64, 1, 12, 12)
    eps = 0.3
    out = model(x, "sample", explore=eps, generator=torch.Generator().manual_seed(0))
    pm = (1 - eps) * out.probs + eps / 2  # probs: the policy p itself (the stages' expected MACs use it)
    torch.testing.assert_close(out.log_probs, torch.where(out.decisions == 1, pm.log(), (1 - pm).log()))
    plain = model(x, "sample", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain.probs[:, 0], out.probs[:, 0])  # later gates see the blocks decided before
    p = plain.probs.double()
    torch.testing.assert_close(plain.log_probs.double(), torch.where(plain.decisions == 1, p.log(), (1 - p).log()),
                               atol=1e-5, rtol=1e-5)


def test_distill_loss_by_hand():
    # Teacher (ln 3, 0): p = (3/4, 1/4); student (0, 0): q = (1/2, 1/2). KL(p || q) = 3/4 ln(3/2) + 1/4 ln(1/2)
    # for image 0; image 1 has student = teacher: 0. Batch mean: half of image 0's. The teacher gets no gradient;
    # the student's is (q - p) / B.
    teacher = torch.tensor([[math.log(3.0), 0.0], [1.0, -1.0]], requires_grad=True)
    student = torch.tensor([[0.0, 0.0], [1.0, -1.0]], requires_grad=True)
    loss = distill_loss(student, teacher)
    assert loss.item() == pytest.approx((0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2)
    loss.backward()
    assert teacher.grad is None
    torch.testing.assert_close(student.grad, torch.tensor([[-0.125, 0.125], [0.0, 0.0]]))
