"""The main job: SkipNet's two stages on Fashion-MNIST -- SP, then learned routing by hybrid REINFORCE --
evaluated against the obvious alternatives (random skipping at the same MACs, measured here; the plain ResNets
of other depths, read from the trade-off script's results), measured speed-up, report.

Budget: under 10 minutes on 2 CPU cores, everything included.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .data import BatchLoader, load_dataset
from .reporting import measure_speed
from .train import evaluate, load_config, load_model, random_skipping, train
from .train.trainer import RunExistsError

# Written by `python benchmarks/tradeoff.py --data fashion_mnist [--sp-epochs A --hrl-epochs B]` (plain ResNets
# trained by the recipe for A + B epochs) into docs/tradeoff/fashion_mnist*/sweep.json; read, not retrained, by
# the demo, which takes the plain rows of its own total epochs from whichever of these files has them.
REFERENCES = Path("docs/tradeoff")

# The demo's split of its own, shorter than the recipes' (SP 1 + HRL 3 of 4 epochs, the trade-off script's
# budget): an HRL epoch costs about three SP epochs (a sampled pass for the policy, the greedy and all-blocks
# passes for the backbone), and the demo is meant to take about ten minutes on two cores.
DEMO_SP_EPOCHS, DEMO_HRL_EPOCHS = 2.5, 0.5
# its compute target: 0.64 of the plain network's MACs, so that the test set (where greedy inference lands within
# about half a point of what tau was fitted to on training images) sees at least 35 % fewer
DEMO_TARGET_MACS = 0.64


def run_demo(out: str | Path | None = None, *, data_root: str | None = None, sp_epochs: float | None = None,
             hrl_epochs: float | None = None, target_macs: float | None = None, progress: bool = True,
             echo: Callable[[str], Any] = print, report: bool = True,
             references: str | Path | None = REFERENCES) -> dict[str, Any]:
    """Run the demo into ``out`` (a new folder) and return its numbers (also written to ``summary.json``)."""
    start = time.perf_counter()
    out = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise RunExistsError(f"demo folder {out} exists and is not empty; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    echo(f"skipnet demo -> {out}")
    data = (load_dataset("fashion_mnist", data_root, "train"), load_dataset("fashion_mnist", data_root, "test"))
    echo(f"Fashion-MNIST: {len(data[0])} training and {len(data[1])} test images, loaded in "
         f"{time.perf_counter() - start:.1f}s")

    root = [f"data.root={data_root}"] if data_root else []
    # SP and HRL share one cosine (the plain ResNets' schedule): other epochs move its length and the split
    sp_epochs, hrl_epochs = sp_epochs or DEMO_SP_EPOCHS, hrl_epochs or DEMO_HRL_EPOCHS
    cosine = [f"train.cosine_epochs={sp_epochs + hrl_epochs}"]
    sp = load_config("fashion_mnist_sp", root + cosine + [f"train.epochs={sp_epochs}"])
    drop = f", random block skips {sp.train.drop_rate:g}" if sp.train.drop_rate else ""
    echo(f"stage 1/2 -- SP: {sp.model.name} with {sp.model.gate} gates, {sp.train.epochs:g} epochs{drop}")
    sp_result = train(sp, out / "sp", data=data, progress=progress)
    echo(f"  SP: top-1 {sp_result['accuracy']:.2f}%, block fraction {sp_result['block_fraction']:.1f}%")

    hrl_over = root + [f"train.init={out / 'sp'}"]
    hrl_over += cosine + [f"train.epochs={hrl_epochs}", f"train.cosine_start={sp_epochs}"]
    hrl_over += [f"train.target_macs={target_macs or DEMO_TARGET_MACS}"]
    hrl = load_config("fashion_mnist_hrl", hrl_over)
    taught = f", taught by the all-blocks path (distill {hrl.train.distill:g})" if hrl.train.distill else ""
    echo(f"stage 2/2 -- HRL: learned routing (sampled gates trained by REINFORCE, backbone by cross-entropy on "
         f"the {hrl.train.backbone_path} paths{taught}), {hrl.train.epochs:g} epochs, expected-MAC target "
         f"{hrl.train.target_macs} of the plain network")
    # the run's final evaluation is the SkipNet's: greedy, on the whole test set, at tau fitted to the target
    skip = train(hrl, out / "hrl", data=data, progress=progress)
    tau = skip["tau"]

    model = load_model(out / "hrl")
    test = BatchLoader(data[1], 500, train=False)
    full = evaluate(model, test, mode="all", progress=progress)
    # the paper's random-skipping baseline: the SP weights, each block run at the SkipNet's rate, per image
    rand = random_skipping(load_model(out / "sp"), test, skip["exec_rates"], progress=progress)
    # the same rates on the HRL network's own weights: what choosing blocks per image adds over fixed rates
    own = random_skipping(model, test, skip["exec_rates"], progress=progress)
    total_epochs = sp.train.epochs + hrl.train.epochs
    summary: dict[str, Any] = {
        "model": f"{hrl.model.name} ({hrl.model.gate} gates)",
        "total_epochs": total_epochs,
        "sp_epochs": sp.train.epochs,
        "hrl_epochs": hrl.train.epochs,
        "skipnet_accuracy": skip["accuracy"],
        "tau": tau,
        "all_blocks_accuracy": full["accuracy"],
        "sp_accuracy": sp_result["accuracy"],
        "random_skipping_accuracy": rand["accuracy"],
        "random_skipping_macs": rand["macs_per_image"],
        "own_random_skipping_accuracy": own["accuracy"],
        "macs_per_image": skip["macs_per_image"],
        "dense_macs_per_image": skip["dense_macs_per_image"],
        "mac_reduction": skip["mac_reduction"],
        "block_fraction": skip["block_fraction"],
        "exec_rates": skip["exec_rates"],
        "plain_reference": plain_reference(references, skip["macs_per_image"], total_epochs),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    summary["speed"] = measure_speed(model, data[1], tau=tau)
    summary["train_and_eval_seconds"] = time.perf_counter() - start
    if report:
        summary["report"] = str(write_demo_report(out / "hrl", data[1], out / "report", summary, progress))
    summary["total_seconds"] = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for line in format_summary(summary):
        echo(line)
    return summary


# the report's tau sweep runs on the whole test set (3,000 images left 0.5-point noise on neighbouring operating
# points); the input-scale analysis (two more passes) is left to `skipnet report`, so the demo keeps to 10 minutes
DEMO_TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def write_demo_report(run: Path, data, path: Path, summary: dict[str, Any], progress: bool) -> Path:
    from .reporting import make_report

    return make_report(run, out=path, taus=DEMO_TAUS, scales=(), sweep_images=None,
                       speed=summary.get("speed") or False, test_data=data, progress=progress)


def plain_reference(path: str | Path | None, macs: float, epochs: float) -> dict[str, Any] | None:
    """The plain ResNet with the fewest MACs at or above ``macs`` in the trade-off script's results (trained by
    the recipe for ``epochs``), or None when there are none. ``path``: one sweep.json, or a folder whose
    ``fashion_mnist*/sweep.json`` are all read (each network's newest row is taken)."""
    if path is None:
        return None
    path = Path(path)
    files = sorted(path.glob("fashion_mnist*/sweep.json")) if path.is_dir() else [path]
    newest: dict[str, dict[str, Any]] = {}
    for file in (f for f in files if f.is_file()):
        for r in json.loads(file.read_text()):
            if (r.get("series") == "plain ResNet" and r.get("epochs") is not None
                    and abs(r["epochs"] - epochs) < 1e-6):
                r = {**r, "source": str(file)}
                if r["label"] not in newest or (r.get("date") or "") > (newest[r["label"]].get("date") or ""):
                    newest[r["label"]] = r
    rows = list(newest.values())
    above = [r for r in rows if r["macs"] >= macs]
    if not above:
        return None
    best = min(above, key=lambda r: r["macs"])
    below = [r for r in rows if r["macs"] < macs]
    cheaper = max(below, key=lambda r: r["accuracy"]) if below else None
    return {"label": best["label"], "accuracy": best["accuracy"], "macs": best["macs"], "source": best["source"],
            "date": best.get("date"),
            "cheaper": None if cheaper is None else {k: cheaper[k] for k in ("label", "accuracy", "macs", "source")}}


def format_summary(s: dict[str, Any]) -> list[str]:
    ref = s.get("plain_reference")
    if ref:
        when = f", {ref['date']}" if ref.get("date") else ""
        ref_line = (f"Plain {ref['label']} (fewest MACs >= SkipNet's):  {ref['accuracy']:.2f}% at "
                    f"{ref['macs'] / 1e6:.2f}M  (difference {s['skipnet_accuracy'] - ref['accuracy']:+.2f} points; "
                    f"not trained here: read from {ref['source']}{when})")
    else:
        ref_line = ("Plain ResNet reference:                 none at these MACs and epochs (run `python "
                    f"benchmarks/tradeoff.py --data fashion_mnist --sp-epochs {s['sp_epochs']:g} "
                    f"--hrl-epochs {s['hrl_epochs']:g}`)")
    cheaper = (ref or {}).get("cheaper")
    if cheaper:
        ref_line += (f"\nPlain {cheaper['label']} (fewer MACs than SkipNet's):   {cheaper['accuracy']:.2f}% at "
                     f"{cheaper['macs'] / 1e6:.2f}M  (difference {s['skipnet_accuracy'] - cheaper['accuracy']:+.2f} "
                     f"points; {'same file' if cheaper.get('source') == ref['source'] else cheaper.get('source')})")
    lines = [
        "",
        f"== SkipNet demo: {s['model']} on Fashion-MNIST, {s['total_epochs']:g} epochs in all (SP + HRL) ==",
        f"SkipNet test accuracy (greedy, τ {s['tau']:.3f}): {s['skipnet_accuracy']:.2f}%  (τ set on training "
        "images so that greedy inference spends the MAC target)",
        f"Same weights, every block executed:     {s['all_blocks_accuracy']:.2f}%  "
        f"(difference {s['skipnet_accuracy'] - s['all_blocks_accuracy']:+.2f} points)",
        f"The SP network, before stage 2:        {s['sp_accuracy']:.2f}%  "
        f"(difference {s['skipnet_accuracy'] - s['sp_accuracy']:+.2f} points)",
        f"Mean MACs per image (gates included):   {s['macs_per_image'] / 1e6:.2f}M of "
        f"{s['dense_macs_per_image'] / 1e6:.2f}M plain -> reduction {s['mac_reduction']:.1f}%",
        f"Random skipping, same per-block rates:  {s['random_skipping_accuracy']:.2f}% at "
        f"{s['random_skipping_macs'] / 1e6:.2f}M  (difference "
        f"{s['skipnet_accuracy'] - s['random_skipping_accuracy']:+.2f} points; SP weights, measured here)",
        f"Random skipping, same rates, own weights: {s['own_random_skipping_accuracy']:.2f}%  (difference "
        f"{s['skipnet_accuracy'] - s['own_random_skipping_accuracy']:+.2f} points: what routing per image adds)",
        ref_line,
        f"Authors' block fraction:                {s['block_fraction']:.1f}%",
        "Per-block execution rate (block 0 always runs):",
        "  " + " ".join(f"{r:.2f}" for r in [1.0] + list(s["exec_rates"])),
    ]
    for row in s.get("speed", {}).get("rows", []):
        lines.append(f"Compact vs dense at batch {row['batch_size']:>3}: {row['speedup_vs_dense']:.2f}x measured "
                     f"(ideal {row['ideal_speedup']:.2f}x)")
    if "report" in s:
        lines.append(f"Report: {s['report']}")
    lines.append(f"Total time: {s['total_seconds']:.0f}s")
    return lines
