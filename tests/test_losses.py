"""The HRL objective on small hand-computed cases (SPEC §5)."""

import math

import pytest
import torch

from skipnet.train import hrl_loss, per_gate_returns
from skipnet.train.hrl import AlphaController, GateBaseline, ThresholdController, needed_shift

LN2, LN43 = math.log(2.0), math.log(4.0 / 3.0)


def _case():
    # Two classes. Image 0: logits (0, 0), label 0 -> CE = ln 2. Image 1: logits (ln 3, 0), label 0 -> ln(4/3).
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    decisions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    log_probs = torch.tensor([[-0.1, -0.2, -0.3], [-0.4, -0.5, -0.6]], requires_grad=True)
    return logits, labels, decisions, log_probs


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


@pytest.mark.parametrize("reduction,rl_weight", [("sum", 0.01), ("mean", 1.28), ("mean", 0.5)])
def test_hrl_loss_value_gradient_signs_and_reduction(reduction, rl_weight):
    logits, labels, g, lp = _case()
    out = hrl_loss(logits, labels, lp, g, alpha=0.3, beta=1.0, rl_weight=rl_weight, reduction=reduction)
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


def test_sum_reduction_at_batch_128_equals_mean_with_weight_1_28():
    torch.manual_seed(0)
    logits, labels = torch.randn(128, 10), torch.randint(0, 10, (128,))
    g = torch.bernoulli(torch.full((128, 5), 0.5))
    lp = torch.randn(128, 5)
    a = hrl_loss(logits, labels, lp, g, alpha=0.1, rl_weight=0.01, reduction="sum").total
    b = hrl_loss(logits, labels, lp, g, alpha=0.1, rl_weight=1.28, reduction="mean").total
    torch.testing.assert_close(a, b)


def test_each_image_return_multiplies_its_own_log_prob():
    # The authors' ImageNet code broadcast a (B,) by a (B, 1) tensor into B x B; here changing image 1's
    # loss must leave image 0's REINFORCE gradient unchanged.
    logits, labels, g, lp = _case()
    hrl_loss(logits, labels, lp, g, alpha=0.3, rl_weight=1.0).total.backward()
    first = lp.grad.clone()
    lp.grad = None
    logits2 = torch.tensor([[0.0, 0.0], [-5.0, 5.0]], requires_grad=True)
    hrl_loss(logits2, labels, lp, g, alpha=0.3, rl_weight=1.0).total.backward()
    torch.testing.assert_close(lp.grad[0], first[0])
    assert not torch.allclose(lp.grad[1], first[1])


def test_baseline_is_subtracted_from_the_returns():
    logits, labels, g, lp = _case()
    b = torch.tensor([0.5, -0.5, 0.0])
    out = hrl_loss(logits, labels, lp, g, alpha=0.3, rl_weight=1.0, reduction="sum", baseline=b)
    torch.testing.assert_close(out.advantages, out.returns - b)
    out.total.backward()
    torch.testing.assert_close(lp.grad, -(out.returns - b))


def test_hrl_loss_rejects_bad_arguments():
    logits, labels, g, lp = _case()
    with pytest.raises(ValueError, match="reduction"):
        hrl_loss(logits, labels, lp, g, reduction="batchmean")
    with pytest.raises(ValueError, match="differ"):
        hrl_loss(logits, labels, lp[:, :2], g)


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
