"""Pure metrics over a :class:`~skipnet.analysis.routing.Routing` (SPEC §6, §8.4).

Conventions: accuracies and rates are percentages unless a name says otherwise; "executed blocks" counts the
always-run first block, so an image runs between 1 and G + 1 blocks; a skipped transition block still pays
for its projection shortcut in the MACs but does not count as executed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from .routing import Routing


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else float("nan")


def top1_accuracy(r: Routing) -> float:
    """Top-1 accuracy (%)."""
    return _pct(float(r.correct.sum()), r.num_images)


def topk_accuracy(r: Routing, k: int = 5) -> float:
    """Top-k accuracy (%). Raises ``ValueError`` if fewer than k predictions were kept and k < classes."""
    kept = r.topk.shape[1]
    if k > kept and kept < r.num_classes:
        raise ValueError(f"top-{k} needs {k} kept predictions per image; the routing has {kept}")
    hit = (r.topk[:, :k] == r.labels[:, None]).any(1)
    return _pct(float(hit.sum()), r.num_images)


def macs_stats(r: Routing) -> dict[str, float]:
    """Per-image MACs: mean, std (population), min, max, and the plain / dense references."""
    m = r.macs
    return {"mean": float(m.mean()), "std": float(m.std()), "min": float(m.min()), "max": float(m.max()),
            "plain": r.plain_macs, "dense": r.dense_macs}


def mac_reduction(r: Routing, reference: str = "plain") -> float:
    """MACs saved (%) = 100 * (1 - mean / reference); ``reference`` is ``plain`` (the paper's figure: the
    plain ResNet of the same depth, so gate costs count against the SkipNet) or ``dense``."""
    if reference not in ("plain", "dense"):
        raise ValueError(f"reference must be 'plain' or 'dense'; got {reference!r}")
    ref = r.plain_macs if reference == "plain" else r.dense_macs
    return 100.0 * (1.0 - float(r.macs.mean()) / ref)


def block_execution_rates(r: Routing) -> np.ndarray:
    """(G + 1,) fraction of images (0..1) that ran each block; block 0 always runs (1.0)."""
    return np.concatenate([[1.0], r.decisions.mean(0, dtype=np.float64)]) if r.num_images else np.ones(r.num_blocks)


def block_fraction(r: Routing) -> float:
    """The authors' computation percentage (%): 100 * (1 + sum_i rate_i) / (G + 1) = mean executed blocks
    over G + 1."""
    return 100.0 * float(block_execution_rates(r).mean())


def blocks_histogram(r: Routing) -> np.ndarray:
    """(G + 2,) counts: entry k = number of images that ran k blocks (entry 0 is always 0)."""
    return np.bincount(r.executed_blocks, minlength=r.num_blocks + 1)


def per_class_block_histogram(r: Routing) -> np.ndarray:
    """(classes, G + 2) counts: [c, k] = images of class c that ran k blocks."""
    out = np.zeros((r.num_classes, r.num_blocks + 1), dtype=np.int64)
    np.add.at(out, (r.labels, r.executed_blocks), 1)
    return out


def per_class_mean_blocks(r: Routing) -> np.ndarray:
    """(classes,) mean executed blocks per class (NaN for a class with no images)."""
    count = np.bincount(r.labels, minlength=r.num_classes)
    total = np.bincount(r.labels, weights=r.executed_blocks, minlength=r.num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def per_class_accuracy(r: Routing) -> tuple[np.ndarray, np.ndarray]:
    """``(accuracy % (classes,), image count (classes,))``; accuracy is NaN for a class with no images."""
    count = np.bincount(r.labels, minlength=r.num_classes)
    hits = np.bincount(r.labels, weights=r.correct.astype(np.float64), minlength=r.num_classes)
    return np.where(count > 0, 100.0 * hits / np.maximum(count, 1), np.nan), count


def accuracy_by_blocks(r: Routing) -> list[dict]:
    """Accuracy (%) of the images grouped by how many blocks they ran: ``[{blocks, count, accuracy}]`` for
    every block count that occurs, ascending."""
    blocks = r.executed_blocks
    rows = []
    for k in np.unique(blocks):
        sel = blocks == k
        rows.append({"blocks": int(k), "count": int(sel.sum()), "accuracy": _pct(float(r.correct[sel].sum()),
                                                                                 float(sel.sum()))})
    return rows


def path_strings(r: Routing) -> list[str]:
    """Each image's route as a string of G characters, ``1`` = gate i executed block i + 1."""
    packed = np.where(r.decisions, ord("1"), ord("0")).astype(np.uint8)
    return [row.tobytes().decode("ascii") for row in packed]


def routing_paths(r: Routing, k: int = 10) -> tuple[int, list[tuple[str, int]]]:
    """``(number of distinct routes, the k most common [(path, count)])``; ties by path string."""
    counts = Counter(path_strings(r))
    top = sorted(counts.items(), key=lambda pc: (-pc[1], pc[0]))[:k]
    return len(counts), top


def skipped_blocks(path: str) -> list[int]:
    """Network indices of the blocks a path skips (gate i guards block i + 1)."""
    return [i + 1 for i, c in enumerate(path) if c == "0"]


def gallery_indices(r: Routing, n: int = 16, kind: str = "easy", label: int | None = None) -> np.ndarray:
    """Indices (input order) of the ``n`` images that ran the fewest (``easy``) or most (``hard``) blocks,
    optionally only of class ``label``. Ties: easy prefers lower MACs, hard higher MACs, then lower index."""
    if kind not in ("easy", "hard"):
        raise ValueError(f"kind must be 'easy' or 'hard'; got {kind!r}")
    idx = np.arange(r.num_images)
    if label is not None:
        idx = idx[r.labels == label]
    blocks, macs = r.executed_blocks[idx], r.macs[idx]
    sign = 1 if kind == "easy" else -1
    order = np.lexsort((idx, sign * macs, sign * blocks))  # last key is the primary one
    return idx[order[:n]]


def summarize(r: Routing) -> dict:
    """Headline numbers: accuracies, MACs, reductions, block fraction, mean executed blocks, distinct paths."""
    out = {
        "num_images": r.num_images,
        "num_classes": r.num_classes,
        "num_gates": r.num_gates,
        "top1": top1_accuracy(r),
    }
    if r.num_classes > 10 and r.topk.shape[1] >= 5:
        out["top5"] = topk_accuracy(r, 5)
    out.update({
        "macs": macs_stats(r),
        "reduction_vs_plain_pct": mac_reduction(r, "plain"),
        "reduction_vs_dense_pct": mac_reduction(r, "dense"),
        "block_fraction_pct": block_fraction(r),
        "mean_executed_blocks": float(r.executed_blocks.mean()),
        "distinct_paths": routing_paths(r, 0)[0],
    })
    return out


def sweep_row(r: Routing) -> dict:
    """One row of a threshold sweep."""
    row = {"tau": r.tau, "accuracy": top1_accuracy(r)}
    if r.num_classes > 10 and r.topk.shape[1] >= 5:
        row["top5"] = topk_accuracy(r, 5)
    row.update({
        "mean_macs": float(r.macs.mean()),
        "plain_macs": r.plain_macs,
        "reduction_pct": mac_reduction(r, "plain"),
        "block_fraction_pct": block_fraction(r),
        "mean_blocks": float(r.executed_blocks.mean()),
    })
    return row


def scale_rows(routings: Sequence[Routing], scales: Sequence[float]) -> list[dict]:
    """Rows of an input-scale analysis; per-image shifts are against the scale closest to 1 (by ratio)."""
    ref = min(range(len(scales)), key=lambda i: abs(math.log(scales[i]))) if scales else 0
    rows = []
    for s, r in zip(scales, routings):
        shift = r.executed_blocks - routings[ref].executed_blocks
        rows.append({
            "scale": float(s),
            "input_size": list(r.input_size) if r.input_size else None,
            "accuracy": top1_accuracy(r),
            "mean_blocks": float(r.executed_blocks.mean()),
            "std_blocks": float(r.executed_blocks.std()),
            "blocks_hist": blocks_histogram(r).tolist(),
            "mean_macs": float(r.macs.mean()),
            "plain_macs": r.plain_macs,
            "reduction_pct": mac_reduction(r, "plain"),
            "block_fraction_pct": block_fraction(r),
            "reference_scale": float(scales[ref]),
            "mean_block_shift": float(shift.mean()),
            "fraction_fewer_blocks": float((shift < 0).mean()),
            "fraction_more_blocks": float((shift > 0).mean()),
        })
    return rows
