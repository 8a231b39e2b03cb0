"""End-to-end: a tiny trained checkpoint gets a report, a sweep, and the demo runs through."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from skipnet import create_model
from skipnet.cli import main
from skipnet.demo import plain_reference, run_demo
from skipnet.reporting import (
    LEARNED_SET_SERIES,
    carry_recorded,
    matched_block_set,
    plot_table,
    run_label,
    run_series,
    static_block_set,
    sweep_markdown,
)
from skipnet.train import save_checkpoint

from .test_train import _write_idx


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("fmnist")
    for prefix, n in (("train", 160), ("t10k", 48)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 80, (n, 28, 28))
        images[:, 8:20, 8:20] += labels[:, None, None] * 17  # something to learn
        _write_idx(root, prefix, images, labels)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_root) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    common = ["--data-root", str(fmnist_root), "--model", "cifar_resnet8", "--batch-size", "16", "--no-progress",
              "--set", f"data.cache_dir={base / 'cache'}", "--set", "train.channels_last=false"]
    out = {}
    for name, extra in (("sp", ["--recipe", "fashion_mnist_sp", "--epochs", "1"]),
                        ("plain", ["--recipe", "fashion_mnist_sp", "--stage", "baseline", "--epochs", "1"]),
                        ("sdv", ["--method", "sdv", "--epochs", "1"])):  # a rival, by its own recipe
        out[name] = base / name
        assert main(["train", *extra, *common, "--run-dir", str(out[name])]) == 0
    for alpha in (0.5, 2.0):
        out[f"hrl{alpha}"] = base / f"hrl{alpha}"
        assert main(["train", "--recipe", "fashion_mnist_hrl", "--init", str(out["sp"]), "--epochs", "1",
                     "--alpha", str(alpha), "--set", "train.target_macs=none", "--set", "train.fit_tau=false",
                     *common, "--run-dir", str(out[f"hrl{alpha}"])]) == 0
    out["calibrate"] = base / "calibrate"
    assert main(["train", "--recipe", "fashion_mnist_calibrate", "--init", str(out["sp"]), "--epochs", "1", *common,
                 "--run-dir", str(out["calibrate"])]) == 0
    return out


def test_report_from_a_tiny_trained_checkpoint(runs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(runs["hrl0.5"]), "--out", str(out), "--taus", "0.3", "0.5", "0.7",
                 "--scales", "0.75", "1.0", "--compare", str(runs["hrl2.0"]), "--plain", str(runs["plain"]),
                 "--sweep-images", "32"]) == 0
    text = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "![" in text and (out / "block_execution_rates.png").stat().st_size > 1000
    assert (out / "tradeoff.png").exists() and (out / "gallery_easy.png").exists()
    assert metrics["num_images"] == 48 and len(metrics["block_execution_rates"]) == metrics["num_gates"] + 1
    assert {r["batch_size"] for r in metrics["speed"]["rows"]} == {1, 256}
    assert [row["tau"] for row in metrics["threshold_sweep"]] == [0.3, 0.5, 0.7]
    assert main(["report", str(runs["hrl0.5"]), "--out", str(out), "--no-speed"]) == 2  # no silent overwrite
    assert main(["report", str(runs["plain"]), "--out", str(tmp_path / "r2")]) == 2  # plain: not a SkipNet


def test_sweep_table_and_plot(runs, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", str(runs["hrl0.5"]), str(runs["hrl2.0"]), str(runs["calibrate"]), str(runs["sdv"]), "--plain",
                 str(runs["plain"]), "--sweep", str(runs["sp"]), str(runs["hrl0.5"]), "--random", str(runs["sp"]),
                 "--taus", "0.2", "0.5", "0.8", "--out", str(out), "--json"]) == 0
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    series = [r["series"] for r in table]
    assert series.count("SkipNet SP→HRL (ours)") == 2
    assert series.count("calibrate (ours: global τ + fine-tuning)") == 1
    plain = [r for r in table if r["series"] == "plain ResNet"]
    assert [r["label"] for r in plain] == ["R-8"] and 0 <= plain[0]["accuracy"] <= 100  # an accuracy point
    # random skipping on the SP weights, once per SkipNet run, at that run's per-block rates (the same MACs)
    for kind, name in (("HRL", "SkipNet SP→HRL (ours)"), ("calibrate", "calibrate (ours: global τ + fine-tuning)")):
        run = next(r for r in table if r["series"] == name)
        match = [r for r in table
                 if r["series"].startswith("random skipping") and r["label"] == f"as {kind} {run['label']}"]
        assert match and match[0]["exec_rates"] is not None
        assert abs(match[0]["macs"] - run["macs"]) < 0.25 * run["macs"]
    for name in ("sp", "hrl0.5"):  # one tau sweep per swept run
        taus = [r for r in table if r["label"].startswith("τ=") and r["run"] == str(runs[name])]
        assert len(taus) == 3 and taus[0]["macs"] >= taus[-1]["macs"]  # a higher threshold never costs more
    # a rival is a point of its own series at its own MACs (SDV's drop rate 0.35: about 65 % of the gated blocks)
    sdv = [r for r in table if r["series"] == "SDV (random skipping, trained for it)"]
    assert len(sdv) == 1 and sdv[0]["macs"] < plain[0]["macs"] and 0.5 < sum(sdv[0]["exec_rates"]) / len(
        sdv[0]["exec_rates"]) < 0.8
    assert "SDV (random skipping" in (out / "sweep.md").read_text()
    assert (out / "tradeoff.png").stat().st_size > 1000 and (out / "sweep.md").exists()


def test_sweep_carries_recorded_rows(tmp_path):
    """A report rebuilt where some run folders are gone keeps their earlier rows, dated -- only for the runs
    asked for and missing; a run measured again replaces its old rows; an undated row cannot be carried."""
    now = [{"series": "ACT", "label": "τ 0.01", "accuracy": 88.0, "macs": 7e7, "reduction": 16.0,
            "run": "/new/act-0.01", "date": "2026-12-03"}]
    old = [{"series": "ACT", "label": "τ 0.01", "accuracy": 80.0, "macs": 8e7, "reduction": 4.0,
            "run": "/old/act-0.01", "date": "2026-12-01"},
           {"series": "plain ResNet", "label": "R-38", "accuracy": 88.11, "macs": 8.33e7, "reduction": 0.0,
            "run": "/old/plain-resnet38", "date": "2026-12-02 13:11 UTC"},
           {"series": "SDV", "label": "d=0.2", "accuracy": 85.0, "macs": 7e7, "reduction": 16.0,
            "run": "/old/sdv-0.2", "date": "2026-12-02"}]
    table = carry_recorded(now, old, ["act-0.01", "plain-resnet38"])  # sdv-0.2 not asked for: left out
    assert [(r["run"], r["accuracy"], r.get("carried", False)) for r in table] == [
        ("/new/act-0.01", 88.0, False), ("/old/plain-resnet38", 88.11, True)]
    md = sweep_markdown(table)
    assert "R-38 (measured 2026-12-02 13:11 UTC) | 88.11" in md and "τ 0.01 | 88.00" in md
    assert plot_table(table, tmp_path / "t.png", title="t").stat().st_size > 1000
    with pytest.raises(ValueError, match="no date"):
        carry_recorded([], [{k: v for k, v in old[1].items() if k != "date"}], ["plain-resnet38"])


def test_static_block_set_is_the_layout_of_the_blocks_a_static_policy_keeps():
    # SkipNet-20: 9 blocks, 3 per stage, the first ungated; gates 2 and 5 sit on stages 2 and 3's first blocks
    stages = create_model("cifar_resnet20", gate="rnn").stage_of_block
    assert stages == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    learned = [0.0, 0.0, 1.0, 0.9914, 0.0, 1.0, 1.0, 1.0]  # a measured run (docs/RESULTS.md, issue 11)
    assert static_block_set(stages, learned) == (1, 2, 3)
    assert static_block_set(stages, [1.0] * 8) == (3, 3, 3)
    assert static_block_set(stages, [0, 0, 1, 0, 0, 1, 0, 0]) == (1, 1, 1)
    assert static_block_set(stages, [0.0, 0.0, 1.0, 0.9, 0.0, 1.0, 1.0, 1.0]) is None  # routes per image
    assert static_block_set(stages, [1, 1, 0, 1, 1, 1, 1, 1]) is None  # skips stage 2's downsampling block
    assert static_block_set(stages, learned, tol=0.005) is None  # 0.9914 is routing at a tighter tolerance
    with pytest.raises(ValueError, match="8 execution rates"):
        static_block_set(stages, learned[:7])
    # a plain network of such a set is its own series, labelled with its blocks (see also matched_block_set)
    payload = {"model_config": {"gate": "none", "depth": 14, "layout": [1, 2, 3]}, "run_config": {"train": {}}}
    assert run_series(payload) == LEARNED_SET_SERIES and run_label(payload) == "R-14 (1/2/3)"
    plain = {"model_config": {"gate": "none", "depth": 14, "layout": None}, "run_config": {"train": {}}}
    assert run_series(plain) == "plain ResNet" and run_label(plain) == "R-14"


def test_matched_block_set_keeps_the_most_run_blocks_its_macs_pay_for():
    model = create_model("cifar_resnet20", gate="rnn")
    stages, table = model.stage_of_block, model.mac_table((32, 32))
    full, plain = table.block_full, table.plain

    def macs(layout):  # the plain network of that layout, counted by its own table
        return create_model("cifar_resnet20", gate="none", depth=2 + 2 * sum(layout), layout=layout).mac_table(
            (32, 32)).plain

    routed = [0.53, 0.26, 1.0, 0.42, 0.31, 1.0, 0.46, 1.0]  # a measured run's rates (hrl-t0.65, 64.9 % of R-20)
    layout, cost = matched_block_set(stages, routed, full, plain, 0.649 * plain)
    assert layout == (2, 1, 3) and cost == macs((2, 1, 3))  # blocks 8, 1, 7 (rates 1.0, 0.53, 0.46) and the firsts
    # a static policy at its own MACs gives the set it keeps, as static_block_set does
    static = [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert matched_block_set(stages, static, full, plain, macs((1, 2, 3)))[0] == static_block_set(stages, static)
    # the budget decides how many: everything, or the stages' first blocks alone
    assert matched_block_set(stages, routed, full, plain, 2 * plain) == ((3, 3, 3), plain)
    assert matched_block_set(stages, routed, full, plain, 0)[0] == (1, 1, 1)
    # halfway between two sets (blocks within a stage cost the same): the larger one
    assert matched_block_set(stages, routed, full, plain, (macs((2, 1, 3)) + macs((2, 1, 2))) / 2)[0] == (2, 1, 3)
    # a rarely run first block is still kept; on a tie of rates the earlier block goes first
    layout, _ = matched_block_set(stages, [0.9, 0.9, 0.0, 0.9, 0.9, 0.0, 0.9, 0.9], full, plain, macs((2, 1, 1)))
    assert layout == (2, 1, 1)
    with pytest.raises(ValueError, match="8 execution rates"):
        matched_block_set(stages, routed[:7], full, plain, plain)


def test_demo_runs_end_to_end(fmnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))
    lines: list[str] = []
    summary = run_demo(tmp_path / "demo", data_root=str(fmnist_root), sp_epochs=0.5, hrl_epochs=0.5, references=None,
                       progress=False, echo=lines.append)
    text = "\n".join(lines)
    for needle in ("SkipNet test accuracy", "every block executed", "reduction", "Per-block execution rate",
                   "Random skipping, same per-block rates", "same rates, own weights", "Plain ResNet reference",
                   "REINFORCE",
                   "Compact vs dense at batch   1", "Compact vs dense at batch 256", "Report:"):
        assert needle in text
    assert (tmp_path / "demo" / "report" / "report.md").exists()
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["mac_reduction"] == summary["mac_reduction"]


def test_demo_reads_the_plain_references_of_its_own_epochs_from_every_tradeoff_folder(tmp_path):
    def row(label, macs, acc, epochs, date):
        return {"series": "plain ResNet", "label": label, "macs": macs, "accuracy": acc, "epochs": epochs,
                "date": date}
    (tmp_path / "fashion_mnist").mkdir()
    (tmp_path / "fashion_mnist-sp2.5-hrl0.5").mkdir()
    (tmp_path / "cifar10").mkdir()
    four = [row("R-8", 9e6, 89.0, 4.0, "2026-12-04 10:00 UTC"), row("R-14", 20e6, 91.0, 4.0, "2026-12-04 10:00 UTC"),
            row("R-20", 31e6, 91.3, 4.0, "2026-12-04 10:00 UTC"),
            {"series": "SkipNet (HRL)", "label": "t0.65", "macs": 20e6, "accuracy": 99.0, "epochs": 4.0}]
    three = [row("R-14", 20e6, 90.5, 3.0, "2026-12-04 11:00 UTC"), row("R-20", 31e6, 90.7, 3.0, "2026-12-04 11:00 UTC"),
             row("R-14", 20e6, 90.9, 4.0, "2026-12-05 09:00 UTC")]  # a newer 4-epoch R-14 than the other file's
    (tmp_path / "fashion_mnist" / "sweep.json").write_text(json.dumps(four))
    (tmp_path / "fashion_mnist-sp2.5-hrl0.5" / "sweep.json").write_text(json.dumps(three))
    (tmp_path / "cifar10" / "sweep.json").write_text(json.dumps([row("R-14", 25e6, 80.0, 3.0, "2026-12-06")]))
    ref = plain_reference(tmp_path, 19.5e6, 3.0)  # the 3-epoch rows only, never another dataset's
    assert (ref["label"], ref["accuracy"]) == ("R-14", 90.5) and ref["source"].endswith("sp2.5-hrl0.5/sweep.json")
    assert ref["cheaper"] is None
    ref = plain_reference(tmp_path, 20.5e6, 4.0)  # above R-14's MACs: R-20; R-14 the newest of its two rows
    assert (ref["label"], ref["accuracy"], ref["cheaper"]["accuracy"]) == ("R-20", 91.3, 90.9)
    assert ref["cheaper"]["source"] != ref["source"]
    assert plain_reference(tmp_path, 40e6, 4.0) is None and plain_reference(tmp_path, 1e6, 2.0) is None
    assert plain_reference(tmp_path / "fashion_mnist" / "sweep.json", 1e6, 4.0)["label"] == "R-8"  # one file
    assert plain_reference(tmp_path / "missing.json", 1e6, 4.0) is None and plain_reference(None, 1e6, 4.0) is None


def test_bench_command_json(runs, capsys):
    keys = {"model", "executor", "batch_size", "exec_rate", "latency_ms_p50", "latency_ms_p90", "images_per_s",
            "speedup_vs_dense", "ideal_speedup"}
    assert main(["bench", "cifar_resnet8", "--batch-sizes", "1", "4", "--rates", "0.5", "--budget", "0.02",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["executor"] for r in rows} >= {"dense", "masked", "compact", "per_image"}
    assert all(keys <= set(r) for r in rows) and {r["batch_size"] for r in rows} == {1, 4}
    assert main(["bench", str(runs["hrl0.5"]), "--batch-sizes", "2", "--executors", "dense", "compact",
                 "--budget", "0.02", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["executor"] for r in rows} == {"dense", "compact"}


def _checkpoint(path: Path, fmnist_root: Path, *, num_classes: int = 10, **extra) -> Path:
    """A checkpoint as a run writes it (random weights): Fashion-MNIST from ``fmnist_root``, one channel."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet8", num_classes=num_classes, in_channels=1)
    data = {"name": "fashion_mnist", "root": str(fmnist_root), "cache_dir": str(path.parent / "cache")}
    return save_checkpoint(path, {"model_config": model.config.to_dict(), "model": model.state_dict(),
                                  "run_config": {"data": data, "train": {"stage": "sp"}}, "step": 7,
                                  "finished": True, **extra})


def test_eval_report_sweep_refuse_data_of_another_class_count(fmnist_root, tmp_path, capsys):
    """A 3-class network evaluated on the 10-class test set used to report ~11 % with exit 0."""
    ckpt = _checkpoint(tmp_path / "three.pt", fmnist_root, num_classes=3)
    for argv in (["eval", str(ckpt)], ["report", str(ckpt), "--no-speed", "--out", str(tmp_path / "r")],
                 ["sweep", str(ckpt), "--out", str(tmp_path / "s")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == ("error: the model has 3 classes but fashion_mnist has 10: evaluate it on data of the "
                       "classes it was trained on (--data, --data-root)"), argv


def test_unfinished_runs_are_marked(fmnist_root, tmp_path, capsys, caplog):
    """A checkpoint that stopped before the end of its schedule used to look finished to eval, report and bench."""
    done = _checkpoint(tmp_path / "done.pt", fmnist_root)
    cut = _checkpoint(tmp_path / "cut.pt", fmnist_root, step=3, finished=False, total_steps=10)
    old = _checkpoint(tmp_path / "old.pt", fmnist_root, step=3, finished=False)  # no total stored
    for ckpt, finished, warning in ((done, True, None), (cut, False, f"{cut} did not finish its schedule "
                                    "(step 3 of 10)"), (old, False, f"{old} did not finish its schedule (step 3)")):
        caplog.clear()
        assert main(["eval", str(ckpt), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["finished"] is finished
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == ([warning] if warning else [])
        assert main(["eval", str(ckpt)]) == 0
        assert capsys.readouterr().out.strip().endswith("block fraction 100.0%" if finished
                                                        else "| did not finish its schedule")
    caplog.clear()
    out = tmp_path / "report"
    assert main(["report", str(cut), "--out", str(out), "--no-speed", "--taus", "0.5", "--scales", "1.0",
                 "--sweep-images", "16"]) == 0
    head = (out / "report.md").read_text().splitlines()[:3]
    assert head[2] == f"> **Warning:** {cut} did not finish its schedule (step 3 of 10)"
    assert json.loads((out / "metrics.json").read_text())["extra"]["finished"] is False
    caplog.clear()
    assert main(["bench", str(cut), "--batch-sizes", "2", "--executors", "dense", "compact", "--budget", "0.01",
                 "--json"]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{cut} did not finish its schedule (step 3 of 10)"]


def test_report_title_names_the_dataset(fmnist_root, tmp_path):
    """A Fashion-MNIST network's report was titled "SkipNet cifar-8 (rnn gates)"."""
    out = tmp_path / "report"
    assert main(["report", str(_checkpoint(tmp_path / "c.pt", fmnist_root)), "--out", str(out), "--no-speed",
                 "--taus", "0.5", "--scales", "1.0", "--sweep-images", "16"]) == 0
    text = (out / "report.md").read_text()
    assert text.startswith("# SkipNet analysis: SkipNet-8 (RNN gates) on fashion_mnist\n")
    assert json.loads((out / "metrics.json").read_text())["model"] == "SkipNet-8 (RNN gates) on fashion_mnist"


def test_eval_and_sweep_use_the_runs_own_tau(runs, tmp_path, capsys):
    from skipnet.train import load_checkpoint

    run = tmp_path / "fitted"
    payload = load_checkpoint(runs["hrl0.5"])
    save_checkpoint(run / "checkpoints" / "last.pt", {**payload, "tau": 0.8})  # as fit_tau stores it
    assert main(["eval", str(run), "--json"]) == 0
    own = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(run), "--json", "--tau", "0.8"]) == 0
    explicit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(runs["hrl0.5"]), "--json"]) == 0
    default = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert own["tau"] == 0.8 and default["tau"] == 0.5
    assert own["macs_per_image"] == explicit["macs_per_image"] and own["accuracy"] == explicit["accuracy"]
    assert main(["sweep", str(run), "--taus", "--out", str(tmp_path / "sw"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    assert row["tau"] == 0.8 and row["macs"] == own["macs_per_image"]
