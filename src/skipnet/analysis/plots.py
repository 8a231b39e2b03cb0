"""Figures for the analysis report (PNG, matplotlib).

Every function draws on a fresh :class:`matplotlib.figure.Figure` (no pyplot, no global backend change, safe
without a display), writes ``path`` and returns it. Inputs are plain arrays and dicts, so a figure can be
redrawn from ``metrics.json``. MACs are given raw and shown in MMACs or GMACs (the unit is on the axis).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

log = logging.getLogger(__name__)

DPI = 120
_STAGE_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def mac_unit(values: Sequence[float] | np.ndarray) -> tuple[float, str]:
    """``(divisor, unit)`` for showing MAC counts: GMACs from 1e9, else MMACs (KMACs below 1e5)."""
    peak = float(np.nanmax(np.abs(np.asarray(values, dtype=np.float64)))) if len(values) else 0.0
    if peak >= 1e9:
        return 1e9, "GMACs"
    if peak >= 1e5:
        return 1e6, "MMACs"
    return 1e3, "KMACs"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    log.debug("wrote %s", path)
    return path


def _stage_spans(stage_of_block: Sequence[int]) -> list[tuple[int, int, int]]:
    """``[(stage, first block, last block)]`` in network order."""
    spans: list[tuple[int, int, int]] = []
    for i, s in enumerate(stage_of_block):
        if spans and spans[-1][0] == s:
            spans[-1] = (s, spans[-1][1], i)
        else:
            spans.append((s, i, i))
    return spans


def _mark_stages(ax, stage_of_block: Sequence[int], *, label_y: float, vertical: bool = True) -> None:
    """Shade each stage, draw its boundaries and label it ("stage k") at ``label_y`` (axes fraction)."""
    for s, lo, hi in _stage_spans(stage_of_block):
        colour = _STAGE_COLOURS[s % len(_STAGE_COLOURS)]
        ax.axvspan(lo - 0.5, hi + 0.5, color=colour, alpha=0.08, lw=0)
        if lo > 0:
            ax.axvline(lo - 0.5, color="0.35", ls="--", lw=1)
        ax.text((lo + hi) / 2, label_y, f"stage {s + 1}", transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=9, color=colour, fontweight="bold")


def plot_block_execution_rates(
    rates: Sequence[float],
    stage_of_block: Sequence[int],
    path: str | Path,
    *,
    title: str = "Per-block execution rate",
) -> Path:
    """Bar per block (network order) of the fraction of images that ran it, stages shaded and labelled,
    transition (downsampling) blocks hatched, the always-run first block in grey (paper Fig. 10a)."""
    rates = 100.0 * np.asarray(rates, dtype=np.float64)
    n = len(rates)
    stages = list(stage_of_block)
    fig = Figure(figsize=(min(16.0, max(6.5, 0.22 * n + 2.5)), 4.0))
    ax = fig.add_subplot()
    _mark_stages(ax, stages, label_y=1.01)
    colours = ["0.6" if i == 0 else _STAGE_COLOURS[s % len(_STAGE_COLOURS)] for i, s in enumerate(stages)]
    bars = ax.bar(np.arange(n), rates, color=colours, width=0.8, edgecolor="white", linewidth=0.5)
    for i in range(1, n):
        if stages[i] != stages[i - 1]:
            bars[i].set_hatch("///")
            bars[i].set_edgecolor("black")
    if n <= 24:
        for i, v in enumerate(rates):
            ax.text(i, v + 1.0, f"{v:.0f}", ha="center", va="bottom", fontsize=7, color="0.25")
    mean = float(np.mean(rates))
    ax.axhline(mean, color="black", lw=1, ls=":")
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 108)
    step = 1 if n <= 30 else (2 if n <= 60 else 5)
    ax.set_xticks(np.arange(0, n, step))
    ax.set_xlabel("block index (network order)")
    ax.set_ylabel("execution rate (% of images)")
    ax.set_title(title, pad=18)
    handles = [
        Patch(facecolor="0.6", label="block 0 (always runs)"),
        Patch(facecolor="white", edgecolor="black", hatch="///", label="downsampling block (projection kept)"),
        Line2D([], [], color="black", ls=":", label=f"block fraction {mean:.1f}%"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def _boxplot(ax, data, positions, **kw):
    try:
        return ax.boxplot(data, positions=positions, orientation="horizontal", **kw)
    except TypeError:  # matplotlib < 3.10
        return ax.boxplot(data, positions=positions, vert=False, **kw)


def plot_per_class(
    executed_blocks: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    class_accuracy: Sequence[float],
    path: str | Path,
    *,
    num_blocks: int | None = None,
    max_classes: int = 20,
    title: str = "Executed blocks and accuracy per class",
) -> Path:
    """Left: box plot of executed blocks per image for each class (box 25-75%, whiskers 5-95%, diamond =
    mean), classes sorted by mean, fewest blocks at the top; right: per-class top-1 accuracy (paper Fig. 9).
    With more than ``max_classes`` classes only the half with fewest and the half with most blocks are shown."""
    executed_blocks, labels = np.asarray(executed_blocks), np.asarray(labels)
    acc = np.asarray(class_accuracy, dtype=np.float64)
    present = [c for c in range(len(class_names)) if (labels == c).any()]
    means = {c: float(executed_blocks[labels == c].mean()) for c in present}
    order = sorted(present, key=lambda c: (means[c], c))
    note = ""
    if len(order) > max_classes:
        half = max_classes // 2
        note = f" ({half} classes with fewest and {half} with most blocks of {len(order)})"
        order = order[:half] + order[-half:]
    k = len(order)
    fig = Figure(figsize=(10.0, max(3.0, 0.38 * k + 1.4)), layout="constrained")
    ax, ax_acc = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [2.2, 1.0]})
    pos = np.arange(k)
    data = [executed_blocks[labels == c] for c in order]
    _boxplot(ax, data, pos, whis=(5, 95), showfliers=False, widths=0.6, patch_artist=True,
             boxprops={"facecolor": "#A6C8E8", "edgecolor": "#2F5D8A"}, medianprops={"color": "#2F5D8A"},
             showmeans=True, meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black",
                                        "markersize": 5})
    ax.set_yticks(pos)
    ax.set_yticklabels([class_names[c] for c in order])
    ax.set_ylim(k - 0.3, -0.7)  # fewest blocks at the top
    ax.set_xlabel("executed blocks per image")
    if num_blocks:
        lo = max(0.5, float(min(d.min() for d in data)) - 1.0)
        ax.set_xlim(lo, num_blocks + 0.5)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("executed blocks (box 25-75%, whiskers 5-95%, ◇ mean)", fontsize=9)
    a = acc[order]
    ax_acc.barh(pos, np.nan_to_num(a), color="#8FBC8F", height=0.6)
    for y, v in zip(pos, a):
        ax_acc.text(min(v, 100.0) + 1.0, y, f"{v:.1f}", va="center", fontsize=8)
    ax_acc.set_xlim(0, 115)
    ax_acc.set_xticks([0, 25, 50, 75, 100])
    ax_acc.set_xlabel("top-1 accuracy (%)")
    ax_acc.set_title("accuracy per class", fontsize=9)
    ax_acc.grid(axis="x", alpha=0.3)
    ax_acc.tick_params(axis="y", left=False)
    if note:
        for a_ in (ax, ax_acc):
            a_.axhline(half - 0.5, color="0.3", lw=1.2, ls="--")
    fig.suptitle(title + note, fontsize=11)
    return _save(fig, path)


def _display_image(img) -> tuple[np.ndarray, bool]:
    """An image for ``imshow``: (H, W) grey or (H, W, 3) colour in [0, 1], from (C, H, W), (H, W, C) or
    (H, W), uint8 (0..255) or float (0..1); tensors are accepted."""
    a = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4):  # (C, H, W), the torch layout
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3):
        raise ValueError(f"cannot show an image of shape {a.shape}")
    a = a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)
    return np.clip(a, 0.0, 1.0), a.ndim == 2


def plot_gallery(
    images: Sequence,
    captions: Sequence[str],
    correct: Sequence[bool],
    path: str | Path,
    *,
    title: str,
    ncols: int = 8,
    row_labels: Sequence[str] | None = None,
    split_col: int | None = None,
    split_titles: tuple[str, str] = ("fewest blocks", "most blocks"),
) -> Path:
    """A grid of images with a caption under each, green when the prediction is right and red when wrong;
    grey images are drawn in grey (paper Fig. 7). A ``None`` image leaves its cell empty. ``row_labels`` name
    rows; ``split_col`` draws a divider before that column with ``split_titles`` over the two halves."""
    n = len(images)
    if n == 0 or all(img is None for img in images):
        raise ValueError("no images to show")
    nrows = -(-n // ncols)
    lines = max(str(c).count("\n") + 1 for c in captions if c is not None)
    # Layout in inches: square image cells, captions under each, room for row labels and titles.
    cell, gap = 1.25, 0.15
    cap_h = 0.13 * lines + 0.1
    left = 1.25 if row_labels else 0.1
    top = 0.45 + (0.3 if split_col else 0.0)
    width = left + ncols * cell + (ncols - 1) * gap + 0.1
    height = top + nrows * (cell + cap_h) + 0.05
    fig = Figure(figsize=(width, height))
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    for i, (img, cap, ok) in enumerate(zip(images, captions, correct)):
        if img is None:  # an empty cell
            continue
        ax = axes[i // ncols, i % ncols]
        ax.set_axis_on()
        a, grey = _display_image(img)
        ax.imshow(a, cmap="gray" if grey else None, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        colour = "#1A7F37" if ok else "#C62828"
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(2.0)
        ax.set_xlabel(cap, fontsize=7.5, color=colour, labelpad=2)
    if row_labels:
        for r, name in enumerate(row_labels[:nrows]):
            ax = axes[r, 0]
            ax.set_axis_on()
            ax.set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center", labelpad=8)
    fig.subplots_adjust(left=left / width, right=1 - 0.1 / width, top=1 - top / height,
                        bottom=(cap_h + 0.05) / height, wspace=gap / cell, hspace=cap_h / cell)
    if split_col:
        x_div = (axes[0, split_col - 1].get_position().x1 + axes[0, split_col].get_position().x0) / 2
        y_top = 1 - (top - 0.25) / height
        fig.add_artist(Line2D([x_div, x_div], [0.05 / height, y_top], color="0.3", lw=1.5, ls="--"))
        x_left = (axes[0, 0].get_position().x0 + axes[0, split_col - 1].get_position().x1) / 2
        x_right = (axes[0, split_col].get_position().x0 + axes[0, -1].get_position().x1) / 2
        for x, text in zip((x_left, x_right), split_titles):
            fig.text(x, 1 - (top - 0.06) / height, text, ha="center", va="bottom", fontsize=10)
    fig.suptitle(title, fontsize=11, y=1 - 0.08 / height, va="top")
    return _save(fig, path)


def plot_accuracy_by_blocks(rows: Sequence[Mapping], path: str | Path, *, overall: float | None = None,
                            title: str = "Accuracy by number of executed blocks") -> Path:
    """Top-1 accuracy (line, left axis) and image count (bars, right axis) for each number of executed
    blocks; rows as from :func:`~skipnet.analysis.metrics.accuracy_by_blocks`."""
    k = np.array([r["blocks"] for r in rows])
    count = np.array([r["count"] for r in rows])
    acc = np.array([r["accuracy"] for r in rows], dtype=np.float64)
    fig = Figure(figsize=(max(6.5, 0.3 * len(k) + 3.5), 4.0))
    ax = fig.add_subplot()
    ax_n = ax.twinx()
    ax_n.bar(k, count, color="0.82", width=0.8, label="images (right axis)")
    ax_n.set_ylabel("images")
    ax_n.set_ylim(0, max(1, count.max()) * 1.25)
    ax.set_zorder(ax_n.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot(k, acc, "o-", color="#2F5D8A", label="top-1 accuracy (left axis)")
    if overall is not None:
        ax.axhline(overall, color="#2F5D8A", ls=":", lw=1, label=f"overall accuracy {overall:.1f}%")
    if len(k) <= 25:
        for x, n in zip(k, count):
            ax_n.text(x, n, f"{n}", ha="center", va="bottom", fontsize=7, color="0.35")
    ax.set_ylim(0, 105)
    ax.set_xlabel("executed blocks per image (first block included)")
    ax.set_ylabel("top-1 accuracy (%)")
    if len(k) <= 30:
        ax.set_xticks(k)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax_n.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8,
              frameon=False)
    ax.set_title(title)
    return _save(fig, path)


def plot_macs_histogram(macs: np.ndarray, plain: float, dense: float, path: str | Path, *,
                        title: str = "Per-image MACs (gates included)") -> Path:
    """Histogram of per-image MACs with the mean, the plain ResNet and the all-blocks SkipNet marked."""
    macs = np.asarray(macs, dtype=np.float64)
    div, unit = mac_unit([plain, dense, *macs[:1]])
    fig = Figure(figsize=(7.0, 3.8))
    ax = fig.add_subplot()
    ax.hist(macs / div, bins=min(40, max(5, len(np.unique(macs)))), color="#A6C8E8", edgecolor="#2F5D8A")
    mean = float(macs.mean())
    ax.axvline(mean / div, color="#C62828", lw=2,
               label=f"mean {mean / div:.4g} {unit} ({100 * (1 - mean / plain):.1f}% less than plain)")
    ax.axvline(plain / div, color="black", ls="--", lw=1.5, label=f"plain ResNet {plain / div:.4g} {unit}")
    if abs(dense - plain) / plain > 1e-4:
        ax.axvline(dense / div, color="0.5", ls=":", lw=1.5, label=f"every block run {dense / div:.4g} {unit}")
    ax.set_xlabel(f"MACs per image ({unit})")
    ax.set_ylabel("images")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.set_title(title)
    return _save(fig, path)


def plot_input_scale(rows: Sequence[Mapping], path: str | Path, *,
                     title: str = "Executed blocks at different input scales") -> Path:
    """Left: distribution of executed blocks per image for each input scale; right: mean executed blocks
    and top-1 accuracy against the scale (paper Fig. 8). Rows as from
    :func:`~skipnet.analysis.routing.input_scale_analysis`."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    fig = Figure(figsize=(12.0, 4.2))
    ax, ax_m = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1.0], "wspace": 0.35})
    n = len(rows)
    hists = [np.asarray(r["blocks_hist"], dtype=np.float64) for r in rows]
    used = np.flatnonzero(np.sum(hists, axis=0))  # block counts that occur at some scale, shown +- 1
    lo, hi = max(1, int(used.min()) - 1), min(len(hists[0]) - 1, int(used.max()) + 1)
    for j, (r, hist) in enumerate(zip(rows, hists)):
        frac = 100.0 * hist / max(1.0, hist.sum())
        size = r.get("input_size")
        label = f"{r['scale']:g}×" + (f" ({size[0]}×{size[1]})" if size else "") + f", mean {r['mean_blocks']:.1f}"
        ax.plot(np.arange(lo, hi + 1), frac[lo:hi + 1], "o-", ms=3.5, color=cmap(j / max(1, n - 1) * 0.9),
                label=label)
    ax.set_xlabel("executed blocks per image")
    ax.set_ylabel("images (%)")
    ax.legend(title="input scale (size)", fontsize=8, title_fontsize=8)
    ax.set_title("distribution of executed blocks", fontsize=10)
    ax.grid(alpha=0.3)
    s = [r["scale"] for r in rows]
    ax_m.plot(s, [r["mean_blocks"] for r in rows], "o-", color="#2F5D8A", label="mean executed blocks")
    ax_m.set_xlabel("input scale (× original side)")
    ax_m.set_ylabel("mean executed blocks", color="#2F5D8A")
    ax_a = ax_m.twinx()
    ax_a.plot(s, [r["accuracy"] for r in rows], "s--", color="#C44E52", label="top-1 accuracy")
    ax_a.set_ylabel("top-1 accuracy (%)", color="#C44E52")
    ax_a.set_ylim(0, 105)
    ax_m.set_xticks(s)
    ax_m.set_xticklabels([f"{v:g}" for v in s])
    h1, l1 = ax_m.get_legend_handles_labels()
    h2, l2 = ax_a.get_legend_handles_labels()
    ax_m.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
                frameon=False)
    ax_m.set_title("mean blocks and accuracy vs scale", fontsize=10)
    ax_m.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _place_labels(ax, labels: Sequence[tuple[float, float, str, str]], fontsize: float = 7.5) -> None:
    """Annotate points without overlap: try a few offsets around each point, skip a label that fits none."""
    if not labels:
        return
    ax.autoscale_view()
    px = ax.figure.dpi / 72.0
    char_w, text_h = 0.6 * fontsize * px, 1.2 * fontsize * px
    pts = ax.transData.transform([(x, y) for x, y, _, _ in labels])
    taken = [(u - 3, v - 3, u + 3, v + 3) for u, v in pts]  # the markers themselves
    for (u, v), (x, y, text, colour) in zip(pts, labels):
        w = char_w * len(text)
        offsets = ((5, 4), (5, -4 - text_h), (-5 - w, 4), (-5 - w, -4 - text_h), (-w / 2, 8), (-w / 2, -8 - text_h))
        for dx, dy in offsets:
            box = (u + dx, v + dy, u + dx + w, v + dy + text_h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                taken.append(box)
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx / px, dy / px), fontsize=fontsize,
                            color=colour, va="bottom", ha="left")
                break


def plot_tradeoff(
    series: Mapping[str, Sequence[Sequence]],
    path: str | Path,
    *,
    title: str = "Accuracy vs compute",
    vlines: Mapping[str, float] | None = None,
    styles: Mapping[str, Mapping] | None = None,
    annotate: bool = True,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Top-1 accuracy (%) against mean MACs per image, one labelled series per entry of ``series``:
    ``{name: [(macs, accuracy), ...]}`` or ``(macs, accuracy, point_label)`` triples (e.g. tau values, alpha
    values, "R-38"), MACs raw. Points of a series are joined in order of MACs; point labels that would
    overlap are left out. ``vlines``: labelled vertical
    reference lines (e.g. the plain ResNet's MACs); ``styles``: matplotlib keyword overrides per series;
    ``ylim``: (low, high) accuracy range shown -- a zoom on the band that matters; points outside are off the
    chart and their labels left out."""
    if ylim is not None and not ylim[0] < ylim[1]:
        raise ValueError(f"ylim must be (low, high) with low < high; got {ylim}")
    all_macs = [float(p[0]) for pts in series.values() for p in pts] + list((vlines or {}).values())
    if not all_macs:
        raise ValueError("plot_tradeoff needs at least one point")
    div, unit = mac_unit(all_macs)
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot()
    labels: list[tuple[float, float, str, str]] = []
    for j, (name, pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: float(p[0]))
        if not pts:
            continue
        x = [float(p[0]) / div for p in pts]
        y = [float(p[1]) for p in pts]
        kw = {"marker": _MARKERS[j % len(_MARKERS)], "ls": "-", "ms": 6, "lw": 1.5}
        kw.update((styles or {}).get(name, {}))
        (line,) = ax.plot(x, y, label=name, **kw)
        if annotate:
            labels += [(xi, yi, str(p[2]), line.get_color()) for p, xi, yi in zip(pts, x, y)
                       if len(p) > 2 and p[2] not in (None, "")]
    for k, (name, v) in enumerate((vlines or {}).items()):
        ax.axvline(float(v) / div, color="0.4", ls=(0, (4, 2 + k)), lw=1, label=f"{name} ({v / div:.3g} {unit})")
    if ylim is not None:
        ax.set_ylim(*ylim)
        labels = [label for label in labels if ylim[0] <= label[1] <= ylim[1]]
    _place_labels(ax, labels)
    ax.set_xlabel(f"mean MACs per image ({unit}, gates included)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    # below the axes: with a dozen series, a legend inside covers points wherever it goes
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    ax.set_title(title)
    return _save(fig, path)

