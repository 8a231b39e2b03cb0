"""The analysis report: a folder with ``report.md``, ``metrics.json`` and one PNG per figure (SPEC §8.4)."""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from . import metrics as M
from . import plots as P
from .routing import Routing

log = logging.getLogger(__name__)

FIGURES = {
    "block_rates": "block_execution_rates.png",
    "per_class": "per_class_blocks.png",
    "accuracy_by_blocks": "accuracy_by_blocks.png",
    "macs_histogram": "macs_histogram.png",
    "gallery_easy": "gallery_easy.png",
    "gallery_hard": "gallery_hard.png",
    "gallery_per_class": "gallery_per_class.png",
    "input_scale": "input_scale.png",
    "tradeoff": "tradeoff.png",
}
REPORT_FILES = ("report.md", "metrics.json", *FIGURES.values())

ImageSource = torch.Tensor | np.ndarray | Mapping | Callable[[int], object]


def _jsonable(obj):
    """Plain JSON types: numpy scalars/arrays and tensors converted, tuples as lists, NaN/inf as null."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(v, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _speed_markdown(speed: Mapping) -> str:
    """The measured-speed numbers: each list of rows (dicts) as a table of its own, the rest as key / value."""
    tables, rest = [], {}
    for key, v in speed.items():
        if isinstance(v, (list, tuple)) and v and all(isinstance(row, Mapping) for row in v):
            cols = list(dict.fromkeys(c for row in v for c in row))
            tables += [f"`{key}`:", "", _table(cols, [[_value(row.get(c, "–")) for c in cols] for row in v]), ""]
        else:
            rest[key] = v
    if rest:
        tables += [_table(["measurement", "value"], [[k, _value(v)] for k, v in _flatten(rest)]), ""]
    return "\n".join(tables).rstrip()


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _image_getter(images: ImageSource | None, unnormalize, n: int) -> Callable[[int], object] | None:
    if images is None:
        return None
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if len(images) != n:
            raise ValueError(f"images_for_gallery holds {len(images)} images; the routing has {n}")
        get = images.__getitem__
    elif isinstance(images, Mapping):
        get = images.__getitem__
    elif callable(images):
        get = images
    else:
        raise ValueError("images_for_gallery must be a tensor/array (N, C, H, W), a mapping or a callable index->image")
    if unnormalize is None:
        return get
    if callable(unnormalize):
        return lambda i: unnormalize(get(i))
    mean, std = (np.asarray(v, dtype=np.float64).reshape(-1, 1, 1) for v in unnormalize)

    def undo(i: int):
        img = get(i)
        a = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        return a.astype(np.float64) * std + mean  # (C, H, W)

    return undo


def _caption(r: Routing, i: int, names: Sequence[str]) -> str:
    short = lambda s: s if len(s) <= 14 else s[:13] + "…"
    return f"label: {short(names[r.labels[i]])}\npred: {short(names[r.preds[i]])}\n{_blocks(r.executed_blocks[i])}"


def _blocks(n: int) -> str:
    return f"{n} block" + ("" if n == 1 else "s")


def _prepare_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace the report in it")
        for name in REPORT_FILES:  # only this writer's files: nothing else in the folder is touched
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _environment() -> dict:
    try:
        from skipnet import __version__ as version
    except ImportError:  # pragma: no cover
        version = None
    import matplotlib

    return {"skipnet": version, "torch": torch.__version__, "numpy": np.__version__,
            "matplotlib": matplotlib.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_report(
    out_dir: str | Path,
    routing: Routing,
    *,
    model_name: str,
    class_names: Sequence[str] | None = None,
    images_for_gallery: ImageSource | None = None,
    unnormalize: Callable | tuple[Sequence[float], Sequence[float]] | None = None,
    speed: Mapping | None = None,
    scale_analysis: Sequence[Mapping] | None = None,
    sweep: Sequence[Mapping] | None = None,
    tradeoff_series: Mapping[str, Sequence[Sequence]] | None = None,
    extra: Mapping | None = None,
    notes: Sequence[str] = (),
    gallery_size: int = 16,
    top_paths: int = 10,
    overwrite: bool = False,
) -> Path:
    """Write the analysis report of ``routing`` into ``out_dir`` and return the path of ``report.md``.

    ``images_for_gallery``: the images in routing order, as a tensor/array (N, C, H, W) (uint8, or float in
    [0, 1] after ``unnormalize``), a mapping index -> image (e.g. from
    :func:`~skipnet.analysis.routing.gather_images`) or a callable index -> image; None skips the galleries.
    ``unnormalize``: a callable image -> image or ``(mean, std)`` per channel, applied before display.
    ``speed``: measured latency / speed-up numbers (free-form, nested dicts allowed; a list of dicts becomes a
    table of its own).
    ``scale_analysis`` / ``sweep``: rows from :func:`input_scale_analysis` / :func:`threshold_sweep`.
    ``tradeoff_series``: ``{name: [(macs, top-1 %[, label]), ...]}`` (e.g. HRL runs at several alpha, plain
    ResNets of several depths, as accuracy points); the tau sweep is added as its own series. ``extra``:
    anything else to record. ``notes``: warnings shown at the top of the report (e.g. an unfinished run).

    Refuses (``FileExistsError``) to write into a non-empty folder unless ``overwrite=True``, which removes
    only the files this function writes.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    r = routing
    names = [str(c) for c in class_names] if class_names is not None else [str(c) for c in range(r.num_classes)]
    if len(names) != r.num_classes:
        raise ValueError(f"class_names has {len(names)} names; the model has {r.num_classes} classes")
    get_image = _image_getter(images_for_gallery, unnormalize, r.num_images)
    _prepare_dir(out_dir, overwrite)

    summary = M.summarize(r)
    rates = M.block_execution_rates(r)
    class_acc, class_count = M.per_class_accuracy(r)
    class_mean = M.per_class_mean_blocks(r)
    class_hist = M.per_class_block_histogram(r)
    by_blocks = M.accuracy_by_blocks(r)
    n_paths, paths = M.routing_paths(r, top_paths)
    executed = r.executed_blocks
    div, unit = P.mac_unit([r.plain_macs])
    figs: dict[str, str] = {}

    def fig(key: str, draw: Callable[[Path], object]) -> None:
        draw(out_dir / FIGURES[key])
        figs[key] = FIGURES[key]

    mode = f"{r.mode}" + (f", τ = {r.tau:g}" if r.mode == "greedy" else "")
    fig("block_rates", lambda p: P.plot_block_execution_rates(
        rates, r.stage_of_block, p, title=f"{model_name}: per-block execution rate ({mode})"))
    fig("per_class", lambda p: P.plot_per_class(
        executed, r.labels, names, class_acc, p, num_blocks=r.num_blocks,
        title=f"{model_name}: executed blocks and accuracy per class"))
    fig("accuracy_by_blocks", lambda p: P.plot_accuracy_by_blocks(
        by_blocks, p, overall=summary["top1"], title=f"{model_name}: accuracy by number of executed blocks"))
    fig("macs_histogram", lambda p: P.plot_macs_histogram(
        r.macs, r.plain_macs, r.dense_macs, p, title=f"{model_name}: per-image MACs (gates included)"))

    galleries: dict[str, list[int]] = {}
    if get_image is not None:
        for kind, blurb in (("easy", "fewest executed blocks"), ("hard", "most executed blocks")):
            idx = M.gallery_indices(r, gallery_size, kind)
            galleries[kind] = idx.tolist()
            fig(f"gallery_{kind}", lambda p, idx=idx, kind=kind, blurb=blurb: P.plot_gallery(
                [get_image(int(i)) for i in idx], [_caption(r, int(i), names) for i in idx], r.correct[idx], p,
                title=f"{model_name}: {kind} images ({blurb}); green = correct, red = wrong",
                ncols=min(8, len(idx))))
        present = [c for c in range(r.num_classes) if class_count[c] > 0]
        if 0 < len(present) <= 10:
            k = 4
            cells, caps, oks, per_class = [], [], [], {}
            for c in present:
                easy = M.gallery_indices(r, k, "easy", label=c).tolist()
                hard = [i for i in M.gallery_indices(r, 2 * k, "hard", label=c).tolist() if i not in easy][:k]
                hard = hard[::-1]  # most blocks at the far right; a small class is not shown twice
                per_class[names[c]] = {"easy": easy, "hard": hard[::-1]}
                for row in (easy, hard):
                    row = row + [None] * (k - len(row))
                    cells += [None if i is None else get_image(i) for i in row]
                    caps += [None if i is None else f"pred: {names[r.preds[i]][:12]}\n{_blocks(executed[i])}"
                             for i in row]
                    oks += [True if i is None else bool(r.correct[i]) for i in row]
            galleries["per_class"] = per_class  # type: ignore[assignment]
            fig("gallery_per_class", lambda p: P.plot_gallery(
                cells, caps, oks, p, ncols=2 * k, row_labels=[names[c] for c in present], split_col=k,
                split_titles=(f"{k} with fewest blocks", f"{k} with most blocks"),
                title=f"{model_name}: easy and hard images per class; green = correct, red = wrong"))

    if scale_analysis:
        fig("input_scale", lambda p: P.plot_input_scale(
            scale_analysis, p, title=f"{model_name}: executed blocks at different input scales"))

    series = {k: list(v) for k, v in (tradeoff_series or {}).items()}
    if sweep:
        series[f"{model_name}, τ sweep"] = [(row["mean_macs"], row["accuracy"], f"τ={row['tau']:g}") for row in sweep]
    if series:
        fig("tradeoff", lambda p: P.plot_tradeoff(series, p, title=f"{model_name}: accuracy vs compute"))

    metrics = {
        "model": model_name,
        "input_size": list(r.input_size) if r.input_size else None,
        "mode": r.mode,
        "tau": r.tau,
        **summary,
        "block_execution_rates": rates,
        "stage_of_block": list(r.stage_of_block),
        "blocks_histogram": M.blocks_histogram(r),
        "per_class": [
            {"class": c, "name": names[c], "count": int(class_count[c]), "accuracy": float(class_acc[c]),
             "mean_blocks": float(class_mean[c]), "blocks_hist": class_hist[c]}
            for c in range(r.num_classes)
        ],
        "accuracy_by_blocks": by_blocks,
        "paths": {"distinct": n_paths,
                  "top": [{"path": p, "count": n, "fraction": n / r.num_images, "skipped_blocks": M.skipped_blocks(p)}
                          for p, n in paths]},
        "gallery_indices": galleries,
        "speed": speed,
        "input_scale": list(scale_analysis) if scale_analysis else None,
        "threshold_sweep": list(sweep) if sweep else None,
        "tradeoff_series": series or None,
        "extra": extra,
        "notes": list(notes),
        "figures": figs,
        "environment": _environment(),
    }
    (out_dir / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2, allow_nan=False) + "\n")

    md = _markdown(r, model_name, mode, names, summary, rates, class_acc, class_count, class_mean, by_blocks,
                   n_paths, paths, figs, speed, scale_analysis, sweep, extra, notes, series, div, unit)
    path = out_dir / "report.md"
    path.write_text(md)
    log.info("wrote report to %s (%d figures, %.1f s)", out_dir, len(figs), time.perf_counter() - t0)
    return path


def _markdown(r, model_name, mode, names, summary, rates, class_acc, class_count, class_mean, by_blocks, n_paths,
              paths, figs, speed, scale_analysis, sweep, extra, notes, series, div, unit) -> str:
    m = summary["macs"]
    size = f"{r.input_size[0]}×{r.input_size[1]}" if r.input_size else "mixed"
    out = [f"# SkipNet analysis: {model_name}", ""]
    out += [f"> **Warning:** {note}" + ("" if k + 1 == len(notes) else "  ") for k, note in enumerate(notes)]
    out += [""] if notes else []
    out += [
           f"{r.num_images} images ({size}), {r.num_classes} classes, {r.num_gates} gates / {r.num_blocks} blocks; "
           f"decisions: {mode}.", "", "## Headline", ""]
    rows = [["top-1 accuracy", f"{summary['top1']:.2f}%"]]
    if "top5" in summary:
        rows.append(["top-5 accuracy", f"{summary['top5']:.2f}%"])
    rows += [
        ["mean MACs per image (gates included) ± std", f"{m['mean'] / div:.2f} ± {m['std'] / div:.2f} {unit}"],
        ["range of per-image MACs", f"{m['min'] / div:.2f} – {m['max'] / div:.2f} {unit}"],
        ["plain ResNet, same depth", f"{m['plain'] / div:.2f} {unit}"],
        ["this SkipNet with every block run", f"{m['dense'] / div:.2f} {unit}"],
        ["**MAC reduction vs plain ResNet**", f"**{summary['reduction_vs_plain_pct']:.1f}%**"],
        ["MAC reduction vs every block run", f"{summary['reduction_vs_dense_pct']:.1f}%"],
        ["block fraction (authors' computation percentage)", f"{summary['block_fraction_pct']:.1f}%"],
        ["mean executed blocks", f"{summary['mean_executed_blocks']:.2f} of {r.num_blocks}"],
        ["distinct routing paths", f"{n_paths}"],
    ]
    out += [_table(["metric", "value"], rows), ""]
    out += ["MACs count every convolution, linear layer and the gates (run for every image); a skipped "
            "downsampling block still pays for its projection shortcut. Reduction = 100·(1 − mean / plain). "
            "Block fraction = (1 + Σ per-gate execution rate) / (G + 1).", ""]
    if speed:
        out += ["## Measured speed", "", _speed_markdown(speed), ""]
    out += ["## Per-block execution rate", "", f"![per-block execution rate]({figs['block_rates']})", "",
            "<details><summary>table</summary>", ""]
    trans = {i for i in range(1, r.num_blocks) if r.stage_of_block[i] != r.stage_of_block[i - 1]}
    out += [_table(["block", "stage", "execution rate", "note"],
                   [[i, r.stage_of_block[i] + 1, f"{100 * v:.1f}%",
                     "always runs" if i == 0 else ("downsampling" if i in trans else "")]
                    for i, v in enumerate(rates)]), "", "</details>", ""]
    out += ["## Per class", "", f"![executed blocks per class]({figs['per_class']})", ""]
    order = sorted(range(r.num_classes), key=lambda c: (np.nan_to_num(class_mean[c], nan=np.inf), c))
    out += [_table(["class", "images", "top-1", "mean executed blocks"],
                   [[names[c], int(class_count[c]), f"{_f(float(class_acc[c]), 1)}%", _f(float(class_mean[c]))]
                    for c in order]), "", "Sorted by mean executed blocks (fewest first).", ""]
    out += ["## Accuracy by number of executed blocks", "", f"![accuracy by blocks]({figs['accuracy_by_blocks']})",
            "", _table(["executed blocks", "images", "top-1"],
                       [[row["blocks"], row["count"], f"{_f(row['accuracy'], 1)}%"] for row in by_blocks]), ""]
    out += ["## Per-image MACs", "", f"![per-image MACs]({figs['macs_histogram']})", ""]
    out += ["## Routing paths", "", f"{n_paths} distinct paths among {r.num_images} images. A path lists the "
            "gates in order, `1` = block run; gate i guards block i + 1.", ""]
    out += [_table(["rank", "images", "share", "executed blocks", "skipped blocks", "path"],
                   [[j + 1, n, f"{100 * n / r.num_images:.1f}%", 1 + p.count("1"),
                     ", ".join(map(str, M.skipped_blocks(p))) or "none", f"`{p}`"]
                    for j, (p, n) in enumerate(paths)]), ""]
    if "gallery_easy" in figs:
        out += ["## Easy and hard images", "",
                "Images that ran the fewest and the most blocks (ties: fewer / more MACs, then input order).", "",
                f"![easy images]({figs['gallery_easy']})", "", f"![hard images]({figs['gallery_hard']})", ""]
        if "gallery_per_class" in figs:
            out += [f"![easy and hard per class]({figs['gallery_per_class']})", ""]
    else:
        out += ["## Easy and hard images", "", "No images were given: galleries skipped.", ""]
    if scale_analysis:
        out += ["## Input scale", "", f"![input scale]({figs['input_scale']})", ""]
        ref = scale_analysis[0].get("reference_scale", 1.0)
        out += [_table(["scale", "size", "top-1", "mean blocks", f"mean MACs ({unit})",
                        f"plain MACs ({unit})", "reduction", f"mean shift vs {ref:g}×", "fewer / more blocks"],
                       [[f"{row['scale']:g}×", "×".join(map(str, row["input_size"] or [])) or "mixed",
                         f"{row['accuracy']:.2f}%", f"{row['mean_blocks']:.2f}", f"{row['mean_macs'] / div:.2f}",
                         f"{row['plain_macs'] / div:.2f}", f"{row['reduction_pct']:.1f}%",
                         f"{row['mean_block_shift']:+.2f}",
                         f"{100 * row['fraction_fewer_blocks']:.0f}% / {100 * row['fraction_more_blocks']:.0f}%"]
                        for row in scale_analysis]), ""]
    if sweep or "tradeoff" in figs:
        out += ["## Accuracy vs compute", ""]
        if "tradeoff" in figs:
            out += [f"![trade-off]({figs['tradeoff']})", ""]
            if not any(name.startswith("plain") for name in series):
                out += [f"No plain ResNet run was given to place as an accuracy point (`skipnet report --plain "
                        f"RUN`); the plain ResNet of this depth costs {m['plain'] / div:.2f} {unit} per image.", ""]
        if sweep:
            out += ["Greedy threshold τ: a block runs when its gate's probability ≥ τ (one forward pass per τ).", "",
                    _table(["τ", "top-1", f"mean MACs ({unit})", "reduction vs plain", "block fraction", "mean blocks"],
                           [[f"{row['tau']:g}", f"{row['accuracy']:.2f}%", f"{row['mean_macs'] / div:.2f}",
                             f"{row['reduction_pct']:.1f}%", f"{row['block_fraction_pct']:.1f}%",
                             f"{row['mean_blocks']:.2f}"] for row in sweep]), ""]
    if extra:
        out += ["## Other", "", _table(["key", "value"], [[k, _value(v)] for k, v in _flatten(extra)]), ""]
    out += ["All numbers are in `metrics.json`.", ""]
    return "\n".join(out)
