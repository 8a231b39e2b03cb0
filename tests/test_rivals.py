"""The rivals (SPEC §10): ACT and SACT halting, random skipping (SDV), their MACs and their training runs."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from skipnet.cost import residual_convs, sparse_block_macs
from skipnet.data import BatchLoader, ImageData
from skipnet.infer import rivals as compact_rivals
from skipnet.infer.rivals import run_unit_at
from skipnet.models import BasicBlock, Bottleneck
from skipnet.models.act import SpatialHaltingUnit, halting_distribution
from skipnet.models.rivals import RivalConfig, create_rival
from skipnet.reporting import run_label, run_series
from skipnet.train import load_checkpoint, load_config, load_model, train
from skipnet.train.evaluate import evaluate
from skipnet.train.losses import ponder_loss


def _macs_by_flop_counter(model, x, **kw) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, **kw)
    return counter.get_total_flops() / 2


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode with non-trivial BatchNorm statistics and halting units that halt at different units for
    different images (and positions)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    for stage in getattr(model, "halting", []):
        for unit in stage:
            nn.init.normal_(unit.fc.weight, std=2.0)
            if isinstance(unit, SpatialHaltingUnit):
                nn.init.normal_(unit.conv.weight, std=0.3)
                nn.init.constant_(unit.conv.bias, -0.5)
            else:
                nn.init.constant_(unit.fc.bias, -0.5)
    return model.eval()


# --- the halting arithmetic, by hand --------------------------------------------------------------------------

def test_halting_matches_hand_computed_cases_and_the_ponder_gradient_flows_through_R_only():
    h = torch.tensor([[0.3, 0.5, 0.4],     # sum reaches 1.2 at unit 3: N 3, R = 1 - 0.8
                      [0.995, 0.2, 0.1],   # 0.995 >= 0.99 at once: N 1, R 1
                      [0.1, 0.1, 0.1],     # never: the last unit halts, N 4, R 0.7
                      [0.5, 0.495, 0.9]],  # 0.995 at unit 2: N 2, R 0.5
                     requires_grad=True)
    halt = halting_distribution(h, eps=0.01)
    assert halt.units.tolist() == [3, 1, 4, 2]
    torch.testing.assert_close(halt.remainder, torch.tensor([0.2, 1.0, 0.7, 0.5]))
    torch.testing.assert_close(halt.weights, torch.tensor([[0.3, 0.5, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0],
                                                          [0.1, 0.1, 0.1, 0.7], [0.5, 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(halt.ponder, torch.tensor([3.2, 2.0, 4.7, 2.5]))
    halt.ponder.sum().backward()  # d(N + R)/dh^l = -1 for the units before the halting one, 0 elsewhere
    torch.testing.assert_close(h.grad, torch.tensor([[-1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0],
                                                     [-1.0, 0.0, 0.0]]))
    # eps moves the threshold: with 0.2, 0.3 + 0.5 = 0.8 already halts
    assert halting_distribution(h.detach()[:1], eps=0.2).units.tolist() == [2]
    # per position (SACT): the same arithmetic on any leading shape; a one-unit stage always has N 1, R 1
    maps = halting_distribution(h.detach().view(2, 2, 1, 3))
    assert maps.units.flatten().tolist() == [3, 1, 4, 2]
    single = halting_distribution(torch.zeros(2, 0))
    assert single.units.tolist() == [1, 1] and single.ponder.tolist() == [2.0, 2.0]


def test_ponder_loss_is_ce_plus_tau_times_the_mean_ponder_cost():
    ce = torch.tensor([1.0, 3.0], requires_grad=True)
    ponder = torch.tensor([4.0, 6.0], requires_grad=True)
    loss = ponder_loss(ce, ponder, tau=0.1)
    torch.testing.assert_close(loss.total, torch.tensor(2.0 + 0.5))
    loss.total.backward()
    torch.testing.assert_close(ponder.grad, torch.tensor([0.05, 0.05]))
    torch.testing.assert_close(ce.grad, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError):
        ponder_loss(ce, ponder, tau=-1.0)


# --- ACT: compact inference == the dense halting computation; MACs == the flop counter --------------------------

@pytest.mark.parametrize("name,size", [("cifar_resnet20", 8), ("resnet18", 32)])
def test_act_compact_runner_equals_the_dense_halting_computation(name, size):
    torch.manual_seed(0)
    model = _randomise(create_rival("act", name, num_classes=5))
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        dense, compact = model(x), model(x, executor="compact")
    assert dense.units.min() < dense.units.max()  # images halted at different units
    assert dense.macs.min() < dense.macs.max()
    assert torch.equal(dense.units, compact.units) and torch.equal(dense.decisions, compact.decisions)
    torch.testing.assert_close(compact.logits, dense.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compact.ponder, dense.ponder)
    torch.testing.assert_close(compact.macs, dense.macs, rtol=0, atol=0)
    for b in range(3):  # the compact runner computes exactly what is charged: blocks run + halting units
        assert _macs_by_flop_counter(model, x[b:b + 1], executor="compact") == compact.macs[b].item()
    with pytest.raises(ValueError, match="eval"):
        model.train()(x, executor="compact")


def test_every_act_and_sact_parameter_gets_a_gradient_in_training():
    for method in ("act", "sact"):
        model = create_rival(method, "cifar_resnet14", num_classes=3, in_channels=1).train()
        out = model(torch.randn(4, 1, 8, 8))
        (out.logits.square().mean() + out.ponder.mean()).backward()
        assert all(p.grad is not None for p in model.parameters()), method
        assert out.ponder.requires_grad and out.decisions.shape == (4, model.num_gates)


# --- SACT: per-position MACs -----------------------------------------------------------------------------------

def test_sparse_block_macs_charge_the_receptive_field_by_hand():
    block = BasicBlock(4, 4)
    convs = [block.conv1, block.conv2]
    centre = torch.zeros(1, 5, 5, dtype=torch.bool)
    centre[0, 2, 2] = True  # conv2 at 1 position, conv1 on its 3x3 neighbourhood: (1 + 9) x 4 x 4 x 9
    corner = torch.zeros(1, 5, 5, dtype=torch.bool)
    corner[0, 0, 0] = True  # the neighbourhood clipped to the image: 4 positions
    assert sparse_block_macs(convs, torch.cat([centre, corner])).tolist() == [1440.0, 720.0]
    bottleneck = Bottleneck(16, 4)  # 1x1 (16->4) on the neighbourhood, 3x3 (4->4) and 1x1 (4->16) at the position
    assert sparse_block_macs([bottleneck.conv1, bottleneck.conv2, bottleneck.conv3], centre).item() == \
        9 * 64 + 144 + 64


@pytest.mark.parametrize("block", [BasicBlock(8, 8), Bottleneck(16, 4)], ids=["basic", "bottleneck"])
def test_a_unit_run_at_fixed_positions_equals_the_dense_unit_there_and_costs_what_is_charged(block):
    _randomise(block, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, block.conv1.in_channels, 6, 7, generator=g).relu()
    active = torch.rand(3, 6, 7, generator=g) < torch.tensor([0.0, 0.3, 1.0]).view(3, 1, 1)  # none, some, all
    with torch.no_grad():
        want = torch.where(active.unsqueeze(1), block(x), x)  # a halted position keeps its value
        with FlopCounterMode(display=False) as counter:
            got = run_unit_at(block, x, active)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert counter.get_total_flops() / 2 == sparse_block_macs(residual_convs(block), active).sum().item()


def test_sact_macs_match_the_flop_counter_on_fixed_ponder_maps_and_compact_equals_dense(monkeypatch):
    torch.manual_seed(0)
    model = _randomise(create_rival("sact", "cifar_resnet20", num_classes=5), seed=3)
    x = torch.randn(2, 3, 8, 8)
    # fixed ponder maps: each halting unit computes as usual (its MACs are counted) but returns a given map;
    # the compact runner's gathered halting (at the active positions) goes through the same pinned forward
    gathered = compact_rivals.spatial_halting_at
    monkeypatch.setattr(compact_rivals, "spatial_halting_at", lambda unit, x, active: unit.forward(x, active))
    g = torch.Generator().manual_seed(4)
    fixed = {}
    for s, stage in enumerate(model.halting):
        for k, unit in enumerate(stage):
            size = 8 >> s
            fixed[s, k] = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (2, size, size), generator=g)]

            def pinned(x, active=None, _orig=unit.forward, _unit=unit, _map=fixed[s, k]):
                h = _orig(x) if active is None else gathered(_unit, x, active)
                m = _map[: x.shape[0]]
                return h * 0 + (m if active is None else torch.where(active, m, torch.zeros_like(m)))

            unit.forward = pinned
    with torch.no_grad():
        dense, compact = model(x), model(x, executor="compact")
    for s in range(3):  # the ponder map N + R by hand: N 1 where h^1 = 1, 2 where h^1 + h^2 >= 0.99, else 3
        h1, h2 = fixed[s, 0], fixed[s, 1]
        want = torch.where(h1 >= 0.99, 2.0, torch.where(h1 + h2 >= 0.99, 3.0 - h1, 4.0 - h1 - h2))
        for out in (dense, compact):
            torch.testing.assert_close(out.ponder_maps[s], want)
    torch.testing.assert_close(compact.logits, dense.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compact.macs, dense.macs, rtol=0, atol=0)
    torch.testing.assert_close(compact.ponder, dense.ponder)
    # (the pinned maps are per batch position: image 0 alone gets its own map)
    assert _macs_by_flop_counter(model, x[:1], executor="compact") == compact.macs[0].item()
    assert compact.macs.max() < model.mac_table((8, 8)).plain  # positions halted early


def test_sact_on_the_torchvision_layout_bottleneck_compact_equals_dense():
    torch.manual_seed(0)
    model = _randomise(create_rival("sact", "resnet50", num_classes=4), seed=5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        dense, compact = model(x), model(x, executor="compact")
    # positions halt at different units in some stage (a fractional mean), so the gathered path is exercised
    assert ((dense.units - dense.units.round()).abs() > 1e-6).any(), dense.units
    torch.testing.assert_close(compact.logits, dense.logits, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(compact.macs, dense.macs, rtol=0, atol=0)
    assert _macs_by_flop_counter(model, x, executor="compact") == compact.macs[0].item()


# --- SDV ---------------------------------------------------------------------------------------------------------

def test_sdv_skips_at_its_rate_in_training_and_inference_and_compact_equals_masked():
    torch.manual_seed(0)
    model = _randomise(create_rival("sdv", "cifar_resnet14", drop_rate=0.4, num_classes=3))
    x = torch.randn(300, 3, 4, 4)
    with torch.no_grad():
        out = model(x)
    assert abs(out.decisions.mean().item() - 0.6) < 0.05
    table = model.mac_table((4, 4))
    torch.testing.assert_close(out.macs, table.per_image(out.decisions))
    d = torch.bernoulli(torch.full((6, model.num_gates), 0.5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        masked, compact = model(x[:6], decisions=d), model(x[:6], decisions=d, executor="compact")
    torch.testing.assert_close(compact.logits, masked.logits, rtol=1e-4, atol=1e-5)
    for b in range(2):
        assert _macs_by_flop_counter(model, x[b:b + 1], decisions=d[b:b + 1], executor="compact") == \
            masked.macs[b].item()
    # an evaluation draws its skips from its seed: the same seed gives the same result, another seed others
    batches = [(x[i:i + 100], torch.arange(100) % 3) for i in range(0, 300, 100)]
    runs = [evaluate(model, batches, executor=ex, seed=s) for ex, s in (("masked", 0), ("compact", 0), ("masked", 1))]
    assert runs[0]["exec_rates"] == runs[1]["exec_rates"] and runs[0]["accuracy"] == runs[1]["accuracy"]
    assert runs[0]["exec_rates"] != runs[2]["exec_rates"]
    with pytest.raises(ValueError, match="drop_rate"):
        RivalConfig(method="sdv", depth=14)


# --- training, checkpoints, evaluation, the command line, the trade-off labels -----------------------------------

def _data(n: int, seed: int) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    images[:, :, 2:6, 2:6] += (labels * 60).to(torch.uint8).view(-1, 1, 1, 1)
    return ImageData(images=images, labels=labels, classes=list("abc"), mean=(0.3,), std=(0.25,), name="toy")


@pytest.mark.parametrize("method,extra", [("act", ["train.ponder_cost=0.05"]), ("sact", []),
                                          ("sdv", ["train.drop_rate=0.3"])])
def test_a_rival_trains_saves_loads_and_evaluates(tmp_path, method, extra):
    config = load_config(None, [f"train.stage={method}", "model.name=cifar_resnet14", "data.batch_size=16",
                                "data.eval_batch_size=32", "data.crop_padding=1", "train.lr=0.05",
                                "train.eval_every=0", "train.log_every=1", "train.channels_last=false",
                                "train.epochs=1", *extra])
    data = (_data(32, 0), _data(32, 1))
    result = train(config, tmp_path / method, data=data, progress=False)
    for key in ("accuracy", "macs_per_image", "dense_macs_per_image", "mac_reduction", "block_fraction"):
        assert isinstance(result[key], float), key
    assert result["mode"] == method and result["finished"]
    lines = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert len(steps) == 2 and (("ponder" in steps[0]) == (method != "sdv"))
    model = load_model(tmp_path / method)
    assert model.method == method and not model.is_gated
    if method != "sdv":  # deterministic: the compact runner gives the run's own numbers
        again = evaluate(model, BatchLoader(data[1], 32, train=False), executor="compact")
        assert again["macs_per_image"] == pytest.approx(result["macs_per_image"])
    payload = load_checkpoint(tmp_path / method)
    assert run_series(payload).startswith(method.upper())
    assert run_label(payload) == ("d=0.3" if method == "sdv" else
                                  f"ponder τ={0.05 if method == 'act' else 0.01:g}")


def test_a_rival_starts_from_a_plain_resnets_weights(tmp_path):
    from skipnet.models import create_model
    from skipnet.train.checkpoint import save_checkpoint
    from skipnet.train.trainer import init_from

    source = create_model("cifar_resnet14", gate="none")
    save_checkpoint(tmp_path / "plain.pt", {"model_config": source.config.to_dict(), "model": source.state_dict()})
    act = create_rival("act", "cifar_resnet14")
    halting = {k: v.clone() for k, v in act.state_dict().items() if k.startswith("halting.")}
    init_from(act, str(tmp_path / "plain.pt"))
    torch.testing.assert_close(act.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    for k, v in halting.items():
        torch.testing.assert_close(act.state_dict()[k], v)  # fresh halting units kept
    with pytest.raises(ValueError, match="missing"):
        init_from(create_rival("sdv", "cifar_resnet20", drop_rate=0.2), str(tmp_path / "plain.pt"))


def test_a_torchvision_resnets_weights_load_into_a_rival():
    import torchvision

    from skipnet.models.rivals import rival_from_torchvision

    tv = torchvision.models.resnet18(num_classes=7).eval()
    act = rival_from_torchvision("act", tv).eval()
    torch.testing.assert_close(act.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    assert act.config.num_classes == 7 and len(act.halting[0]) == 1
    with torch.no_grad():  # halting never reached (scores ~0.05): every unit runs, the last one weighted by R
        assert act(torch.randn(1, 3, 32, 32)).units.tolist() == [[2, 2, 2, 2]]


def test_rival_config_keys_are_checked():
    with pytest.raises(ValueError, match="drop_rate"):
        load_config(None, ["train.stage=sdv"])
    with pytest.raises(ValueError, match="drop_rate"):
        load_config(None, ["train.stage=act", "train.drop_rate=0.2"])
    with pytest.raises(ValueError, match="ponder_cost"):
        load_config(None, ["train.stage=act", "train.ponder_cost=-1"])
    with pytest.raises(ValueError, match="halt_eps"):
        load_config(None, ["train.stage=act", "model.halt_eps=1.5"])


def test_train_method_shortcut_sets_the_stage_and_picks_the_rivals_recipe(monkeypatch, tmp_path, capsys):
    import skipnet.train
    from skipnet.cli import main

    seen = {}
    monkeypatch.setattr(skipnet.train, "train", lambda config, run_dir, **kw: seen.update(config=config) or {})
    assert main(["train", "--recipe", "fashion_mnist_sact", "--method", "act", "--run-dir", str(tmp_path / "r")]) == 0
    assert seen["config"].train.stage == "act"
    # without --recipe, the method picks its own recipe for the data, at the SkipNet recipes' budget
    assert main(["train", "--method", "act", "--run-dir", str(tmp_path / "a")]) == 0
    c = seen["config"]
    assert (c.train.stage, c.train.epochs, c.train.ponder_cost, c.data.name) == ("act", 4.0, 0.01, "fashion_mnist")
    assert main(["train", "--method", "sdv", "--data", "cifar10", "--run-dir", str(tmp_path / "b")]) == 0
    c = seen["config"]
    assert (c.train.stage, c.train.epochs, c.model.name, c.data.name) == ("sdv", 40.0, "cifar_resnet38", "cifar10")
    assert main(["train", "--method", "sact", "--data", "svhn", "--run-dir", str(tmp_path / "c")]) == 2
    assert "no sact recipe for data 'svhn'" in capsys.readouterr().err
    for argv in (["--method", "act", "--stage", "sp"], ["--method", "hrl"]):  # one stage; rivals only
        with pytest.raises(SystemExit):
            main(["train", *argv, "--run-dir", str(tmp_path / "d")])


def test_bench_rivals_times_the_plain_network_and_both_executions():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rivals.py"
    spec = importlib.util.spec_from_file_location("bench_rivals", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = create_rival("act", "cifar_resnet8", num_classes=3)
    rows = bench.bench_rival(model, torch.randn(3, 3, 8, 8), [2], budget_s=0.003, min_images=4)
    assert [(r["executor"], r["draws"]) for r in rows] == [("plain", 2), ("masked", 2), ("compact", 2)]
    assert all(r["latency_ms_p50"] > 0 and r["ideal_speedup"] > 0 for r in rows)
    from skipnet.bench import run_bench
    with pytest.raises(ValueError, match="bench_rivals.py"):  # SkipNet's benchmark points a rival to its own
        run_bench(model)
