"""Run a model over an evaluation set and record every image's route (SPEC §8.4).

A :class:`Routing` holds, per image and in input order, the prediction, the label, the gate decisions and
probabilities and the MACs, plus the metadata the metrics need. Everything the analysis layer computes is a
pure function of it (:mod:`skipnet.analysis.metrics`), so a routing can be saved and re-analysed.

:func:`collect_routing`, :func:`threshold_sweep` and :func:`input_scale_analysis` share one runner that makes
a single pass over the batches and evaluates every setting (threshold, input scale) on each batch, so a
loader that decodes images pays for it once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.loader import check_class_count, check_eval_batch

log = logging.getLogger(__name__)

TOPK = 5  # predictions kept per image (fewer when there are fewer classes)


@dataclass
class Routing:
    """The per-image record of one evaluation. N images, G gates, G + 1 blocks (block 0 always runs).

    ``preds`` (N,) top-1 class; ``topk`` (N, k) the k = min(5, classes) best classes, best first;
    ``labels`` (N,); ``decisions`` (N, G) bool, gate i guards block i + 1; ``probs`` (N, G) gate
    probabilities (None for a plain network); ``macs`` (N,) per-image MACs, gates included.
    ``plain_macs`` / ``dense_macs``: per-image MACs of the plain ResNet and of this network with every block
    run (gates included), averaged over images if input sizes varied. ``stage_of_block`` (G + 1,).
    """

    preds: np.ndarray
    labels: np.ndarray
    decisions: np.ndarray
    macs: np.ndarray
    plain_macs: float
    dense_macs: float
    stage_of_block: tuple[int, ...]
    num_classes: int
    topk: np.ndarray | None = None
    probs: np.ndarray | None = None
    input_size: tuple[int, int] | None = None
    mode: str = "greedy"
    tau: float = 0.5
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.preds = np.asarray(self.preds, dtype=np.int64).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.decisions = np.asarray(self.decisions).astype(bool, copy=False)
        self.macs = np.asarray(self.macs, dtype=np.float64).reshape(-1)
        self.stage_of_block = tuple(int(s) for s in self.stage_of_block)
        self.num_classes = int(self.num_classes)
        self.plain_macs, self.dense_macs = float(self.plain_macs), float(self.dense_macs)
        n = self.preds.shape[0]
        if self.decisions.ndim != 2:
            raise ValueError(f"decisions must be (N, G); got shape {self.decisions.shape}")
        g = self.decisions.shape[1]
        for name in ("labels", "macs"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) like preds; got {getattr(self, name).shape}")
        if self.decisions.shape[0] != n:
            raise ValueError(f"decisions must have {n} rows like preds; got {self.decisions.shape}")
        if len(self.stage_of_block) != g + 1:
            raise ValueError(f"stage_of_block needs G + 1 = {g + 1} entries; got {len(self.stage_of_block)}")
        if self.topk is None:
            self.topk = self.preds[:, None]
        self.topk = np.asarray(self.topk, dtype=np.int64)
        if self.topk.ndim != 2 or self.topk.shape[0] != n or not np.array_equal(self.topk[:, 0], self.preds):
            raise ValueError("topk must be (N, k) with the top-1 prediction first")
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float32)
            if self.probs.shape != self.decisions.shape:
                raise ValueError(f"probs must have the shape of decisions {self.decisions.shape}")
        if self.input_size is not None:
            self.input_size = (int(self.input_size[0]), int(self.input_size[1]))

    @property
    def num_images(self) -> int:
        return int(self.preds.shape[0])

    @property
    def num_gates(self) -> int:
        return int(self.decisions.shape[1])

    @property
    def num_blocks(self) -> int:
        return self.num_gates + 1

    @property
    def correct(self) -> np.ndarray:
        """(N,) bool: top-1 prediction equals the label."""
        return self.preds == self.labels

    @property
    def executed_blocks(self) -> np.ndarray:
        """(N,) number of blocks whose residual branch ran, the always-run first block included."""
        return 1 + self.decisions.sum(1, dtype=np.int64)

    def subset(self, index: np.ndarray | Sequence[int]) -> Routing:
        """The routing of the images at ``index`` (same metadata)."""
        i = np.asarray(index, dtype=np.int64)
        return Routing(
            preds=self.preds[i], labels=self.labels[i], decisions=self.decisions[i], macs=self.macs[i],
            topk=self.topk[i], probs=None if self.probs is None else self.probs[i], plain_macs=self.plain_macs,
            dense_macs=self.dense_macs, stage_of_block=self.stage_of_block, num_classes=self.num_classes,
            input_size=self.input_size, mode=self.mode, tau=self.tau, meta=dict(self.meta),
        )

    def save(self, path: str | Path) -> Path:
        """Write to a ``.npz`` file (no pickles); :meth:`load` reads it back."""
        path = Path(path)
        arrays = {k: getattr(self, k) for k in ("preds", "labels", "decisions", "macs", "topk")}
        if self.probs is not None:
            arrays["probs"] = self.probs
        scalars = dict(plain_macs=self.plain_macs, dense_macs=self.dense_macs, num_classes=self.num_classes,
                       tau=self.tau)
        np.savez_compressed(path, **arrays, **{k: np.asarray(v) for k, v in scalars.items()},
                            stage_of_block=np.asarray(self.stage_of_block),
                            input_size=np.asarray(self.input_size or (-1, -1)), mode=np.asarray(self.mode))
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: str | Path) -> Routing:
        with np.load(Path(path), allow_pickle=False) as z:
            size = tuple(int(v) for v in z["input_size"])
            return cls(
                preds=z["preds"], labels=z["labels"], decisions=z["decisions"], macs=z["macs"], topk=z["topk"],
                probs=z["probs"] if "probs" in z.files else None, plain_macs=float(z["plain_macs"]),
                dense_macs=float(z["dense_macs"]), num_classes=int(z["num_classes"]),
                stage_of_block=tuple(int(s) for s in z["stage_of_block"]), tau=float(z["tau"]),
                input_size=None if size[0] < 0 else size, mode=str(z["mode"]),
            )


# --- running the model ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Setting:
    mode: str = "greedy"
    tau: float = 0.5
    scale: float = 1.0


class _Recorder:
    """Accumulates one setting's outputs batch by batch (on the host)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in ("preds", "topk", "labels", "dec", "probs",
                                                                   "macs", "plain", "dense")}
        self.sizes: set[tuple[int, int]] = set()

    def add(self, model: nn.Module, out, y: Tensor, size: tuple[int, int]) -> None:
        logits = out.logits.float()
        k = min(TOPK, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        table = model.mac_table(size)
        b = logits.shape[0]
        p = self.parts
        p["preds"].append(topk[:, 0].cpu().numpy())
        p["topk"].append(topk.cpu().numpy())
        p["labels"].append(y.reshape(-1).cpu().numpy())
        p["dec"].append((out.decisions > 0.5).cpu().numpy())
        if out.probs is not None:
            p["probs"].append(out.probs.float().cpu().numpy())
        p["macs"].append(out.macs.double().cpu().numpy())
        p["plain"].append(np.full(b, float(table.plain)))
        p["dense"].append(np.full(b, float(table.dense)))
        self.sizes.add(size)

    def finish(self, model: nn.Module, setting: _Setting) -> Routing:
        p = self.parts
        if not p["preds"]:
            raise ValueError("no batches: the evaluation set is empty")
        cat = np.concatenate
        return Routing(
            preds=cat(p["preds"]), topk=cat(p["topk"]), labels=cat(p["labels"]), decisions=cat(p["dec"]),
            probs=cat(p["probs"]) if p["probs"] else None, macs=cat(p["macs"]),
            plain_macs=float(cat(p["plain"]).mean()), dense_macs=float(cat(p["dense"]).mean()),
            stage_of_block=model.stage_of_block, num_classes=model.config.num_classes,
            input_size=next(iter(self.sizes)) if len(self.sizes) == 1 else None,
            mode=setting.mode, tau=setting.tau, meta={"scale": setting.scale},
        )


def rescale(x: Tensor, scale: float, min_size: int = 1) -> Tensor:
    """Resize a batch (B, C, H, W) by ``scale`` (bilinear; antialiased when shrinking), each side kept
    >= ``min_size``. Resizing normalised images is fine: the per-channel normalisation is affine."""
    if scale <= 0:
        raise ValueError(f"scale must be positive; got {scale}")
    h, w = x.shape[-2:]
    size = (max(min_size, round(h * scale)), max(min_size, round(w * scale)))
    if size == (h, w):
        return x
    shrink = size[0] < h or size[1] < w
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _fixed_rows(decisions: Tensor | None, offset: int, batch: int) -> Tensor | None:
    """This batch's rows of fixed decisions given as (G,) for every image or (N, G) in input order."""
    if decisions is None:
        return None
    if decisions.dim() == 1:
        return decisions.unsqueeze(0).expand(batch, -1)
    if decisions.shape[0] < offset + batch:
        raise ValueError(f"fixed decisions cover {decisions.shape[0]} images; the data has more")
    return decisions[offset:offset + batch]


def _run(
    model: nn.Module,
    batches: Iterable,
    settings: Sequence[_Setting],
    *,
    executor: str,
    device: str | torch.device | None,
    progress: bool,
    decisions: Tensor | np.ndarray | None = None,
    limits: Sequence[int | None] | None = None,
    desc: str = "routing",
) -> list[Routing]:
    """One pass over ``batches``; every setting evaluated on each batch, setting k only on the first
    ``limits[k]`` images (None: all). The model runs in eval mode (its previous mode is restored after)."""
    limits = list(limits) if limits is not None else [None] * len(settings)
    if any(n is not None and n < 1 for n in limits):
        raise ValueError(f"image limits must be positive; got {limits}")
    check_class_count(batches, model.config.num_classes)
    dev = _device_of(model, device)
    if decisions is not None:
        decisions = torch.as_tensor(decisions).detach().to("cpu", torch.float32)
    was_training = model.training
    if was_training:
        log.warning("model was in training mode; evaluating in eval mode (BatchNorm running statistics)")
    model.eval()
    recorders = [_Recorder() for _ in settings]
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    offset = 0
    clamped: set[float] = set()
    try:
        with torch.inference_mode():
            bar = tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False)
            for index, (x, y) in enumerate(bar):
                if all(n is not None and offset >= n for n in limits):
                    break  # every setting has all the images it asked for
                x = x.to(dev, non_blocking=True)
                y = torch.as_tensor(y)
                check_eval_batch(x, y, model.config.num_classes, index)
                b = x.shape[0]
                fixed = _fixed_rows(decisions, offset, b)
                for rec, s, n in zip(recorders, settings, limits):
                    take = b if n is None else min(b, n - offset)
                    if take <= 0:
                        continue
                    xs = x if take == b else x[:take]
                    if s.scale != 1.0:
                        h, w = xs.shape[-2:]
                        xs = rescale(xs, s.scale, model.min_input_size)
                        if max(xs.shape[-2] - round(h * s.scale), xs.shape[-1] - round(w * s.scale)) > 0:
                            clamped.add(s.scale)
                    f = None if fixed is None else fixed[:take].to(dev)
                    out = model(xs, s.mode, executor=executor, tau=s.tau, decisions=f)
                    rec.add(model, out, y[:take], (int(xs.shape[-2]), int(xs.shape[-1])))
                offset += b
            bar.close()
    finally:
        model.train(was_training)
    for sc in sorted(clamped):
        log.warning("input scale %g: sides raised to the network's minimum of %d pixels", sc, model.min_input_size)
    return [rec.finish(model, s) for rec, s in zip(recorders, settings)]


def collect_routing(
    model: nn.Module,
    batches: Iterable,
    *,
    mode: str = "greedy",
    tau: float = 0.5,
    executor: str = "masked",
    device: str | torch.device | None = None,
    decisions: Tensor | np.ndarray | None = None,
    progress: bool = True,
) -> Routing:
    """Run ``model`` over ``batches`` of ``(x, y)`` (x normalised (B, C, H, W), y (B,) int) and record every
    image's route, in input order (so gallery indices point back into the data).

    ``device``: where batches go (default: the model's device; the model is not moved). ``decisions`` with
    ``mode='fixed'``: (G,) for every image or (N, G) aligned with the input order. ``executor='compact'``
    gives the same routes faster (eval mode)."""
    return _run(model, batches, [_Setting(mode, tau)], executor=executor, device=device, progress=progress,
                decisions=decisions, desc="routing")[0]


def threshold_sweep(
    model: nn.Module,
    batches: Iterable,
    taus: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    *,
    executor: str = "masked",
    device: str | torch.device | None = None,
    progress: bool = True,
    max_images: int | None = None,
    return_routings: bool = False,
) -> list[dict] | tuple[list[dict], list[Routing]]:
    """Greedy evaluation at every threshold ``tau``: one row per tau with accuracy (%), mean MACs, reduction
    vs the plain ResNet (%), block fraction (%), mean executed blocks.

    Each tau gets a real forward pass. Thresholding one pass's probabilities for every tau would NOT be
    exact: gate i + 1 reads the output of block i, which depends on the earlier decisions (and the RNN gate's
    state too), so changing one decision changes every later probability.

    ``max_images``: use only the first n images in input order (a cheaper curve; shuffle the set first if
    it is sorted by class)."""
    from .metrics import sweep_row

    settings = [_Setting("greedy", float(t)) for t in taus]
    routings = _run(model, batches, settings, executor=executor, device=device, progress=progress,
                    limits=[max_images] * len(settings), desc=f"tau sweep ({len(settings)})")
    rows = [sweep_row(r) for r in routings]
    return (rows, routings) if return_routings else rows


def input_scale_analysis(
    model: nn.Module,
    batches: Iterable,
    scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5),
    *,
    mode: str = "greedy",
    tau: float = 0.5,
    executor: str = "masked",
    device: str | torch.device | None = None,
    progress: bool = True,
    max_images: int | None = None,
    return_routings: bool = False,
) -> list[dict] | tuple[list[dict], list[Routing]]:
    """Evaluate the set resized by each factor in ``scales`` (paper Fig. 8): one row per scale with the input
    size, accuracy (%), mean executed blocks, the histogram of executed blocks, mean MACs and the plain
    ResNet's MACs at that size, and the per-image shift in executed blocks against the scale closest to 1.

    Sides are kept >= ``model.min_input_size`` (a clamped size is logged and reported). ``max_images``: as
    in :func:`threshold_sweep`."""
    from .metrics import scale_rows

    settings = [_Setting(mode, tau, float(s)) for s in scales]
    routings = _run(model, batches, settings, executor=executor, device=device, progress=progress,
                    limits=[max_images] * len(settings), desc=f"input scales ({len(settings)})")
    rows = scale_rows(routings, [s.scale for s in settings])
    return (rows, routings) if return_routings else rows


@dataclass
class Analysis:
    """What :func:`run_analysis` returns: the routing at the operating point, the tau sweep rows and the input
    scale rows (empty lists when not asked for)."""

    routing: Routing
    sweep: list[dict]
    scales: list[dict]


def run_analysis(
    model: nn.Module,
    batches: Iterable,
    *,
    tau: float = 0.5,
    taus: Sequence[float] = (),
    scales: Sequence[float] = (),
    executor: str = "compact",
    device: str | torch.device | None = None,
    progress: bool = True,
    sweep_images: int | None = None,
) -> Analysis:
    """:func:`collect_routing` (greedy at ``tau``), :func:`threshold_sweep` over ``taus`` and
    :func:`input_scale_analysis` over ``scales`` in one pass over the data, each distinct setting run once
    (the operating point is shared by all three). Same numbers as the three calls.

    ``sweep_images``: the sweep and the scales use only the first n images (the routing always uses all);
    the default executor is ``compact``, exact in eval mode and cheaper the more blocks are skipped."""
    from .metrics import scale_rows, sweep_row

    base = _Setting("greedy", float(tau))
    others = [_Setting("greedy", float(t)) for t in taus] + [_Setting("greedy", float(tau), float(s)) for s in scales]
    unique = [base] + [s for s in dict.fromkeys(others) if s != base]
    log.info("analysis: %d distinct settings for %d asked", len(unique), 1 + len(others))
    routings = _run(model, batches, unique, executor=executor, device=device, progress=progress,
                    limits=[None] + [sweep_images] * (len(unique) - 1), desc=f"analysis ({len(unique)} settings)")
    found = dict(zip(unique, routings))
    if sweep_images is not None and sweep_images < found[base].num_images:
        found[base] = found[base].subset(np.arange(sweep_images))  # the sweep's rows use the same images
    sweep = [sweep_row(found[_Setting("greedy", float(t))]) for t in taus]
    scale_list = [float(s) for s in scales]
    scale_out = scale_rows([found[_Setting("greedy", float(tau), s)] for s in scale_list], scale_list)
    return Analysis(routings[0], sweep, scale_out)


def gather_images(batches: Iterable, indices: Iterable[int]) -> dict[int, Tensor]:
    """Pull the images at ``indices`` (positions in input order) out of ``batches``, as stored (normalised);
    the batches must come in the same order as when the routing was collected (no shuffling)."""
    want = sorted({int(i) for i in indices})
    found: dict[int, Tensor] = {}
    offset, k = 0, 0
    for x, _ in batches:
        b = x.shape[0]
        while k < len(want) and want[k] < offset + b:
            found[want[k]] = x[want[k] - offset].detach().cpu().clone()
            k += 1
        offset += b
        if k == len(want):
            break
    if k < len(want):
        raise ValueError(f"index {want[k]} is past the end of the data ({offset} images)")
    return found
