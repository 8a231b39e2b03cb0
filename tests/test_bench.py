"""The latency harness (skipnet.bench): row contents, the compute-ideal speed-up, JSON output."""

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from skipnet import create_model
from skipnet.bench import DEFAULT_EXECUTORS, bench_environment, format_table, run_bench

KEYS = {"model", "executor", "batch_size", "exec_rate", "latency_ms_p50", "latency_ms_p90", "images_per_s",
        "speedup_vs_dense", "ideal_speedup"}


@pytest.fixture(scope="module")
def rows():
    return run_bench("cifar_resnet14", batch_sizes=(1, 3), exec_rates=(0.5, 1.0), warmup=1, repeats=2,
                     executors=DEFAULT_EXECUTORS + ("compact_no_gates",))


def test_rows_have_the_keys_and_sane_values(rows):
    assert len(rows) == 2 * 2 * 5
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["model"] == "cifar_resnet14"
        assert r["latency_ms_p50"] > 0 and r["latency_ms_p90"] >= r["latency_ms_p50"] * 0.999
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / (r["latency_ms_p50"] / 1e3))
        assert r["repeats"] >= 1
    for group in _groups(rows):
        dense = group["dense"]
        assert dense["speedup_vs_dense"] == 1.0 and dense["ideal_speedup"] == 1.0
        for ex in ("masked", "compact", "per_image"):
            assert group[ex]["speedup_vs_dense"] == pytest.approx(dense["latency_ms_p50"] / group[ex]["latency_ms_p50"])
        # 1 - t(no gates) / t(compact): below 1; noise on a loaded machine can push it far below 0
        assert math.isfinite(group["compact"]["gate_share"]) and group["compact"]["gate_share"] < 1.0


def _groups(rows):
    out = {}
    for r in rows:
        out.setdefault((r["batch_size"], r["exec_rate"]), {})[r["executor"]] = r
    return list(out.values())


def _macs_by_flop_counter(model, x, **kw):
    """MACs of one forward pass as torch's FLOP counter sees them (the analytic table is not used)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, **kw)
    return counter.get_total_flops() / 2


def test_ideal_speedup_is_dense_over_mean_macs_counted_independently(rows):
    gated = create_model("cifar_resnet14").eval()
    plain = create_model("cifar_resnet14", gate="none").eval()
    for r in rows:
        if r["executor"] != "compact":
            continue
        b = r["batch_size"] * r["draws"]  # every batch of a timed call
        assert r["draws"] == math.ceil(32 / r["batch_size"])
        x = torch.randn(b, 3, 32, 32)
        # The harness's draw: per image and gate, Bernoulli(rate) from uniforms of seed 0.
        u = torch.rand(b, gated.num_gates, generator=torch.Generator().manual_seed(0))
        d = (u < r["exec_rate"]).float()
        dense = _macs_by_flop_counter(plain, x) / b
        mean = _macs_by_flop_counter(gated, x, mode="fixed", decisions=d, executor="compact") / b
        assert r["ideal_speedup"] == pytest.approx(dense / mean, rel=1e-9)
        assert r["measured_exec_rate"] == pytest.approx(d.mean().item())
    full = [r for r in rows if r["exec_rate"] == 1.0 and r["executor"] == "compact"]
    assert all(r["ideal_speedup"] < 1.0 for r in full)  # gates cost a little even when every block runs


def test_rows_and_environment_serialise_to_json(rows):
    text = json.dumps({"environment": bench_environment(), "rows": rows}, allow_nan=False)
    back = json.loads(text)
    assert back["rows"][0]["executor"] == rows[0]["executor"]
    env = back["environment"]
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["threads"] == torch.get_num_threads()
    assert env["torch"] == torch.__version__


def test_format_table_lists_every_row(rows):
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == len(rows) + 2  # header and rule
    assert "speedup" in lines[0] and "ideal" in lines[0] and "gate" in lines[0]
    assert all(r["executor"] in line for r, line in zip(rows, lines[2:]))


def test_trained_model_decisions_and_cpu_clock():
    torch.manual_seed(0)
    model = create_model("cifar_resnet8", num_classes=3)
    images = torch.randn(5, 3, 32, 32)
    out = run_bench(model, batch_sizes=(2, 7), decisions_from_model=True, inputs=images, repeats=1, warmup=0,
                    executors=("dense", "compact", "per_image"), clock="cpu")
    assert {r["executor"] for r in out} == {"dense", "compact", "per_image"} and len(out) == 6
    with torch.no_grad():
        d = model.eval()(images.repeat(2, 1, 1, 1)[:7], "greedy").decisions
    r7 = [r for r in out if r["batch_size"] == 7]
    assert all(r["exec_rate"] == pytest.approx(d.mean().item()) for r in r7)
    assert all(r["clock"] == "cpu" for r in out)
    assert out[0]["model"] == "cifar_resnet8[rnn]"


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="executor"):
        run_bench("cifar_resnet8", executors=("dense", "fast"))
    with pytest.raises(ValueError, match="rates"):
        run_bench("cifar_resnet8", exec_rates=(1.5,))
    with pytest.raises(ValueError, match="batch"):
        run_bench("cifar_resnet8", batch_sizes=(0,))
    with pytest.raises(ValueError, match="gated"):
        run_bench("cifar_resnet8", gate="none")
    with pytest.raises(ValueError, match="memory format"):
        run_bench("cifar_resnet8", memory_format="nhwc")
    with pytest.raises(ValueError, match="compact_no_gates"):
        run_bench("cifar_resnet8", gate="ffgate2", batch_sizes=(1,), exec_rates=(0.5,),
                  executors=("compact_no_gates",), repeats=1)


def test_channels_last_and_per_image_repeat_cap():
    out = run_bench("cifar_resnet8", batch_sizes=(4,), exec_rates=(0.5,), repeats=3, warmup=0,
                    memory_format="channels_last", per_image_max_calls=4)
    by = {r["executor"]: r for r in out}
    assert by["per_image"]["repeats"] == 1 and by["dense"]["repeats"] == 3
    assert all(math.isfinite(r["latency_ms_p50"]) for r in out)


def test_without_the_dense_executor_there_is_no_speedup():
    out = run_bench("cifar_resnet8", batch_sizes=(2,), exec_rates=(0.5,), repeats=1, warmup=0,
                    executors=("compact",))
    assert out[0]["speedup_vs_dense"] is None and "efficiency" not in out[0]
    json.dumps(out, allow_nan=False)
    assert "compact" in format_table(out)


def test_bench_help_offers_only_its_own_options(capsys):
    """The model argument's help spoke of a --data option that `skipnet bench` does not have."""
    from skipnet.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "--data" not in text and "Gaussian-noise images" in text
