"""Training runs: stages, exact resume, safe run folders and checkpoints, the CLI."""

import gzip
import json
import os
import signal
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import skipnet.train.trainer as trainer
from skipnet.cli import main
from skipnet.data import BatchLoader, ImageData, dataset_info
from skipnet.train import (
    CheckpointError,
    Interrupted,
    NonFiniteLossError,
    RunExistsError,
    load_checkpoint,
    load_config,
    load_model,
    recipe_names,
    save_checkpoint,
    train,
)
from skipnet.train.evaluate import evaluate
from skipnet.train.stages import make_stage


def _data(n: int, seed: int) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 60, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    images[:, :, 2:10, 2:10] += (labels * 45).to(torch.uint8).view(-1, 1, 1, 1)  # learnable signal
    return ImageData(images=images, labels=labels, classes=list("abcd"), mean=(0.3,), std=(0.25,), name="toy")


DATA = (_data(64, 0), _data(32, 1))


def _config(stage: str, **train):
    over = [f"train.stage={stage}", "model.name=cifar_resnet8", "data.batch_size=16", "data.eval_batch_size=32",
            "data.crop_padding=2", "train.lr=0.05", "train.eval_every=0", "train.checkpoint_every=2",
            "train.log_every=1", "train.channels_last=false"]
    over += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, over)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "sp"
    train(_config("sp", epochs=1.5), run, data=DATA, progress=False)
    return run


def test_sp_run_writes_a_complete_run_folder(sp_run):
    assert {p.name for p in sp_run.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoints", "final.json"}
    final = json.loads((sp_run / "final.json").read_text())
    assert final["step"] == 6 and 0 <= final["accuracy"] <= 100
    lines = [json.loads(x) for x in (sp_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    payload = load_checkpoint(sp_run)
    assert payload["finished"] and payload["model_config"]["gate"] == "rnn"
    model = load_model(sp_run)
    assert model.config.in_channels == 1 and model.config.num_classes == 4


def _assert_same_state(a, b, where="stage") -> None:
    """Stage states (nested dicts of floats, tensors and None) are equal up to float rounding."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=where)
    elif a is None:
        assert b is None, where
    else:
        assert a == pytest.approx(b), where


def _metric_lines(run: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("stage,extra", [
    ("sp", {}),
    ("sp", {"drop_rate": 0.3}),  # random skips: a function of (seed, step)
    ("sp", {"sp_decisions": "gumbel", "rate_loss": 2.0, "target_macs": 0.7}),  # sampled decisions likewise
    ("baseline", {}),
    ("calibrate", {"target_macs": 0.5, "threshold_gain": 0.5, "freeze_bn": True}),
    ("hrl", {"target_macs": 0.5, "baseline": "ema", "gate_optimizer": "adam", "gate_lr": 0.01, "cost": "macs",
             "freeze_bn": True, "rl_reduction": "mean", "rl_weight": 1.0}),
    # the self-critical baseline's greedy pass runs in eval mode between sampled passes whose BatchNorm
    # statistics keep updating (freeze_bn off): the modes it restores must not depend on where the run started
    ("hrl", {"target_macs": 0.5, "baseline": "greedy", "explore": 0.1, "entropy": 0.05, "budget_ramp": True,
             "budget": "greedy", "schedule": "cosine", "gate_optimizer": "adam", "gate_lr": 0.01,
             "rl_reduction": "mean", "rl_weight": 1.0}),
    ("hrl", {"target_macs": 0.6, "budget": "per_gate", "baseline": "greedy", "explore": 0.1, "budget_ramp": True,
             "gate_optimizer": "adam", "gate_lr": 0.01, "rl_reduction": "mean", "rl_weight": 1.0}),
    ("sdv", {"drop_rate": 0.3}),  # the rival random skipping: its draws, a function of (seed, step)
], ids=["sp", "sp-drop", "sp-gumbel", "baseline", "calibrate", "hrl-ema", "hrl-greedy-explore", "hrl-per-gate", "sdv"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, sp_run, stage, extra):
    if stage in ("hrl", "calibrate"):
        extra = {**extra, "init": str(sp_run)}
    cfg = _config(stage, epochs=1.5, **extra)  # 4 steps per epoch, 6 steps
    train(cfg, tmp_path / "straight", data=DATA, progress=False)
    train(cfg, tmp_path / "split", data=DATA, progress=False, max_steps=3)  # stops mid-epoch
    assert load_checkpoint(tmp_path / "split")["step"] == 3
    train(cfg, tmp_path / "split", data=DATA, progress=False, resume=True)
    _assert_same_weights(tmp_path / "straight", tmp_path / "split")
    a, b = (load_checkpoint(tmp_path / r)["stage"] for r in ("straight", "split"))
    _assert_same_state(a, b)
    if stage == "hrl" and extra.get("budget") == "per_gate":  # one price and one measured rate per gate
        assert len(a["controller"]["alpha"]) == 2 and a["controller"]["alpha"] != pytest.approx([0.1, 0.1])
        assert a["controller"]["rate"] is not None and a["controller"]["steps"] == 6
    elif stage == "hrl":  # the stage carried something across the resume
        assert a["controller"]["alpha"] != pytest.approx(0.1) and a["controller"]["cost"] is not None
    if stage == "calibrate":
        assert a["threshold"]["steps"] == 6 and a["threshold"]["offset"] != 0
    steps = [r["step"] for r in _metric_lines(tmp_path / "split")]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated lines after the resume


@pytest.fixture(scope="module")
def fitted_sp_run(tmp_path_factory) -> Path:
    """An SP run trained until the gated blocks matter: on the training images (eval mode) skipping both
    costs ~2.5 nats of cross-entropy, skipping the second alone ~0.1, and none ~0.01."""
    run = tmp_path_factory.mktemp("runs") / "sp_fitted"
    train(_config("sp", epochs=10, schedule="cosine", checkpoint_every=1000), run, data=DATA, progress=False)
    return run


def test_hrl_dual_ascent_raises_alpha_until_the_expected_compute_reaches_the_target(tmp_path, fitted_sp_run):
    # cifar_resnet8 has two gates; at 12x12 the policy's operating points are 1.0 (both blocks run), 0.71 (one
    # skipped) and 0.42 (both) of the plain network's MACs. Starting from alpha 0.3 -- too little reward to
    # skip anything: with alpha fixed there, the expected fraction stays ~0.99 -- the controller must raise
    # alpha until the policy reaches the target. The backbone is frozen (lr 0) so that the trade-off it faces
    # does not move. What the one shared price does *after* that depends on the SP fit (five fits, seeds 0-4,
    # 2026-12-03): on some it holds the 0.71 point, on others pushing the second gate shut drags the first down
    # with it through the shared RNN head (the coupling behind RESULTS' "cliff") and the fraction sits near 0.57
    # while alpha falls. So this asserts the controller's part, which held on all five: alpha raised, the target
    # reached, nothing collapsed to skipping both blocks. Fails if the dual update's sign is flipped (alpha falls
    # to 0, the fraction stays ~1.0) or if alpha is not adapted at all.
    target, start_alpha = 0.75, 0.3
    cfg = _config("hrl", epochs=30, init=str(fitted_sp_run), lr=0.0, target_macs=target, alpha=start_alpha,
                  alpha_lr=0.05, gate_lr=0.05, gate_optimizer="adam", baseline="greedy", explore=0.1,
                  rl_weight=1.0, rl_reduction="mean", freeze_bn=True, checkpoint_every=1000)
    train(cfg, tmp_path / "hrl", data=DATA, progress=False)
    steps = _metric_lines(tmp_path / "hrl")
    assert len(steps) == 120
    expected = [r["expected_mac_fraction"] for r in steps]
    assert expected[0] > target + 0.2  # the run starts well above the target
    reached = next((i for i, e in enumerate(expected) if e <= target + 0.03), None)
    assert reached is not None, f"the expected fraction never came down to the target: {expected[-10:]}"
    assert steps[reached]["alpha"] > start_alpha + 0.15  # raised, as it had to be, to get there
    assert min(expected) > 0.47  # never (nearly) every block skipped: 0.42 plus exploration
    alpha = load_checkpoint(tmp_path / "hrl")["stage"]["controller"]["alpha"]
    assert alpha == pytest.approx(steps[-1]["alpha"])


def test_hrl_per_gate_budget_holds_every_gate_at_its_own_rate(tmp_path, fitted_sp_run):
    # From the same fitted SP network, the two gates of cifar_resnet8 are held at different execution rates:
    # the first at 0.4, the second at 0.8 -- neither a rate a shared alpha reaches (it closes the cheaper-to-lose
    # second block first, and for every image alike). The target-rate loss pulls each gate's mean probability
    # to its rate; the per-gate prices remove what is left (REINFORCE on -CE alone favours running blocks).
    # The first gate's block is the one that is dear to lose (about 1.2 nats on the seed-0 fit), so its price
    # climbs slowest: on five SP fits (seeds 0-4) it held within 0.003-0.092 of 0.4, the second within 0.02 of 0.8.
    # Fails if the rates are pooled, a sign is flipped, or the per-gate prices do not reach the returns.
    targets = (0.4, 0.8)
    cfg = _config("hrl", epochs=40, init=str(fitted_sp_run), lr=0.0, budget="per_gate",
                  gate_targets=",".join(map(str, targets)), rate_loss=10.0, alpha=0.0, alpha_lr=0.1,
                  budget_ramp=True, target_ramp=0.25, gate_lr=0.05, gate_optimizer="adam", baseline="greedy",
                  explore=0.1, rl_weight=1.0, rl_reduction="mean", freeze_bn=True, checkpoint_every=1000)
    train(cfg, tmp_path / "hrl", data=DATA, progress=False)
    steps = _metric_lines(tmp_path / "hrl")
    assert steps[0]["gate_rates"][0] > 0.9 and steps[-1]["gate_rate_targets"] == [0.4, 0.8]
    held = torch.tensor([r["gate_rates"] for r in steps[-40:]]).mean(0).tolist()
    assert held[0] == pytest.approx(targets[0], abs=0.12) and held[1] == pytest.approx(targets[1], abs=0.06)
    assert held[1] - held[0] > 0.25  # apart, in the targets' order
    alphas = load_checkpoint(tmp_path / "hrl")["stage"]["controller"]["alpha"]
    assert alphas == pytest.approx(steps[-1]["gate_alphas"], abs=1e-4) and alphas[0] > alphas[1]


def test_rate_loss_under_the_shared_budget_pulls_every_gate_to_the_common_rate(tmp_path, fitted_sp_run):
    # One shared alpha holds the expected MACs at 0.75; ConvNet-AIG's target-rate loss pulls both gates to the
    # one rate that spends the same MACs (0.57 here) while the budget still holds. Without the loss the shared
    # price ends at a different split on every SP fit: 0.90/0.83, 1.0/0.0, 1.0/0.12, 0.52/0.04 on seeds 0, 1, 3,
    # 4 (on seed 2, 0.53/0.49, it happens to lie near the common rate). Whether the gates then split the images
    # or run each block for a random 57 % is not settled by this toy: on five fits (2026-12-03, eval mode on the
    # training images) two routed per image and three gave every image the same probability -- per-image
    # routing is measured on Fashion-MNIST in docs/RESULTS.md (routing gain over random skipping at the run's
    # rates). Fails if the loss does not reach the gates, pulls to another rate, or breaks the budget.
    from skipnet.cost import build_mac_table
    from skipnet.train.hrl import uniform_gate_rate

    target = 0.75
    cfg = _config("hrl", epochs=30, init=str(fitted_sp_run), lr=0.0, target_macs=target, alpha=0.3,
                  alpha_lr=0.05, gate_lr=0.05, gate_optimizer="adam", baseline="greedy", explore=0.1,
                  rl_weight=1.0, rl_reduction="mean", freeze_bn=True, checkpoint_every=1000, rate_loss=10.0)
    train(cfg, tmp_path / "hrl", data=DATA, progress=False)
    steps = _metric_lines(tmp_path / "hrl")
    assert sum(r["expected_mac_fraction"] for r in steps[-40:]) / 40 == pytest.approx(target, abs=0.05)
    common = uniform_gate_rate(build_mac_table(load_model(fitted_sp_run), (12, 12)), target)
    assert 0.4 < common < 0.7
    assert steps[-1]["gate_rates"] == pytest.approx([common, common], abs=0.1)


def _hrl_step_gradients(sp_run: Path, x: torch.Tensor, y: torch.Tensor, reference_loss=None,
                        buffers: dict | None = None, **train) -> tuple[dict, dict]:
    """One ReinforceStage step from the SP run's weights with these settings: every parameter's gradient, and
    those of ``reference_loss(model, x, y)`` (default: the greedy path's mean cross-entropy alone) on the same
    weights in the same (training) mode. ``buffers``, when given, receives the model's buffers after the step."""
    import copy

    import torch.nn.functional as F

    cfg = _config("hrl", init=str(sp_run), **train)
    model = load_model(sp_run)
    stage = make_stage(cfg.train, model, model.mac_table((12, 12)), 4, torch.device("cpu"))
    stage.train_mode(model)
    reference = copy.deepcopy(model)
    total, _ = stage.loss(model, x, y, torch.Generator().manual_seed(1))
    total.backward()
    if buffers is not None:
        buffers.update({n: b.clone() for n, b in model.named_buffers()})
    if reference_loss is None:
        reference_loss = lambda net, x, y: F.cross_entropy(net(x, "greedy", tau=0.5).logits, y)  # noqa: E731
    reference_loss(reference, x, y).backward()
    return ({n: p.grad.clone() for n, p in model.named_parameters()},
            {n: p.grad for n, p in reference.named_parameters()})


def test_hrl_backbone_path_greedy_takes_the_cross_entropy_on_the_greedy_path(sp_run):
    # backbone_path greedy (ours): the backbone's cross-entropy comes from each image's greedy path (training
    # mode), not from the sampled one. With the REINFORCE weight at 0 the step's gradient must equal that of the
    # greedy path's mean CE alone; with the paper's sampled path (exploration 0.4: a fifth of the decisions
    # flipped) it must differ. Fails if the greedy pass does not reach the loss or the sampled CE still does.
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 12, 12), torch.arange(16) % 4
    grads = {}
    for path in ("greedy", "sampled"):
        grads[path], ce = _hrl_step_gradients(sp_run, x, y, backbone_path=path, rl_weight=0.0, explore=0.4,
                                              rl_reduction="mean")
    want = {n: g for n, g in ce.items() if not n.startswith("gates.")}
    for n in want:
        torch.testing.assert_close(grads["greedy"][n], want[n], msg=n)
    assert not all(torch.allclose(grads["sampled"][n], want[n]) for n in want)
    with pytest.raises(ValueError, match="backbone_path must be"):
        _config("hrl", backbone_path="fixed")


def test_hrl_rl_backbone_false_keeps_the_policy_terms_off_the_backbone(sp_run):
    # rl_backbone false (ours, with the greedy backbone path): the sampled pass runs without the backbone's
    # autograd, so the backbone's gradient is the greedy path's cross-entropy alone, while the gates' gradient
    # (REINFORCE, rate loss) is what it is with the terms reaching the backbone too. Fails if a policy term
    # still reaches the backbone, or if the gates stop learning or learn something else.
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 12, 12), torch.arange(16) % 4
    grads = {}
    for attached in (True, False):
        grads[attached], ce = _hrl_step_gradients(sp_run, x, y, backbone_path="greedy", rl_backbone=attached,
                                                  rl_weight=1.0, explore=0.2, rl_reduction="mean",
                                                  baseline="greedy", alpha=0.5, target_macs=0.7, rate_loss=1.0)
    backbone = [n for n in grads[False] if not n.startswith("gates.")]
    for n in backbone:
        torch.testing.assert_close(grads[False][n], ce[n], msg=n)
    assert not all(torch.allclose(grads[True][n], grads[False][n]) for n in backbone)
    gates = [n for n in grads[False] if n.startswith("gates.")]
    assert any(grads[False][n].abs().sum() > 0 for n in gates)
    for n in gates:
        torch.testing.assert_close(grads[False][n], grads[True][n], msg=n)
    with pytest.raises(ValueError, match="rl_backbone: false goes with backbone_path: greedy"):
        _config("hrl", rl_backbone=False)


def test_hrl_distill_teaches_the_greedy_path_from_the_all_blocks_path(sp_run):
    # distill (ours, with the greedy backbone path): the backbone's loss is CE on the all-blocks path plus
    # (1 - d) CE + d KL(all-blocks || greedy) on the greedy path, the all-blocks prediction a fixed target, and
    # the all-blocks pass leaves the BatchNorm statistics as the sampled and greedy passes make them. With the
    # REINFORCE weight at 0 the backbone's gradient must be exactly that; fails if the teacher is missing,
    # differentiated through the KL, weighted otherwise, or moves the running statistics.
    import torch.nn.functional as F

    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 12, 12), torch.arange(16) % 4
    d = 0.7

    def reference(net, x, y):
        student = net(x, "greedy", tau=0.5).logits
        teacher = net(x, "all").logits
        kl = F.kl_div(F.log_softmax(student, 1), F.softmax(teacher.detach(), 1), reduction="batchmean")
        return F.cross_entropy(teacher, y) + (1 - d) * F.cross_entropy(student, y) + d * kl

    common = dict(backbone_path="greedy", rl_backbone=False, rl_weight=0.0, explore=0.2, rl_reduction="mean")
    with_teacher, without = {}, {}
    grads, want = _hrl_step_gradients(sp_run, x, y, reference, buffers=with_teacher, distill=d, **common)
    _hrl_step_gradients(sp_run, x, y, buffers=without, **common)
    backbone = [n for n in grads if not n.startswith("gates.")]
    for n in backbone:
        torch.testing.assert_close(grads[n], want[n], msg=n)
    for n in without:  # the running statistics are those of the same step without the teacher
        torch.testing.assert_close(with_teacher[n], without[n], msg=n)
    with pytest.raises(ValueError, match="distill goes with backbone_path: greedy"):
        _config("hrl", distill=0.5)
    with pytest.raises(ValueError, match="distill is a mixing weight"):
        _config("hrl", backbone_path="greedy", distill=1.5)
    with pytest.raises(ValueError, match="stage 'calibrate' would ignore it"):
        _config("calibrate", backbone_path="greedy", distill=0.5, target_macs=0.6)


def test_hrl_executor_compact_runs_the_sampled_and_greedy_passes_compact(sp_run, monkeypatch):
    # executor compact (ours): the sampled and greedy passes run each block on the images that take it (the
    # all-blocks teacher runs every block anyway); masked (the default) runs none compact. The gradient with
    # running BatchNorm statistics equals the masked one (tests/test_models.py checks the executor itself).
    import skipnet.models.skipnet as skipnet_module

    calls = []
    real = skipnet_module.run_compact
    monkeypatch.setattr(skipnet_module, "run_compact", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 12, 12), torch.arange(16) % 4
    common = dict(backbone_path="greedy", rl_backbone=False, distill=0.5, explore=0.2, freeze_bn=True)
    grads = {}
    for ex in ("masked", "compact"):
        calls.clear()
        grads[ex], _ = _hrl_step_gradients(sp_run, x, y, executor=ex, **common)
        assert len(calls) == (2 * 2 if ex == "compact" else 0)  # cifar_resnet8: 2 gates, 2 passes
    for n in grads["masked"]:
        torch.testing.assert_close(grads["compact"][n], grads["masked"][n], rtol=1e-4, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="executor must be"):
        _config("hrl", executor="fast")
    with pytest.raises(ValueError, match="stage 'sp' trains through masked blocks"):
        _config("sp", executor="compact")


def test_bn_stats_kept_leaves_running_statistics_and_momentum_as_they_were():
    # exponential (momentum 0.1) and cumulative (momentum None) averaging alike, and after an error inside
    from skipnet.train.stages import bn_stats_kept

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3, momentum=None)).train()
    net(torch.randn(4, 3, 5, 5) + 2)  # statistics away from their initial values
    before = {n: b.clone() for n, b in net.named_buffers()}
    with bn_stats_kept(net):
        out = net(torch.randn(4, 3, 5, 5) * 3)
    assert out.abs().sum() > 0
    with pytest.raises(RuntimeError, match="inside"):
        with bn_stats_kept(net):
            net(torch.randn(4, 3, 5, 5))
            raise RuntimeError("inside")
    for n, b in net.named_buffers():
        torch.testing.assert_close(b, before[n], msg=n)
    assert (net[0].momentum, net[1].momentum) == (0.1, None)
    net(torch.randn(4, 3, 5, 5))  # and outside, they move again
    assert not torch.equal(net[0].running_mean, before["0.running_mean"])


def test_sp_with_sampled_gates_and_the_rate_loss_trains_routed_paths_at_the_target(tmp_path):
    # SP's own variant (ours, after ConvNet-AIG): decisions sampled from Bernoulli(p) with a straight-through
    # relaxed gradient, and each gate's mean probability pulled to the one rate that spends target_macs. From
    # scratch the straight-through SP opens every gate (CE alone favours running blocks); with the rate loss
    # both gates must settle near the common rate and the sampled paths spend about the target. Fails if the
    # loss does not reach the gates, pulls to another rate, or the decisions are not sampled from p.
    from skipnet.cost import build_mac_table
    from skipnet.train.hrl import uniform_gate_rate

    target = 0.7
    cfg = _config("sp", epochs=30, sp_decisions="gumbel", rate_loss=10.0, target_macs=target,
                  checkpoint_every=1000, gate_lr=0.05)
    train(cfg, tmp_path / "aig", data=DATA, progress=False)
    steps = _metric_lines(tmp_path / "aig")
    common = uniform_gate_rate(build_mac_table(load_model(tmp_path / "aig"), (12, 12)), target)
    assert 0.3 < common < 0.7
    assert sum(r["exec_rate"] for r in steps[-40:]) / 40 == pytest.approx(common, abs=0.08)
    assert sum(r["mac_fraction"] for r in steps[-40:]) / 40 == pytest.approx(target, abs=0.06)
    plain = _config("sp", epochs=30, checkpoint_every=1000, gate_lr=0.05)
    train(plain, tmp_path / "st", data=DATA, progress=False)
    assert sum(r["exec_rate"] for r in _metric_lines(tmp_path / "st")[-40:]) / 40 > common + 0.15


def test_calibrate_brings_greedy_compute_to_the_target(tmp_path, sp_run):
    target = 0.5
    # lr 0.01: with BatchNorm frozen at the SP statistics, 0.05 can diverge on this toy once blocks are skipped
    cfg = _config("calibrate", epochs=8, init=str(sp_run), target_macs=target, target_ramp=0.25,
                  threshold_gain=0.5, freeze_bn=True, lr=0.01)
    train(cfg, tmp_path / "cal", data=DATA, progress=False)
    steps = _metric_lines(tmp_path / "cal")
    assert steps[0]["greedy_mac_fraction"] > 0.9
    assert [r["target_mac_fraction"] for r in steps][8:] == pytest.approx([target] * (len(steps) - 8))
    # what inference spends: the saved model's greedy decisions, on the (unaugmented) training and test images.
    # (The toy's operating points per image are 1.0, 0.71 and 0.42 of the plain network: reaching 0.5 takes a
    # per-image mix; skipping everything, 0.42, is outside the tolerance.)
    model = load_model(tmp_path / "cal")
    for data in DATA:
        result = evaluate(model, BatchLoader(data, 32, train=False), tau=cfg.train.tau)
        assert result["macs_per_image"] / result["dense_macs_per_image"] == pytest.approx(target, abs=0.06)
    # the controller, not the optimiser, moved the gates' output bias
    before, after = load_checkpoint(sp_run)["model"], load_checkpoint(tmp_path / "cal")["model"]
    offset = load_checkpoint(tmp_path / "cal")["stage"]["threshold"]["offset"]
    torch.testing.assert_close(after["gates.fc.bias"] - before["gates.fc.bias"], torch.tensor([offset]))
    final = json.loads((tmp_path / "cal" / "final.json").read_text())
    assert final["mac_reduction"] > 20


def test_calibrate_freezes_the_gates_but_not_the_controlled_threshold(tmp_path, sp_run):
    # a gate learning rate is ignored: calibrate learns no routing
    cfg = _config("calibrate", epochs=1, init=str(sp_run), target_macs=0.5, freeze_bn=True, gate_lr=0.01,
                  gate_optimizer="adam")
    train(cfg, tmp_path / "frozen", data=DATA, progress=False)
    before, after = load_checkpoint(sp_run)["model"], load_checkpoint(tmp_path / "frozen")["model"]
    offset = load_checkpoint(tmp_path / "frozen")["stage"]["threshold"]["offset"]
    assert offset != 0
    for name, value in before.items():
        if name == "gates.fc.bias":
            torch.testing.assert_close(after[name] - value, torch.tensor([offset]))
        elif name.startswith("gates."):
            assert torch.equal(after[name], value), name
    assert not torch.equal(after["fc.weight"], before["fc.weight"])  # the backbone trains
    model = load_model(sp_run)
    optimizers = make_stage(cfg.train, model, model.mac_table((12, 12)), 4, torch.device("cpu")).build_optimizers()
    assert not any(p.requires_grad for p in model.gates.parameters())  # no gradients kept for frozen gates
    trained = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in model.named_parameters() if not n.startswith("gates.")}


def test_existing_run_folder_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    with pytest.raises(RunExistsError, match="overwrite"):
        train(_config("sp", epochs=0.25), run, data=DATA, progress=False)
    assert (run / "precious.txt").read_text() == "keep me"
    train(_config("sp", epochs=0.25), run, data=DATA, progress=False, overwrite=True)
    assert not (run / "precious.txt").exists()


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_make_stage = trainer.make_stage

    def stage_that_signals(*args, **kwargs):  # the signal arrives during the second step
        stage = real_make_stage(*args, **kwargs)
        real_loss = stage.loss

        def loss(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_loss(*a, **k)

        stage.loss = loss
        return stage

    monkeypatch.setattr(trainer, "make_stage", stage_that_signals)
    cfg = _config("sp", epochs=1.5, checkpoint_every=100)
    with pytest.raises(Interrupted, match="resume"):
        train(cfg, tmp_path / "run", data=DATA, progress=False)
    assert calls["n"] == 2 and load_checkpoint(tmp_path / "run")["step"] == 2
    monkeypatch.setattr(trainer, "make_stage", real_make_stage)
    train(cfg, tmp_path / "run", data=DATA, progress=False, resume=True)
    train(cfg, tmp_path / "straight", data=DATA, progress=False)
    _assert_same_weights(tmp_path / "run", tmp_path / "straight")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = _config("sp", epochs=3, lr=1e12, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train(cfg, tmp_path / "run", data=DATA, progress=False)
    payload = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_non_finite_loss_with_frozen_batchnorm_says_how_to_unfreeze_it(tmp_path, sp_run, freeze_bn):
    cfg = _config("calibrate", init=str(sp_run), lr=1e12, target_macs=0.6, freeze_bn=freeze_bn)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, tmp_path / "run", data=DATA, progress=False)
    assert ("train.freeze_bn=false" in str(err.value)) == freeze_bn


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_config": {}})

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "model_config": {}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind


def test_corrupt_truncated_and_mismatched_checkpoints_give_clear_errors(tmp_path, sp_run):
    good = sp_run / "checkpoints" / "last.pt"
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_model(tmp_path / name)
    torch.save({"something": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a skipnet checkpoint"):
        load_model(tmp_path / "foreign.pt")
    payload = load_checkpoint(good)
    payload["model"]["fc.weight"] = torch.zeros(7, 64)
    save_checkpoint(tmp_path / "mismatch.pt", payload)
    with pytest.raises(CheckpointError, match="shape mismatches.*fc.weight"):
        load_model(tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_overrides_are_typed_and_checked():
    with pytest.raises(ValueError, match="unknown option train.learning_rate"):
        load_config(None, ["train.learning_rate=0.1"])
    with pytest.raises(ValueError, match="not a valid int"):
        load_config(None, ["data.batch_size=many"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["lr=0.1"])
    with pytest.raises(ValueError, match="unknown recipe"):
        load_config("no_such_recipe")
    cfg = load_config("fashion_mnist_hrl", ["train.milestones=[1,2]", "train.target_macs=none"])
    assert cfg.train.milestones == (1.0, 2.0) and cfg.train.target_macs is None
    cfg = load_config("fashion_mnist_baseline", ["model.layout=[1,2,3]"])
    assert cfg.model.layout == (1, 2, 3)
    assert trainer.build_model(cfg, num_classes=10, in_channels=1).config.layout == (1, 2, 3)
    with pytest.raises(ValueError, match="whole numbers"):
        load_config(None, ["model.layout=[1,2.5,3]"])
    for over in (["model.layout=[1,2,3]"], ["model.depth=26"]):
        with pytest.raises(ValueError, match="not available to the sdv stage"):
            trainer.build_model(load_config("fashion_mnist_sdv", over), num_classes=10, in_channels=1)
    # a block set of no preset's depth: 7 blocks, depth 16, named by model.depth
    odd = trainer.build_model(load_config("fashion_mnist_baseline", ["model.layout=[1,3,3]", "model.depth=16"]),
                              num_classes=10, in_channels=1)
    assert (odd.config.depth, odd.config.layout, len(odd.blocks)) == (16, (1, 3, 3), 7)
    with pytest.raises(ValueError, match="model.depth"):
        trainer.build_model(load_config("fashion_mnist_baseline", ["model.layout=[1,3,3]"]), num_classes=10,
                            in_channels=1)
    with pytest.raises(ValueError, match="drop_rate applies to the sp"):
        load_config("fashion_mnist_hrl", ["train.drop_rate=0.1"])
    with pytest.raises(ValueError, match="drop_rate is a probability"):
        load_config(None, ["train.drop_rate=1"])
    with pytest.raises(ValueError, match="gate_lr 0 freezes the gates"):
        load_config("fashion_mnist_hrl", ["train.gate_lr=0"])
    with pytest.raises(ValueError, match="unknown option train.gate_gradient"):  # removed: stage calibrate
        load_config("fashion_mnist_hrl", ["train.gate_gradient=straight_through"])
    with pytest.raises(ValueError, match="stage 'calibrate' moves the threshold to target_macs"):
        load_config("fashion_mnist_calibrate", ["train.target_macs=none"])
    with pytest.raises(ValueError, match="drop_rate applies to the sp"):
        load_config("fashion_mnist_calibrate", ["train.drop_rate=0.1"])
    with pytest.raises(ValueError, match="explore is a mixing weight"):
        load_config("fashion_mnist_hrl", ["train.explore=1"])
    with pytest.raises(ValueError, match="baseline must be"):
        load_config("fashion_mnist_hrl", ["train.baseline=mean"])
    with pytest.raises(ValueError, match="schedule must be one of"):
        load_config(None, ["train.schedule=linear"])
    with pytest.raises(ValueError, match="gate_lr must be >= 0"):
        load_config(None, ["train.gate_lr=-1"])
    for bad in ("train.gate_lr=nan", "train.epochs=inf", "train.epochs=nan", "train.lr=nan", "train.alpha=-inf",
                "train.milestones=[1,nan]"):
        with pytest.raises(ValueError, match="finite"):
            load_config(None, [bad])
    for bad in ("train.checkpoint_every=0", "train.log_every=0"):
        with pytest.raises(ValueError, match="at least 1"):
            load_config(None, [bad])
    with pytest.raises(ValueError, match="not a valid int"):
        load_config(None, ["model.num_classes=2.5"])
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda"):
        load_config(None, ["train.device=tpu"])
    with pytest.raises(ValueError, match="budget 'per_gate' holds each gate"):
        load_config("fashion_mnist_hrl", ["train.budget=per_gate", "train.target_macs=none"])
    with pytest.raises(ValueError, match="set train.budget=per_gate"):
        load_config("fashion_mnist_hrl", ["train.gate_targets=[0.5,0.5]"])
    with pytest.raises(ValueError, match="gate_targets are execution rates"):
        load_config("fashion_mnist_hrl", ["train.budget=per_gate", "train.gate_targets=[0.5,1.5]"])
    cfg = load_config("fashion_mnist_hrl", ["train.budget=per_gate", "train.gate_targets=0.5,0.75"])
    assert cfg.train.gate_targets == (0.5, 0.75)


def test_lr_schedules():
    step = load_config(None, ["train.lr=0.1", "train.milestones=[1,2]", "train.warmup_steps=3",
                              "train.warmup_lr=0.01"]).train
    assert [trainer.lr_at(s, 10, step) for s in (0, 2, 3, 9, 10, 19, 20, 99)] == pytest.approx(
        [0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cos = load_config(None, ["train.lr=0.1", "train.schedule=cosine", "train.epochs=2", "train.warmup_steps=4"]).train
    assert trainer.lr_at(3, 10, cos) == cos.warmup_lr
    assert [trainer.lr_at(s, 10, cos) for s in (4, 12, 20)] == pytest.approx([0.1, 0.05, 0.0])
    # one cosine over two stages: SP runs its first 2 of 4 epochs, HRL the rest, and HRL starts where SP ended
    sp = load_config(None, ["train.schedule=cosine", "train.epochs=2", "train.cosine_epochs=4"]).train
    hrl = load_config(None, ["train.schedule=cosine", "train.epochs=2", "train.cosine_epochs=4",
                             "train.cosine_start=2"]).train
    assert trainer.lr_at(20, 10, sp) == pytest.approx(trainer.lr_at(0, 10, hrl)) == pytest.approx(0.05)
    assert trainer.lr_at(20, 10, hrl) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="must lie inside the cosine"):
        load_config(None, ["train.schedule=cosine", "train.epochs=3", "train.cosine_epochs=4", "train.cosine_start=2"])


PAPER_HRL = {"baseline": "none", "explore": 0.0, "target_macs": None, "skip_cap": None, "cost": "uniform",
             "rl_reduction": "sum", "rl_weight": 0.01, "lr": 1e-4, "gate_lr": None, "gate_optimizer": "sgd",
             "label_smoothing": 0.0}


@pytest.mark.parametrize("name", recipe_names())
def test_every_packaged_recipe_loads_and_builds(name):
    cfg = load_config(name)
    model = trainer.build_model(cfg, num_classes=10, in_channels=3)
    assert model.is_gated == (cfg.train.stage not in ("baseline", "act", "sact", "sdv"))  # (rivals: no gates)
    assert model.config.num_classes == (cfg.model.num_classes or 10)
    splits = dataset_info(cfg.data.name)["splits"]  # None: any folder of an imagefolder root
    assert splits is None or {cfg.data.train_split, cfg.data.test_split} <= set(splits)
    assert cfg.data.train_split != cfg.data.test_split
    if cfg.data.stream:
        assert cfg.data.name == "imagefolder"
    t = cfg.train
    if t.stage == "calibrate":  # BatchNorm frozen or live is the recipe's choice (live from the start of a cosine)
        assert t.target_macs is not None
    if name.endswith("_hrl_paper"):  # the paper's objective (SPEC §5), nothing of ours
        assert t.stage == "hrl"
        assert {k: getattr(t, k) for k in PAPER_HRL} == PAPER_HRL
        assert t.alpha == (0.01 if model.config.arch == "imagenet" else 0.1)
        # beta: 1 on CIFAR/SVHN, alpha / N on ImageNet
        assert t.beta == pytest.approx(t.alpha / model.num_gates if model.config.arch == "imagenet" else 1.0)


# --- the CLI over real idx files ----------------------------------------------------------------------------

def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    n, h, w = images.shape
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def test_cli_train_and_eval_json(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n in (("train", 64), ("t10k", 40)):
        _write_idx(root, prefix, rng.integers(0, 255, (n, 28, 28)), np.arange(n) % 10)
    run = tmp_path / "run"
    argv = ["train", "--recipe", "fashion_mnist_sp", "--data-root", str(root), "--model", "cifar_resnet8",
            "--epochs", "1", "--batch-size", "16", "--run-dir", str(run), "--no-progress",
            "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 0
    assert main(argv) == 2  # refuses to overwrite the run
    assert "exists" in capsys.readouterr().err
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy", "macs_per_image", "dense_macs_per_image", "mac_reduction", "block_fraction"):
        assert isinstance(result[key], float)
    assert result["images"] == 40
    assert main(["eval", str(tmp_path / "nothing.pt")]) == 2


def test_streamed_imagefolder_trains(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for cls in ("cat", "dog"):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            for i in range(n):
                size = (40 + i, 36)  # streaming accepts images of different sizes
                Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                    tmp_path / "img" / split / cls / f"{i}.png")
    cfg = load_config(None, ["model.name=cifar_resnet8", "data.name=imagefolder", f"data.root={tmp_path / 'img'}",
                             "data.stream=true", "data.workers=0", "data.image_size=32", "data.batch_size=4",
                             "data.eval_batch_size=4", "data.test_split=val", "train.epochs=1",
                             "train.eval_every=0", "train.channels_last=false"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["images"] == 8 and result["step"] == 4
    assert load_model(tmp_path / "run").config.num_classes == 2


def test_hrl_temperature_divides_the_gates_output_layer_once(tmp_path, sp_run):
    # lr 0: only the one-time division changes the gates; a resumed run must not divide again
    cfg = _config("hrl", epochs=1.5, init=str(sp_run), temperature=0.05, lr=0.0)
    train(cfg, tmp_path / "split", data=DATA, progress=False, max_steps=2)
    train(cfg, tmp_path / "split", data=DATA, progress=False, resume=True)
    before, after = load_checkpoint(sp_run)["model"], load_checkpoint(tmp_path / "split")["model"]
    for name in ("gates.fc.weight", "gates.fc.bias"):
        torch.testing.assert_close(after[name], before[name] / 0.05)
    torch.testing.assert_close(after["gates.proj.0.weight"], before["gates.proj.0.weight"])


def test_gates_compute_in_float32_under_bf16_autocast():
    # in bf16 a probability above ~0.998 rounds to exactly 1, and a sampled gate could never skip
    from skipnet import create_model

    torch.manual_seed(0)
    model = create_model("cifar_resnet8", gate="rnn", in_channels=1, num_classes=4).train()
    with torch.no_grad():
        model.gates.fc.weight.zero_()
        model.gates.fc.bias.fill_(6.5)  # p = 0.99850
    x = torch.randn(8, 1, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, "sample", generator=torch.Generator().manual_seed(0))
    assert out.probs.dtype == torch.float32 and out.log_probs.dtype == torch.float32
    torch.testing.assert_close(out.probs, torch.full_like(out.probs, torch.sigmoid(torch.tensor(6.5)).item()))
    assert bool((out.probs < 1).all())


def test_hrl_without_init_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="train.init"):
        train(_config("hrl", epochs=1), tmp_path / "run", data=DATA, progress=False)
    assert not (tmp_path / "run").exists()


# --- run folders: one owner, the checkpoint's config, nothing left by a failed start --------------------------

def test_a_run_folder_has_one_owner_at_a_time(tmp_path):
    from skipnet.train import RunBusyError
    from skipnet.train.runs import RunLock

    run = tmp_path / "run"
    train(_config("sp", epochs=0.5), run, data=DATA, progress=False)
    holder = RunLock(run)  # another process's run (flock locks conflict between open files, even in one process)
    try:
        for kwargs in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(RunBusyError, match=f"PID {os.getpid()}"):
                train(_config("sp", epochs=0.5), run, data=DATA, progress=False, **kwargs)
        assert load_checkpoint(run)["step"] == 2  # untouched
    finally:
        holder.release()
    train(_config("sp", epochs=0.5), run, data=DATA, progress=False, overwrite=True)  # free again


def test_a_running_train_holds_the_lock_against_the_cli(tmp_path, capsys):
    import subprocess
    import sys

    run = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from skipnet.train.runs import RunLock; "
            "RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert main(["train", "--recipe", "fashion_mnist_sp", "--run-dir", str(run), "--overwrite"]) == 2
        assert f"in use by another process (PID {proc.pid})" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def test_resume_uses_the_checkpoints_config_and_refuses_a_changed_one(tmp_path):
    run = tmp_path / "run"
    cfg = _config("sp", epochs=1.5, drop_rate=0.2)
    train(cfg, run, data=DATA, progress=False, max_steps=2)
    full = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(full.split("train:")[0])  # cut short, still valid YAML
    with pytest.raises(CheckpointError, match=r"disagrees with its checkpoint.*train.epochs"):
        train(None, run, data=DATA, progress=False, resume=True)
    assert (run / "config.yaml").read_text() == full.split("train:")[0]  # not rewritten
    (run / "config.yaml").unlink()  # a missing config.yaml is restored from the checkpoint
    with pytest.raises(ValueError, match="differs from the one given"):
        train(_config("sp", epochs=3, drop_rate=0.2), run, data=DATA, progress=False, resume=True)
    result = train(None, run, data=DATA, progress=False, resume=True)
    assert result["step"] == 6 and result["finished"] and (run / "config.yaml").read_text() == full
    assert load_checkpoint(run)["run_config"]["train"]["drop_rate"] == 0.2


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    run = tmp_path / "run"
    first = train(_config("sp", epochs=0.5), run, data=DATA, progress=False)
    before = {p.name: p.read_bytes() for p in (run / "metrics.jsonl", run / "final.json")}
    again = train(None, run, data=DATA, progress=False, resume=True)
    assert again == first and {p: (run / p).read_bytes() for p in before} == before


def test_a_start_that_fails_leaves_nothing_that_blocks_its_retry(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="no full batch"):
        train(_config("sp", epochs=1), run, data=(_data(8, 0), _data(8, 1)), progress=False)
    assert not run.exists()
    with pytest.raises(NonFiniteLossError, match="No checkpoint had been written"):
        train(_config("sp", epochs=1, lr=1e30, checkpoint_every=100), run, data=DATA, progress=False)
    assert not run.exists()
    run.mkdir()  # a folder the user made stays, empty
    with pytest.raises(ValueError, match="no full batch"):
        train(_config("sp", epochs=1), run, data=(_data(8, 0), _data(8, 1)), progress=False)
    assert run.is_dir() and not any(run.iterdir())
    train(_config("sp", epochs=0.5), run, data=DATA, progress=False)  # the corrected command runs


def test_checkpoint_files_are_as_readable_as_the_rest_of_the_run(tmp_path):
    run = tmp_path / "run"
    train(_config("sp", epochs=0.5), run, data=DATA, progress=False)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (run / "config.yaml", run / "checkpoints" / "last.pt")}
    assert modes["last.pt"] == modes["config.yaml"]


def test_a_full_disk_while_checkpointing_is_one_clear_error(tmp_path):
    import subprocess
    import sys

    # a file-size limit makes the write fail as a full disk does (EFBIG instead of ENOSPC)
    code = """if True:
        import resource, signal, sys, torch
        from skipnet.train.checkpoint import save_checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        save_checkpoint(sys.argv[1], {"model": {"w": torch.ones(10)}, "model_config": {}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
        try:
            save_checkpoint(sys.argv[1], {"model": {"w": torch.ones(100000)}, "model_config": {}})
        except OSError as err:
            print(type(err).__name__, err)
    """
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "last.pt")], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out.startswith("CheckpointWriteError could not write checkpoint") and "is intact" in out
    assert "\n" not in out
    assert load_checkpoint(tmp_path / "last.pt")["model"]["w"].shape == (10,)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_a_model_of_another_class_count_than_the_data_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="model.num_classes is 3 but the data has 4"):
        train(load_config(None, ["model.name=cifar_resnet8", "model.num_classes=3", "data.batch_size=16"]),
              tmp_path / "run", data=DATA, progress=False)
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: [\n")
    with pytest.raises(ValueError, match=r"not valid YAML \(line"):
        load_config(bad)
    assert main(["train", "--recipe", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_progress_in_a_log_file_is_a_few_plain_lines(tmp_path, capsys):
    import io

    from skipnet.progress import LineProgress

    out = io.StringIO()
    bar = LineProgress(100, desc="sp toy", every=0.0, stream=out)
    bar.set_postfix(loss="1.000")
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("sp toy: 1/100 steps (1%)") and "loss=1.000" in lines[0]
    train(_config("sp", epochs=1.5), tmp_path / "run", data=DATA, progress=True)  # stderr is not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err and 1 <= len([ln for ln in err.splitlines() if "steps" in ln]) <= 3


def _jpeg_folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, cls in enumerate(("n01", "n02")):
            (root / split / cls).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8) + np.uint8(120 * c)
                Image.fromarray(img).save(root / split / cls / f"{i}.JPEG", quality=90)
    return root


def test_imagenet_recipes_run_end_to_end_on_jpegs_of_mixed_sizes(tmp_path):
    root = _jpeg_folder(tmp_path / "imagenet", [(60, 48), (48, 64), (80, 52), (50, 50)])
    small = [f"data.root={root}", "data.workers=0", "data.image_size=32", "data.batch_size=4",
             "data.eval_batch_size=4", "model.name=resnet18", "train.channels_last=false", "train.eval_every=0"]
    sp = load_config("imagenet_sp", small + ["train.epochs=1"])
    hrl = load_config("imagenet_hrl_paper", small + ["train.epochs=1", f"train.init={tmp_path / 'sp'}"])
    # the paper's schedules, as written in the recipes
    assert [trainer.lr_at(e * 10, 10, load_config("imagenet_sp").train) for e in (0, 29.9, 30, 60)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.001])
    paper_hrl = load_config("imagenet_hrl_paper").train
    assert [trainer.lr_at(e * 10, 10, paper_hrl) for e in (0, 30)] == pytest.approx([1e-4, 1e-5])
    assert paper_hrl.temperature == 0.05 and paper_hrl.epochs == 40
    assert train(sp, tmp_path / "sp", progress=False)["images"] == 8
    result = train(hrl, tmp_path / "hrl", progress=False)
    assert result["images"] == 8 and result["finished"] and load_model(tmp_path / "hrl").config.num_classes == 2


def test_fit_tau_bisects_stops_when_close_and_measures_the_ends_only_when_needed(monkeypatch):
    from skipnet.train import operating

    calls = []

    def fraction(model, images, tau):  # falls with tau, as a network's MACs do; in steps of 0.01 below 0.9
        calls.append(tau)
        return 1.0 - (round(tau, 2) if 0.1 < tau < 0.9 else tau)

    monkeypatch.setattr(operating, "greedy_mac_fraction", fraction)
    gated = SimpleNamespace(is_gated=True)
    assert operating.fit_tau(gated, [], 0.5, tol=0.1) == (0.5, 0.5) and calls == [0.5]  # one pass
    calls.clear()
    tau, got = operating.fit_tau(gated, [], 0.7)
    assert abs(got - 0.7) <= 5e-4 and abs(tau - 0.3) < 0.006 and len(calls) < 12 and 0.01 not in calls
    calls.clear()
    assert operating.fit_tau(gated, [], 1.5) == (0.01, 0.99) and len(calls) == 12 + 2  # beyond lo: lo itself
    calls.clear()
    assert operating.fit_tau(gated, [], 0.0, iterations=4)[0] == 0.99 and calls[-2:] == [0.01, 0.99]


def test_fit_tau_puts_greedy_compute_at_the_target_on_training_images(tmp_path, sp_run):
    from skipnet.train.operating import fit_tau, greedy_mac_fraction

    model = load_model(sp_run)
    with torch.no_grad():  # graded, image-dependent gate probabilities around 0.5
        model.gates.fc.bias.sub_(model.gates.fc.bias.mean())
    images = [x for x, _ in BatchLoader(DATA[0], 32, train=False)]
    span = [greedy_mac_fraction(model, images, t) for t in (0.01, 0.99)]
    target = 0.5 * (span[0] + span[1])
    tau, fraction = fit_tau(model, images, target)
    assert fraction == greedy_mac_fraction(model, images, tau)
    with torch.no_grad():  # measured by the compact executor: the masked one's MACs
        masked = sum(float(model(x, "greedy", tau=tau).macs.double().sum()) for x in images)
    plain = model.mac_table(tuple(images[0].shape[-2:])).plain
    assert fraction == pytest.approx(masked / sum(len(x) for x in images) / plain)
    assert fit_tau(model, images, target, tol=1.0) == (0.5, greedy_mac_fraction(model, images, 0.5))
    assert span[0] - span[1] > 0.3 and abs(fraction - target) < 0.1 and 0.01 < tau < 0.99, (span, tau, fraction)

    cfg = _config("hrl", epochs=1, init=str(sp_run), target_macs=0.7, fit_tau=True, fit_images=40)
    result = train(cfg, tmp_path / "hrl", data=DATA, progress=False)
    payload = load_checkpoint(tmp_path / "hrl")
    assert payload["tau"] == result["tau"] and result["tau"] != 0.5
    first40 = [x for x, _ in BatchLoader(DATA[0], 32, train=False)]
    first40[1] = first40[1][:8]
    assert fit_tau(load_model(tmp_path / "hrl"), first40, 0.7)[0] == result["tau"]  # measured on those images
