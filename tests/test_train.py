"""Training runs: stages, exact resume, safe run folders and checkpoints, the CLI."""

import gzip
import json
import os
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import skipnet.train.trainer as trainer
from skipnet.cli import main
from skipnet.data import ImageData
from skipnet.train import (
    CheckpointError,
    Interrupted,
    NonFiniteLossError,
    RunExistsError,
    load_checkpoint,
    load_config,
    load_model,
    save_checkpoint,
    train,
)
from skipnet.train.trainer import build_optimizers


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


@pytest.mark.parametrize("stage,extra", [
    ("sp", {}),
    ("sp", {"drop_rate": 0.3}),  # random skips: a function of (seed, step)
    ("baseline", {}),
    ("hrl", {"target_macs": 0.5, "gate_gradient": "straight_through", "gate_optimizer": "adam", "gate_lr": 0.01,
             "threshold_gain": 0.5}),
    ("hrl", {"target_macs": 0.5, "baseline": "ema", "gate_optimizer": "adam", "gate_lr": 0.01, "cost": "macs",
             "freeze_bn": True, "rl_reduction": "mean", "rl_weight": 1.0}),
])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, sp_run, stage, extra):
    if stage == "hrl":
        extra = {**extra, "init": str(sp_run)}
    cfg = _config(stage, epochs=1.5, **extra)  # 4 steps per epoch, 6 steps
    train(cfg, tmp_path / "straight", data=DATA, progress=False)
    train(cfg, tmp_path / "split", data=DATA, progress=False, max_steps=3)  # stops mid-epoch
    assert load_checkpoint(tmp_path / "split")["step"] == 3
    train(cfg, tmp_path / "split", data=DATA, progress=False, resume=True)
    _assert_same_weights(tmp_path / "straight", tmp_path / "split")
    if stage == "hrl":
        a, b = (load_checkpoint(tmp_path / r) for r in ("straight", "split"))
        assert a["controller"] == pytest.approx(b["controller"]) and a["threshold"] == pytest.approx(b["threshold"])
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated lines after the resume


def test_hrl_controller_lowers_compute_towards_the_target(tmp_path, sp_run):
    cfg = _config("hrl", epochs=3, init=str(sp_run), target_macs=0.3, alpha=2.0, alpha_lr=5.0, gate_lr=0.05,
                  gate_optimizer="adam", baseline="ema", cost="macs", rl_weight=1.0, rl_reduction="mean")
    train(cfg, tmp_path / "hrl", data=DATA, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "hrl" / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["mac_fraction"] for r in lines if "mac_fraction" in r]
    assert fractions[-1] < fractions[0]


def test_threshold_controller_brings_greedy_compute_to_the_target(tmp_path, sp_run):
    cfg = _config("hrl", epochs=8, init=str(sp_run), target_macs=0.5, target_ramp=0.25, threshold_gain=0.5,
                  gate_lr=0.01, gate_optimizer="adam", gate_gradient="straight_through", freeze_bn=True)
    train(cfg, tmp_path / "st", data=DATA, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "st" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "mac_fraction" in r]
    # the training decisions are the inference decisions, so the controller measures what inference spends
    assert [r["mac_fraction"] for r in steps] == pytest.approx([r["greedy_mac_fraction"] for r in steps])
    assert steps[0]["greedy_mac_fraction"] > 0.9
    assert [r["target_mac_fraction"] for r in steps][8:] == pytest.approx([0.5] * (len(steps) - 8))
    assert sum(r["greedy_mac_fraction"] for r in steps[-8:]) / 8 == pytest.approx(0.5, abs=0.15)
    # the controller, not the optimiser, moved the gates' output bias
    before, after = load_checkpoint(sp_run)["model"], load_checkpoint(tmp_path / "st")["model"]
    offset = load_checkpoint(tmp_path / "st")["threshold"]["offset"]
    torch.testing.assert_close(after["gates.fc.bias"] - before["gates.fc.bias"], torch.tensor([offset]))
    final = json.loads((tmp_path / "st" / "final.json").read_text())
    assert final["mac_reduction"] > 20


def test_gate_lr_zero_freezes_the_gates_but_not_the_controlled_threshold(tmp_path, sp_run):
    cfg = _config("hrl", epochs=1, init=str(sp_run), target_macs=0.5, gate_lr=0.0, freeze_bn=True,
                  gate_gradient="straight_through")
    train(cfg, tmp_path / "frozen", data=DATA, progress=False)
    before, after = load_checkpoint(sp_run)["model"], load_checkpoint(tmp_path / "frozen")["model"]
    offset = load_checkpoint(tmp_path / "frozen")["threshold"]["offset"]
    assert offset != 0
    for name, value in before.items():
        if name == "gates.fc.bias":
            torch.testing.assert_close(after[name] - value, torch.tensor([offset]))
        elif name.startswith("gates."):
            assert torch.equal(after[name], value), name
    assert not torch.equal(after["fc.weight"], before["fc.weight"])  # the backbone trains
    model = load_model(sp_run)
    build_optimizers(model, cfg.train)
    assert not any(p.requires_grad for p in model.gates.parameters())  # no gradients kept for frozen gates


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
    real_step = trainer.train_step

    def step_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    cfg = _config("sp", epochs=1.5, checkpoint_every=100)
    with pytest.raises(Interrupted, match="resume"):
        train(cfg, tmp_path / "run", data=DATA, progress=False)
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    monkeypatch.setattr(trainer, "train_step", real_step)
    train(cfg, tmp_path / "run", data=DATA, progress=False, resume=True)
    train(cfg, tmp_path / "straight", data=DATA, progress=False)
    _assert_same_weights(tmp_path / "run", tmp_path / "straight")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = _config("sp", epochs=3, lr=1e12, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train(cfg, tmp_path / "run", data=DATA, progress=False)
    payload = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())


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
    cfg = load_config("fashion_mnist_hrl_reinforce", ["train.milestones=[1,2]", "train.target_macs=none"])
    assert cfg.train.milestones == (1.0, 2.0) and cfg.train.target_macs is None
    with pytest.raises(ValueError, match="drop_rate applies to the sp stage only"):
        load_config("fashion_mnist_hrl", ["train.drop_rate=0.1"])
    with pytest.raises(ValueError, match="drop_rate is a probability"):
        load_config(None, ["train.drop_rate=1"])
    with pytest.raises(ValueError, match="gate_lr 0 freezes the gates"):
        load_config("fashion_mnist_hrl_reinforce", ["train.gate_lr=0"])
    with pytest.raises(ValueError, match="gate_lr must be >= 0"):
        load_config(None, ["train.gate_lr=nan"])


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
