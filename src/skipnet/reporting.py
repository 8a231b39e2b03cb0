"""Glue between trained runs, data, the analysis layer and the bench harness: ``skipnet report`` / ``sweep``."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from .data import BatchLoader, ImageData, load_dataset
from .train import evaluate
from .train.checkpoint import build_model_from_checkpoint, load_checkpoint

log = logging.getLogger(__name__)


def load_eval_data(payload: dict[str, Any], data: str | None = None, root: str | None = None,
                   split: str | None = None) -> ImageData:
    """The test set a checkpoint is evaluated on: the run's own dataset and split unless named."""
    run = payload.get("run_config", {}).get("data", {})
    name = data or run.get("name")
    if name is None:
        raise ValueError("this checkpoint does not say which data it was trained on: pass --data")
    root = root if root is not None else (run.get("root") if name == run.get("name") else None)
    cache = run.get("cache_dir")
    test = load_dataset(name, root, split or run.get("test_split", "test"), cache_dir=Path(cache) if cache else None)
    classes = payload.get("model_config", {}).get("num_classes")
    if classes is not None and test.num_classes != classes:
        raise ValueError(f"the model has {classes} classes but {name} has {test.num_classes}: evaluate it on "
                         f"data of the classes it was trained on (--data, --data-root)")
    return test


def load_run(path: str | Path, device: torch.device, *, warn: bool = True) -> tuple[Any, dict[str, Any]]:
    """The network of a checkpoint or run folder on ``device``, in eval mode, and the checkpoint; logs a
    warning (unless not ``warn``) when its run did not finish its schedule (:func:`unfinished`)."""
    from .published import list_pretrained, published_path

    if not Path(path).exists() and str(path) in list_pretrained():
        path = published_path(str(path))  # a published network by name (its hash checked)
    payload = load_checkpoint(path)
    model = build_model_from_checkpoint(payload, path).to(device).eval()
    note = unfinished(payload, path)
    if note and warn:
        log.warning("%s", note)
    return model, payload


def run_tau(payload: dict[str, Any]) -> float:
    """The greedy threshold a run is evaluated at: the one fitted to its compute target (``fit_tau``), else
    its config's ``tau`` (0.5 unless set)."""
    if payload.get("tau") is not None:
        return float(payload["tau"])
    return float(payload.get("run_config", {}).get("train", {}).get("tau", 0.5))


def unfinished(payload: dict[str, Any], path: str | Path) -> str | None:
    """A warning when the checkpoint is not the end of its run's training schedule (stopped by a signal, a
    crash or ``max_steps``, or a checkpoint taken mid-run), else ``None``."""
    if payload.get("finished", True):
        return None
    step, total = payload.get("step"), payload.get("total_steps")
    return f"{path} did not finish its schedule (step {step}{'' if total is None else f' of {total}'})"


def run_label(payload: dict[str, Any]) -> str:
    """A short point label for a trade-off plot: the HRL alpha / target, or the plain depth."""
    cfg = payload.get("model_config", {})
    train = payload.get("run_config", {}).get("train", {})
    if cfg.get("gate") == "none":
        return f"R-{cfg.get('depth')}" + (f" ({'/'.join(map(str, cfg['layout']))})" if cfg.get("layout") else "")
    seed = f", seed {train['seed']}" if train.get("seed") else ""
    if "method" in cfg:  # a rival: its ponder cost or skipping rate
        rate = f"d={cfg.get('drop_rate'):g}" if cfg["method"] == "sdv" else f"ponder τ={train.get('ponder_cost'):g}"
        return rate + seed
    if train.get("stage") in ("hrl", "calibrate"):
        if train.get("target_macs") is not None:
            return f"target {train['target_macs']:g}{seed}"
        return f"α={train.get('alpha'):g}{seed}"
    return train.get("stage", "run").upper()


def measure_speed(model, data: ImageData, batch_sizes: Sequence[int] = (1, 256), device: str = "cpu",
                  tau: float = 0.5, budget_s: float = 2.0) -> dict[str, Any]:
    """Wall-clock speed-up of the compact executor over the dense (plain) network on real test images and
    the model's own greedy decisions, from the bench harness; with the ideal (MAC) speed-up beside it."""
    from .bench import bench_environment, run_bench

    loader = BatchLoader(data.subset(slice(0, max(batch_sizes) * 2)), max(batch_sizes), train=False, device=device)
    inputs = torch.cat([x for x, _ in loader])
    rows = run_bench(model, batch_sizes=batch_sizes, executors=("dense", "compact"), device=device,
                     decisions_from_model=True, tau=tau, inputs=inputs, budget_s=budget_s)
    keep = ("executor", "batch_size", "exec_rate", "latency_ms_p50", "latency_ms_p90", "images_per_s",
            "speedup_vs_dense", "ideal_speedup")
    compact = [{k: r[k] for k in keep if k in r} for r in rows if r["executor"] == "compact"]
    dense = [{k: r[k] for k in keep if k in r} for r in rows if r["executor"] == "dense"]
    env = bench_environment(device)
    return {"rows": compact, "dense": dense, "environment": {k: env[k] for k in ("torch", "device", "threads")
                                                              if k in env}}


def make_report(checkpoint: str | Path, *, data: str | None = None, data_root: str | None = None,
                split: str | None = None, out: str | Path | None = None, tau: float | None = None,
                taus: Sequence[float] = (), scales: Sequence[float] = (), sweep_images: int | None = 5000,
                compare: Sequence[str] = (), plain: Sequence[str] = (), speed: bool | dict = True,
                overwrite: bool = False, batch_size: int = 500, device: str = "auto", progress: bool = False,
                test_data: ImageData | None = None) -> Path:
    """Analyse a trained network and write its report folder; returns the path of ``report.md``. ``tau``:
    the operating threshold (default: the run's own, :func:`run_tau`)."""
    from .analysis import run_analysis, write_report
    from .train.device import resolve_device

    dev = resolve_device(device)
    model, payload = load_run(checkpoint, dev)
    if not model.is_gated:
        what = f"an {model.method.upper()} network" if hasattr(model, "method") else "a plain ResNet"
        raise ValueError(f"{checkpoint} holds {what}; a report analyses a SkipNet (pass it as --plain or --compare)")
    notes = [unfinished(payload, checkpoint)]
    tau = run_tau(payload) if tau is None else tau
    test = test_data or load_eval_data(payload, data, data_root, split)
    loader = BatchLoader(test, batch_size, train=False, device=dev)
    analysis = run_analysis(model, loader, tau=tau, taus=taus, scales=scales, executor="compact",
                            progress=progress, sweep_images=sweep_images)
    series: dict[str, list] = {}
    for path in compare:
        m, p = load_run(path, dev)
        notes.append(unfinished(p, path))
        r = evaluate(m, loader, tau=run_tau(p), executor="compact")
        name = run_series(p) if hasattr(m, "method") else "SkipNet runs"  # a rival: its own series
        series.setdefault(name, []).append((r["macs_per_image"], r["accuracy"], run_label(p)))
    for path in plain:  # accuracy points, as in make_sweep
        m, p = load_run(path, dev)
        notes.append(unfinished(p, path))
        r = evaluate(m, loader)
        series.setdefault("plain ResNet", []).append((r["macs_per_image"], r["accuracy"], run_label(p)))
    speed_numbers = speed if isinstance(speed, dict) else (measure_speed(model, test, device=str(dev), tau=tau)
                                                           if speed else None)
    ckpt = Path(checkpoint)
    out = Path(out) if out else (ckpt if ckpt.is_dir() else ckpt.parent) / "report"
    return write_report(
        out, analysis.routing, model_name=f"{model_title(model.config)} on {test.name}",
        class_names=test.classes, images_for_gallery=test.images, speed=speed_numbers,
        scale_analysis=analysis.scales, sweep=analysis.sweep, tradeoff_series=series or None,
        extra={"checkpoint": str(checkpoint), "data": test.name, "tau": tau,
               "stage": payload.get("run_config", {}).get("train", {}).get("stage"),
               "finished": payload.get("finished", True)},
        notes=[n for n in notes if n], overwrite=overwrite)


GATE_NAMES = {"rnn": "RNN", "ffgate1": "FFGate-I", "ffgate2": "FFGate-II"}


def model_title(cfg: Any) -> str:
    """``SkipNet-20 (RNN gates)``; ImageNet-layout networks say so (depth 152 exists in both layouts)."""
    layout = ", ImageNet layout" if cfg.arch == "imagenet" else ""
    if getattr(cfg, "layout", None):
        layout = ", blocks " + "/".join(str(k) for k in cfg.layout)
    return f"SkipNet-{cfg.depth} ({GATE_NAMES.get(cfg.gate, cfg.gate)} gates{layout})"


SERIES_NAMES = {"hrl": "SkipNet SP→HRL", "calibrate": "calibrate (ours: global τ + fine-tuning)",
                "sp": "SkipNet SP (τ 0.5)", "baseline": "plain ResNet", "act": "ACT (per-image halting)",
                "sact": "SACT (per-position halting)", "sdv": "SDV (random skipping, trained for it)"}


LEARNED_SET_SERIES = "plain ResNet of a SkipNet's most-run blocks at its MACs (blocks per stage)"


def static_block_set(stage_of_block: Sequence[int], exec_rates: Sequence[float], *,
                     tol: float = 0.02) -> tuple[int, ...] | None:
    """The blocks per stage that a *static* SkipNet policy runs, as a ``layout`` for the plain network of
    those blocks alone (the static baseline of a learned policy: train it from scratch and compare). The
    first block is never gated; ``exec_rates`` are the gated blocks' execution rates (e.g. ``evaluate``'s).
    ``None`` when the policy routes (a rate between ``tol`` and ``1 - tol``), skips a stage's first block
    (where a plain network downsamples: a SkipNet that skips it keeps only the shortcut, which no layout
    builds) or leaves a stage empty."""
    from .models import kept_layout

    rates = [float(r) for r in exec_rates]
    if len(rates) != len(stage_of_block) - 1:
        raise ValueError(f"expected {len(stage_of_block) - 1} execution rates (one per gate); got {len(rates)}")
    if any(tol < r < 1 - tol for r in rates):
        return None
    try:
        counts = kept_layout(stage_of_block, [r >= 1 - tol for r in rates])
    except ValueError:  # a stage's first block skipped
        return None
    return counts if all(counts) else None


def matched_block_set(stage_of_block: Sequence[int], exec_rates: Sequence[float], block_macs: Sequence[int],
                      plain_macs: int, macs: float) -> tuple[tuple[int, ...], int]:
    """The static block set a routing SkipNet policy is measured against: the plain network of every stage's
    first block and of the blocks the policy runs most often, as many of them as bring its MACs nearest the
    policy's ``macs`` (per image). Returns its ``layout`` (blocks per stage) and its MACs per image.

    ``exec_rates`` are the gated blocks' execution rates (``evaluate``'s), ``block_macs`` their whole blocks'
    MACs (:class:`~skipnet.cost.MacTable` ``block_full``) and ``plain_macs`` the plain network's (every block,
    no gates). A stage's first block is always kept (a plain network downsamples there) and the others are
    taken in order of falling rate (the earlier block first on a tie); for a static policy at its own MACs
    this is the set it keeps (:func:`static_block_set`). Ties in distance go to the larger network."""
    rates = [float(r) for r in exec_rates]
    if not (len(rates) == len(block_macs) == len(stage_of_block) - 1):
        raise ValueError(f"expected {len(stage_of_block) - 1} execution rates and block MACs (one per gate); got "
                         f"{len(rates)} and {len(block_macs)}")
    first = [stage_of_block[i + 1] != stage_of_block[i] for i in range(len(rates))]
    others = sorted((i for i in range(len(rates)) if not first[i]), key=lambda i: (-rates[i], i))
    costs = [plain_macs - sum(block_macs[i] for i in others[kept:]) for kept in range(len(others) + 1)]
    kept = min(range(len(costs)), key=lambda k: (abs(costs[k] - macs), -k))  # a tie: the larger network
    keep = [first[i] or i in others[:kept] for i in range(len(rates))]
    from .models import kept_layout

    return kept_layout(stage_of_block, keep), costs[kept]


def run_series(payload: dict[str, Any]) -> str:
    """The trade-off series a run belongs to, by its stage (HRL runs by their objective)."""
    train = payload.get("run_config", {}).get("train", {})
    stage = "baseline" if payload.get("model_config", {}).get("gate") == "none" else train.get("stage", "sp")
    if stage == "baseline" and payload.get("model_config", {}).get("layout"):
        return LEARNED_SET_SERIES
    name = SERIES_NAMES.get(stage, stage)
    if stage == "hrl":
        paper = dict(baseline="none", target_macs=None, explore=0.0, entropy=0.0, cost="uniform",
                     rl_reduction="sum", skip_cap=None, label_smoothing=0.0)
        name += " (paper objective)" if all(train.get(k, v) == v for k, v in paper.items()) else " (ours)"
    return name


def make_sweep(runs: Sequence[str], *, plain: Sequence[str] = (), taus: Sequence[float] = (),
               sweep: Sequence[str] | None = None, random_from: str | None = None, random_seeds: int = 1,
               data: str | None = None, data_root: str | None = None, split: str | None = None,
               out: str | Path, overwrite: bool = False, batch_size: int = 500, device: str = "auto",
               progress: bool = False, title: str | None = None) -> list[dict[str, Any]]:
    """The accuracy/compute trade-off of several runs as one table and one plot in ``out``.

    * a threshold sweep at ``taus`` of every run in ``sweep`` (default: ``runs[0]``; pass SP and HRL runs);
    * every run in ``runs`` at its own tau (:func:`run_tau`), one series per stage (SP→HRL, calibrate, ...;
      see :func:`run_series`);
    * random skipping on the weights of ``random_from`` (an SP run: the paper's stochastic-depth variant), once
      per SkipNet run of ``runs`` at that run's per-block execution rates, so at the same expected MACs, and at
      the same rates on the run's own weights (what per-image routing adds over fixed per-block rates);
    * ``plain`` ResNets as accuracy points (the static line).
    Writes ``sweep.json``, ``sweep.md``, ``tradeoff.png``; returns the table's rows."""
    from .analysis import threshold_sweep
    from .train.device import resolve_device
    from .train.evaluate import random_skipping

    out = Path(out)
    files = [out / n for n in ("sweep.json", "sweep.md", "tradeoff.png")]
    if any(f.exists() for f in files) and not overwrite:
        raise FileExistsError(f"{out} already holds a sweep; pass --overwrite or another --out")
    if not runs and not plain:
        raise ValueError("make_sweep needs at least one run")
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    warned: set[str] = set()

    def load(path: str) -> tuple[Any, dict[str, Any]]:  # load_run, naming each unfinished run once
        loaded = load_run(path, dev, warn=str(path) not in warned)
        warned.add(str(path))
        return loaded

    _, payload = load((list(runs) or list(plain))[0])
    test = load_eval_data(payload, data, data_root, split)
    loader = BatchLoader(test, batch_size, train=False, device=dev)
    table: list[dict[str, Any]] = []

    def add(series: str, label: str, r: dict[str, Any], run: str) -> None:
        table.append({"series": series, "label": label, "accuracy": r["accuracy"], "macs": r["macs_per_image"],
                      "reduction": r["mac_reduction"], "run": str(run),
                      **({"exec_rates": r["exec_rates"]} if "exec_rates" in r else {})})

    for path in (list(runs[:1]) if sweep is None else list(sweep)) if taus else []:
        m, p = load(path)
        if not m.is_gated:  # a plain ResNet or a rival (ACT, SACT, SDV) has no threshold to sweep
            log.info("%s has no gates: no threshold sweep", path)
            continue
        for row in threshold_sweep(m, loader, taus, executor="compact", progress=progress):
            table.append({"series": f"τ sweep ({run_series(p)}, {Path(path).name})", "label": f"τ={row['tau']:g}",
                          "accuracy": row["accuracy"], "macs": row["mean_macs"], "reduction": row["reduction_pct"],
                          "run": str(path)})
    source = load(random_from)[0] if random_from else None
    for path in runs:
        m, p = load(path)
        r = evaluate(m, loader, tau=run_tau(p), executor="compact")
        add(run_series(p), run_label(p), r, path)
        table[-1]["tau"] = run_tau(p)
        if source is not None and m.is_gated:
            kind = "HRL" if p.get("run_config", {}).get("train", {}).get("stage") == "hrl" else "calibrate"
            for seed in range(random_seeds):
                label = f"as {kind} {run_label(p)}" + (f", draw {seed}" if random_seeds > 1 else "")
                rr = random_skipping(source, loader, r["exec_rates"], seed=seed)
                add(f"random skipping ({Path(random_from).name} weights)", label, rr, random_from)
                # the same rates on the run's own weights: what per-image routing adds over fixed rates
                rr = random_skipping(m, loader, r["exec_rates"], seed=seed)
                add("random skipping (each run's own weights)", label, rr, path)
    for path in plain:
        m, p = load(path)
        add("plain ResNet", run_label(p), evaluate(m, loader), path)
    plot_table(table, out / "tradeoff.png", title=title or f"Accuracy vs compute on {test.name}")
    files[0].write_text(json.dumps(table, indent=2))
    files[1].write_text(sweep_markdown(table) + "\n\n![trade-off](tradeoff.png)\n")
    return table


def plot_table(table: Sequence[dict[str, Any]], path: str | Path, *, title: str,
               ylim: tuple[float, float] | None = None) -> Path:
    """The trade-off plot of a sweep table's rows: one series per row ``series``, points labelled; ``ylim``
    zooms on an accuracy band (see :func:`zoom_band`)."""
    from .analysis import plot_tradeoff

    series: dict[str, list] = {}
    for row in table:
        series.setdefault(row["series"], []).append((row["macs"], row["accuracy"], row["label"]))
    return plot_tradeoff(series, path, title=title, styles=tradeoff_styles(series), ylim=ylim)


def zoom_band(table: Sequence[dict[str, Any]], below: float = 2.0, above: float = 0.5) -> tuple[float, float] | None:
    """The accuracy band where the comparison with the plain line is decided: from ``below`` points under the
    least accurate plain ResNet to ``above`` over the most accurate row. None without plain rows."""
    plain = [row["accuracy"] for row in table if row["series"] == "plain ResNet"]
    if not plain:
        return None
    return min(plain) - below, max(row["accuracy"] for row in table) + above


def carry_recorded(table: Sequence[dict[str, Any]], recorded: Sequence[dict[str, Any]],
                   runs: Collection[str]) -> list[dict[str, Any]]:
    """``table`` (rows measured now) plus the rows of an earlier sweep (``recorded``) that belong to ``runs``
    -- run folder names (e.g. ``plain-resnet26``) that were asked for but are not on this machine. A carried
    row keeps its own ``date`` and is marked ``carried``; a recorded row of a run measured now is dropped."""
    names, measured = set(runs), {Path(row["run"]).name for row in table}
    carried = [row for row in recorded if Path(row["run"]).name in names - measured]
    for row in carried:
        if "date" not in row:
            raise ValueError(f"recorded row {row.get('series')!r} / {row.get('label')!r} has no date: cannot carry it")
    return list(table) + [{**row, "carried": True} for row in carried]


def tradeoff_styles(series: dict[str, list]) -> dict[str, dict]:
    """Points of different runs that are not one curve (runs at tau 0.5, random skipping per run) are drawn
    unjoined; tau sweeps and the plain ResNets' static line are joined."""
    return {name: {"ls": "none"} for name in series if not (name.startswith("τ sweep") or name == "plain ResNet")}


def sweep_markdown(table: Sequence[dict[str, Any]]) -> str:
    lines = ["| series | point | top-1 (%) | MACs/image (M) | reduction vs plain (%) |", "|---|---|---|---|---|"]
    for r in table:  # a row carried from an earlier sweep says when it was measured
        label = f"{r['label']} (measured {r['date']})" if r.get("carried") else r["label"]
        lines.append(f"| {r['series']} | {label} | {r['accuracy']:.2f} | {r['macs'] / 1e6:.2f} "
                     f"| {r['reduction']:.1f} |")
    return "\n".join(lines)
