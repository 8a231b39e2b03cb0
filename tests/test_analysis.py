"""The analysis layer: metrics on hand-built routings, routing collection, sweeps, figures and reports."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from skipnet import computation_percentage, create_model
from skipnet.analysis import (
    FIGURES,
    Routing,
    accuracy_by_blocks,
    block_execution_rates,
    block_fraction,
    blocks_histogram,
    collect_routing,
    gallery_indices,
    gather_images,
    input_scale_analysis,
    mac_reduction,
    mac_unit,
    macs_stats,
    path_strings,
    per_class_accuracy,
    per_class_block_histogram,
    per_class_mean_blocks,
    plot_tradeoff,
    routing_paths,
    run_analysis,
    skipped_blocks,
    summarize,
    threshold_sweep,
    top1_accuracy,
    topk_accuracy,
    write_report,
)
from skipnet.reporting import zoom_band

# --- a hand-built routing: 6 images, 3 classes, 3 gates (4 blocks: stage 1 = blocks 0-1, stage 2 = 2-3) ------
#
# image  label pred  decisions  executed  MACs   top-3
#   0      0    0     1 1 1        4       100   0 1 2
#   1      0    1     0 0 0        1        40   1 0 2
#   2      1    1     1 0 1        3        80   1 2 0
#   3      1    1     0 0 0        1        40   1 0 2
#   4      2    2     1 1 0        3        70   2 1 0
#   5      2    0     1 0 1        3        80   0 1 2

DEC = [[1, 1, 1], [0, 0, 0], [1, 0, 1], [0, 0, 0], [1, 1, 0], [1, 0, 1]]
MACS = [100.0, 40.0, 80.0, 40.0, 70.0, 80.0]
TOPK = [[0, 1, 2], [1, 0, 2], [1, 2, 0], [1, 0, 2], [2, 1, 0], [0, 1, 2]]


def _fixture(**kw) -> Routing:
    args = dict(preds=[0, 1, 1, 1, 2, 0], labels=[0, 0, 1, 1, 2, 2], decisions=DEC, macs=MACS, plain_macs=98.0,
                dense_macs=100.0, stage_of_block=(0, 0, 1, 1), num_classes=3, topk=TOPK)
    args.update(kw)
    return Routing(**args)


def test_accuracies_by_hand():
    r = _fixture()
    assert top1_accuracy(r) == pytest.approx(100 * 4 / 6)
    assert topk_accuracy(r, 1) == pytest.approx(100 * 4 / 6)
    assert topk_accuracy(r, 2) == pytest.approx(100 * 5 / 6)  # image 1 has its label second; image 5 third
    assert topk_accuracy(r, 3) == 100.0
    assert topk_accuracy(r, 5) == 100.0  # only 3 classes: top-5 covers them all
    with pytest.raises(ValueError, match="top-5"):
        topk_accuracy(_fixture(topk=None, num_classes=12), 5)


def test_top5_reported_only_with_more_than_ten_classes():
    topk = [row + [5, 6] for row in TOPK]
    topk[5] = [0, 1, 7, 8, 9]  # image 5 (label 2) misses the top-5
    r = _fixture(num_classes=12, topk=topk)
    assert topk_accuracy(r, 5) == pytest.approx(100 * 5 / 6)
    assert summarize(r)["top5"] == pytest.approx(100 * 5 / 6)
    assert "top5" not in summarize(_fixture())


def test_macs_reduction_and_block_fraction_by_hand():
    r = _fixture()
    s = macs_stats(r)
    assert s["mean"] == pytest.approx(410 / 6)
    # deviations x6 from the mean: 190, -170, 70, -170, 10, 70 -> variance 103800 / 36 / 6
    assert s["std"] == pytest.approx(math.sqrt(103800 / 216))
    assert (s["min"], s["max"], s["plain"], s["dense"]) == (40.0, 100.0, 98.0, 100.0)
    assert mac_reduction(r) == pytest.approx(100 * (1 - (410 / 6) / 98))
    assert mac_reduction(r, "dense") == pytest.approx(100 * (1 - (410 / 6) / 100))
    np.testing.assert_allclose(block_execution_rates(r), [1.0, 4 / 6, 2 / 6, 3 / 6])
    assert block_fraction(r) == pytest.approx(62.5)  # (1 + 9/6) / 4
    assert block_fraction(r) == pytest.approx(100 * computation_percentage(torch.tensor(DEC, dtype=torch.float32)))
    assert r.executed_blocks.tolist() == [4, 1, 3, 1, 3, 3]
    assert blocks_histogram(r).tolist() == [0, 2, 0, 3, 1]


def test_per_class_statistics_by_hand():
    r = _fixture()
    assert per_class_block_histogram(r).tolist() == [[0, 1, 0, 0, 1], [0, 1, 0, 1, 0], [0, 0, 0, 2, 0]]
    np.testing.assert_allclose(per_class_mean_blocks(r), [2.5, 2.0, 3.0])
    acc, count = per_class_accuracy(r)
    np.testing.assert_allclose(acc, [50.0, 100.0, 50.0])
    assert count.tolist() == [2, 2, 2]
    empty = _fixture(num_classes=4)  # class 3 has no images
    assert np.isnan(per_class_accuracy(empty)[0][3]) and np.isnan(per_class_mean_blocks(empty)[3])


def test_accuracy_by_blocks_by_hand():
    rows = accuracy_by_blocks(_fixture())
    assert [(row["blocks"], row["count"]) for row in rows] == [(1, 2), (3, 3), (4, 1)]
    np.testing.assert_allclose([row["accuracy"] for row in rows], [50.0, 100 * 2 / 3, 100.0])


def test_paths_by_hand():
    r = _fixture()
    assert path_strings(r) == ["111", "000", "101", "000", "110", "101"]
    assert routing_paths(r, 10) == (4, [("000", 2), ("101", 2), ("110", 1), ("111", 1)])
    assert routing_paths(r, 2) == (4, [("000", 2), ("101", 2)])
    assert skipped_blocks("101") == [2] and skipped_blocks("000") == [1, 2, 3]


def test_gallery_order_and_ties():
    r = _fixture()
    # easy: fewest blocks, then lower MACs, then lower index; hard: most blocks, higher MACs, lower index
    assert gallery_indices(r, 6, "easy").tolist() == [1, 3, 4, 2, 5, 0]
    assert gallery_indices(r, 6, "hard").tolist() == [0, 2, 5, 4, 1, 3]
    assert gallery_indices(r, 2, "easy").tolist() == [1, 3]
    assert gallery_indices(r, 5, "easy", label=2).tolist() == [4, 5]
    assert gallery_indices(r, 5, "hard", label=2).tolist() == [5, 4]
    with pytest.raises(ValueError, match="easy"):
        gallery_indices(r, 3, "medium")


def test_routing_validation_subset_and_save(tmp_path):
    r = _fixture()
    with pytest.raises(ValueError, match="labels"):
        _fixture(labels=[0, 1])
    with pytest.raises(ValueError, match="stage_of_block"):
        _fixture(stage_of_block=(0, 1))
    with pytest.raises(ValueError, match="topk"):
        _fixture(topk=[[1, 0]] * 6)
    sub = r.subset([5, 0])
    assert sub.labels.tolist() == [2, 0] and sub.macs.tolist() == [80.0, 100.0]
    back = Routing.load(r.save(tmp_path / "routing.npz"))
    for name in ("preds", "labels", "decisions", "macs", "topk"):
        np.testing.assert_array_equal(getattr(back, name), getattr(r, name))
    assert (back.plain_macs, back.stage_of_block, back.num_classes, back.probs) == (98.0, (0, 0, 1, 1), 3, None)


def test_mac_unit():
    assert mac_unit([3.6e9]) == (1e9, "GMACs")
    assert mac_unit([2.5e8, 4e7]) == (1e6, "MMACs")
    assert mac_unit([5e4]) == (1e3, "KMACs")


# --- on a tiny model -------------------------------------------------------------------------------------------

def _tiny(classes=4, channels=1, n=10, size=16, seed=0):
    torch.manual_seed(seed)
    model = create_model("cifar_resnet14", gate="rnn", num_classes=classes, in_channels=channels).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, n, 4)]  # batches of 4, 4, 2
    return model, x, y, batches


def test_collect_routing_fixed_decisions_gives_them_back():
    model, x, y, batches = _tiny()
    d = (torch.rand(10, model.num_gates, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    model.train()
    r = collect_routing(model, batches, mode="fixed", decisions=d, progress=False)
    assert model.training  # the caller's mode is restored
    model.eval()
    with torch.inference_mode():
        out = model(x, "fixed", decisions=d)
    assert r.decisions.dtype == bool and r.decisions.tolist() == d.bool().tolist()
    np.testing.assert_array_equal(r.macs, out.macs.numpy())
    np.testing.assert_array_equal(r.preds, out.logits.argmax(1).numpy())
    np.testing.assert_allclose(r.probs, out.probs.numpy(), rtol=1e-5, atol=1e-6)
    assert r.labels.tolist() == y.tolist()
    table = model.mac_table((16, 16))
    assert (r.plain_macs, r.dense_macs, r.input_size) == (table.plain, table.dense, (16, 16))
    assert r.stage_of_block == model.stage_of_block and r.num_classes == 4 and r.topk.shape == (10, 4)
    one = collect_routing(model, batches, mode="fixed", decisions=d[3], progress=False)  # (G,) for every image
    assert (one.decisions == d[3].bool().numpy()).all()


def test_collect_routing_on_a_plain_network():
    _, _, _, batches = _tiny()
    plain = create_model("cifar_resnet14", gate="none", num_classes=4, in_channels=1).eval()
    r = collect_routing(plain, batches, progress=False)
    assert r.probs is None and r.decisions.all() and block_fraction(r) == 100.0
    assert mac_reduction(r) == 0.0 and r.plain_macs == r.dense_macs == plain.mac_table((16, 16)).plain


def test_threshold_sweep_runs_a_forward_per_tau():
    model, x, y, batches = _tiny()
    rows = threshold_sweep(model, batches, [0.0, 0.5, 1.0], progress=False)
    assert [row["tau"] for row in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["block_fraction_pct"] == 100.0 and rows[2]["block_fraction_pct"] == pytest.approx(100 / 6)
    table = model.mac_table((16, 16))
    assert rows[0]["mean_macs"] == pytest.approx(table.dense) and rows[0]["reduction_pct"] < 0  # gates cost
    r = collect_routing(model, batches, progress=False)
    assert rows[1]["accuracy"] == top1_accuracy(r) and rows[1]["mean_macs"] == pytest.approx(r.macs.mean())
    assert rows[0]["mean_macs"] >= rows[1]["mean_macs"] >= rows[2]["mean_macs"]
    few = threshold_sweep(model, batches, [0.5], max_images=5, progress=False, return_routings=True)[1][0]
    assert few.num_images == 5 and few.labels.tolist() == y[:5].tolist()


def test_input_scales_sizes_macs_and_clamping():
    model, x, y, batches = _tiny()
    rows, routings = input_scale_analysis(model, batches, (0.1, 0.5, 1.0, 2.0), progress=False,
                                          return_routings=True)
    assert [row["input_size"] for row in rows] == [[4, 4], [8, 8], [16, 16], [32, 32]]  # 0.1 -> min size 4
    for row, size in zip(rows, (4, 8, 16, 32)):
        assert row["plain_macs"] == model.mac_table((size, size)).plain
        assert sum(row["blocks_hist"]) == 10
    base = collect_routing(model, batches, progress=False)
    assert rows[2]["reference_scale"] == 1.0 and rows[2]["mean_block_shift"] == 0.0
    assert rows[2]["mean_macs"] == pytest.approx(base.macs.mean())
    assert rows[2]["mean_blocks"] == pytest.approx(base.executed_blocks.mean())
    assert routings[3].decisions.shape == (10, model.num_gates)


def test_run_analysis_matches_separate_calls():
    model, x, y, batches = _tiny()
    a = run_analysis(model, batches, taus=(0.3, 0.5, 0.7), scales=(0.5, 1.0), executor="masked", progress=False)
    r = collect_routing(model, batches, progress=False)
    np.testing.assert_array_equal(a.routing.decisions, r.decisions)
    np.testing.assert_array_equal(a.routing.macs, r.macs)
    assert a.sweep == threshold_sweep(model, batches, (0.3, 0.5, 0.7), progress=False)
    assert a.scales == input_scale_analysis(model, batches, (0.5, 1.0), progress=False)
    sub = run_analysis(model, batches, taus=(0.5,), scales=(1.0,), sweep_images=6, progress=False)
    assert sub.routing.num_images == 10
    assert sub.sweep == threshold_sweep(model, batches, (0.5,), max_images=6, progress=False)


def test_gather_images_follows_input_order():
    _, x, _, batches = _tiny()
    got = gather_images(batches, [9, 0, 5])
    assert sorted(got) == [0, 5, 9] and all(torch.equal(got[i], x[i]) for i in got)
    with pytest.raises(ValueError, match="past the end"):
        gather_images(batches, [10])


def _valid_png(path):
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_plot_tradeoff_series(tmp_path):
    series = {"SkipNet τ sweep": [(2.0e7, 90.1, "τ=0.5"), (1.5e7, 89.0, "τ=0.7")],
              "HRL α": [(1.8e7, 89.5, "α=0.1")], "plain ResNet": [(4.1e7, 91.0, "R-20"), (2.7e7, 90.0, "R-14")]}
    _valid_png(plot_tradeoff(series, tmp_path / "t.png", vlines={"plain R-20": 4.1e7}))
    _valid_png(plot_tradeoff(series, tmp_path / "z.png", ylim=(89.5, 91.5)))
    with pytest.raises(ValueError, match="ylim"):
        plot_tradeoff(series, tmp_path / "bad.png", ylim=(91.0, 89.0))


def test_zoom_band_spans_the_plain_line_and_the_best_row():
    rows = [{"series": "plain ResNet", "accuracy": 89.9}, {"series": "plain ResNet", "accuracy": 91.4},
            {"series": "SkipNet", "accuracy": 91.6}, {"series": "random skipping", "accuracy": 54.4}]
    assert zoom_band(rows) == pytest.approx((87.9, 92.1))
    assert zoom_band(rows[2:]) is None


def test_write_report_end_to_end(tmp_path):
    model, x, y, batches = _tiny(classes=4, n=12)
    y[y == 3] = 0  # class 3 has no images: NaN accuracy must become null in JSON and not break the figures
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]
    a = run_analysis(model, batches, taus=(0.4, 0.5, 0.6), scales=(0.5, 1.0, 1.5), progress=False)
    out = tmp_path / "report"
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    series = {"plain ResNet": [(3.0e6, 70.0, "R-8"), (5.0e6, 72.0, "R-14")]}
    md = write_report(out, a.routing, model_name="tiny", class_names=names, images_for_gallery=x,
                      unnormalize=([0.5], [0.25]), speed={"batch_1": {"speedup": 1.4}}, scale_analysis=a.scales,
                      sweep=a.sweep, tradeoff_series=series, extra={"seed": 0}, gallery_size=6)
    assert md == out / "report.md"
    text = md.read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    for key, name in FIGURES.items():
        _valid_png(out / name)
        assert f"]({name})" in text and metrics["figures"][key] == name
    assert metrics["top1"] == pytest.approx(top1_accuracy(a.routing))
    assert metrics["per_class"][3]["accuracy"] is None and metrics["per_class"][3]["count"] == 0
    assert len(metrics["block_execution_rates"]) == model.num_gates + 1
    assert len(metrics["threshold_sweep"]) == 3 and len(metrics["input_scale"]) == 3
    assert len(metrics["gallery_indices"]["easy"]) == 6
    assert "| τ |" in text and "Measured speed" in text and "T-shirt/top" in text

    with pytest.raises(FileExistsError):
        write_report(out, a.routing, model_name="tiny")
    (out / "notes.txt").write_text("keep me")
    # overwrite: colour uint8 images through a callable, no sweep/scales -> those figures go, notes.txt stays
    rgb = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    write_report(out, a.routing, model_name="tiny", images_for_gallery=lambda i: rgb[i], overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / FIGURES["tradeoff"]).exists() and not (out / FIGURES["input_scale"]).exists()
    _valid_png(out / FIGURES["gallery_easy"])
    with pytest.raises(ValueError, match="class_names"):
        write_report(tmp_path / "other", a.routing, model_name="tiny", class_names=["a"])


def test_evaluation_refuses_data_of_another_class_count():
    """A 3-class network on 10-class data reported ~11 % (labels 3..9 just never matched); now both runners
    refuse a loader of another class count, and labels beyond the model's classes in any batches."""
    from skipnet.data import BatchLoader, ImageData
    from skipnet.train import evaluate

    model, x, y, batches = _tiny(classes=3)
    data = ImageData(torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8), torch.arange(8) % 10,
                     [str(c) for c in range(10)], (0.5,), (0.25,), "ten")
    loader = BatchLoader(data, 4, train=False)
    for run in (lambda b: evaluate(model, b), lambda b: collect_routing(model, b, progress=False)):
        with pytest.raises(ValueError, match="the model has 3 classes but the data \\(ten\\) has 10"):
            run(loader)
        with pytest.raises(ValueError, match="batch 1: labels 0..7, but the model has 3 classes"):
            run([(x[:4], y[:4]), (x[4:8], torch.tensor([0, 7, 1, 2]))])


def test_evaluation_refuses_non_finite_images():
    """NaN gate probabilities read as "skip": NaN images used to count as images that skip every block."""
    from skipnet.train import evaluate

    model, x, y, _ = _tiny()
    bad = x[4:8].clone()
    bad[1, 0, 3, 3] = float("nan")
    bad[3] = float("inf")
    batches = [(x[:4], y[:4]), (bad, y[4:8])]
    for run in (lambda: evaluate(model, batches), lambda: collect_routing(model, batches, progress=False),
                lambda: threshold_sweep(model, batches, (0.5,), progress=False)):
        with pytest.raises(ValueError, match="batch 1: 2 of 4 images hold NaN or infinite values"):
            run()


def test_report_speed_table_and_plain_points(tmp_path, monkeypatch):
    """The measured speed was a table of raw Python dicts, and the plain ResNet a vertical MAC line without
    accuracy: now each list of rows is a markdown table, and plain ResNets are accuracy points only."""
    import skipnet.analysis.plots as plots

    model, x, y, batches = _tiny()
    a = run_analysis(model, batches, taus=(0.5, 0.6), progress=False)
    speed = {"rows": [{"executor": "compact", "batch_size": 1, "speedup_vs_dense": 1.234},
                      {"executor": "compact", "batch_size": 256, "speedup_vs_dense": 1.5}],
             "environment": {"torch": "2.x", "threads": 1}}
    calls = []
    monkeypatch.setattr(plots, "plot_tradeoff", lambda series, path, **kw: calls.append((series, kw)))
    for k, series in enumerate((None, {"plain ResNet": [(3.0e6, 70.0, "R-8")]})):
        text = write_report(tmp_path / str(k), a.routing, model_name="tiny", speed=speed, sweep=a.sweep,
                            tradeoff_series=series).read_text()
        section = text.split("## Measured speed")[1].split("##")[0]
        assert "{" not in section
        assert "| executor | batch_size | speedup_vs_dense |" in section and "| compact | 256 | 1.5 |" in section
        assert "| environment.threads | 1 |" in section
        assert "vlines" not in calls[-1][1]
        assert ("No plain ResNet run was given" in text) == (series is None)
    assert calls[-1][0]["plain ResNet"] == [(3.0e6, 70.0, "R-8")]
