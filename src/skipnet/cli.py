"""The ``skipnet`` command: train, eval, demo, bench, report, sweep, and listings.

Every option has a default and help text. Library code logs; only this module prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .train.config import RIVAL_STAGES, STAGES

log = logging.getLogger("skipnet")

# Convenience flags of `train`, each a shortcut for one `--set section.key=value` override.
TRAIN_SHORTCUTS = {
    "model": ("model.name", str, "network preset (see `skipnet models`)"),
    "gate": ("model.gate", str, "gate design: rnn, ffgate1, ffgate2"),
    "data": ("data.name", str, "dataset: fashion_mnist, cifar10, cifar100, svhn, imagefolder"),
    "data_root": ("data.root", str, "folder holding the dataset (default: the dataset's standard place)"),
    "batch_size": ("data.batch_size", int, "training batch size (global, over all processes)"),
    "stage": ("train.stage", str, f"the stage to train: {', '.join(STAGES)}"),
    "method": ("train.stage", str, "a rival trained by the same pipeline: act, sact or sdv; without --recipe, "
               "its recipe for --data (fashion_mnist_<method>, or <data>_cpu_<method> on cifar10)"),
    "epochs": ("train.epochs", float, "training epochs (fractions allowed)"),
    "lr": ("train.lr", float, "base learning rate"),
    "init": ("train.init", str, "checkpoint or run folder to start from (HRL: the SP run)"),
    "alpha": ("train.alpha", float, "HRL compute reward weight (start value when --target-macs is set)"),
    "target_macs": ("train.target_macs", float, "HRL: mean MACs to reach, as a fraction of the plain network"),
    "seed": ("train.seed", int, "random seed"),
    "device": ("train.device", str, "auto, cpu, cuda or cuda:N"),
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one stage into a run folder",
                       description="Train one stage. Defaults come from the recipe; flags and --set override them.")
    p.add_argument("--recipe", default=None,
                   help="recipe name (see `skipnet recipes`) or YAML path (default: fashion_mnist_sp, or the "
                        "--method's recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set train.milestones=[80,120] (repeatable)")
    one_stage = p.add_mutually_exclusive_group()  # both set train.stage
    for name, (_, typ, text) in TRAIN_SHORTCUTS.items():
        extra = {"choices": RIVAL_STAGES} if name == "method" else {}
        (one_stage if name in ("stage", "method") else p).add_argument(
            "--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=text, **extra)
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<recipe>-<date-time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --run-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def rival_recipe(method: str, data: str | None) -> str:
    """The packaged recipe of a rival ``method`` for dataset ``data`` (Fashion-MNIST when None)."""
    from .train.config import recipe_names

    data, names = data or "fashion_mnist", recipe_names()
    for name in (f"{data}_{method}", f"{data}_cpu_{method}"):
        if name in names:
            return name
    known = [n for n in names if n.endswith(f"_{method}")]  # recipe_names() is sorted
    raise ValueError(f"no {method} recipe for data {data!r}; known: {', '.join(known)} "
                     f"(or give --recipe with --method {method})")


def cmd_train(args: argparse.Namespace) -> int:
    from .train import load_config, train

    overrides = list(args.overrides)
    for name, (key, _, _) in TRAIN_SHORTCUTS.items():
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.resume:
        if not args.run_dir:
            raise ValueError("--resume needs --run-dir (the run to continue)")
        if overrides:
            raise ValueError("--resume continues with the config stored in the run's checkpoint; drop the "
                             "overrides")
        config = None
    else:
        if args.recipe is None:
            args.recipe = rival_recipe(args.method, args.data) if args.method else "fashion_mnist_sp"
        config = load_config(args.recipe, overrides)
    run_dir = Path(args.run_dir or f"runs/{Path(str(args.recipe)).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = train(config, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if result:
        print(_summary(result))
        print(f"run folder: {run_dir}")
    return 0


def _summary(r: dict[str, Any]) -> str:
    return (f"top-1 {r['accuracy']:.2f}% | MACs/image {r['macs_per_image'] / 1e6:.2f}M "
            f"(plain {r['dense_macs_per_image'] / 1e6:.2f}M, reduction {r['mac_reduction']:.1f}%) | "
            f"block fraction {r['block_fraction']:.1f}%")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint or run folder on a test set",
                       description="Evaluate a trained network: accuracy, MACs per image, reduction, block fraction.")
    p.add_argument("checkpoint", help="checkpoint file, run folder, or published name (skipnet.list_pretrained())")
    p.add_argument("--data", default=None, help="dataset name (default: the one the run was trained on)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the run's, else the standard place)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the run's test split)")
    p.add_argument("--mode", default="greedy", help="decision mode: greedy, all, none, sample, ...")
    p.add_argument("--tau", type=float, default=None,
                   help="greedy threshold: higher skips more (default: the run's own, 0.5 unless fitted)")
    p.add_argument("--executor", default="compact", choices=["masked", "compact"], help="how blocks are run")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import BatchLoader
    from .reporting import load_eval_data, load_run, run_tau, unfinished
    from .train import evaluate
    from .train.device import resolve_device

    device = resolve_device(args.device)
    model, payload = load_run(args.checkpoint, device)  # (warns when the run did not finish)
    data = load_eval_data(payload, args.data, args.data_root, args.split)
    loader = BatchLoader(data, args.batch_size, train=False, device=device)
    tau = run_tau(payload) if args.tau is None else args.tau
    result = evaluate(model, loader, mode=args.mode, tau=tau, executor=args.executor,
                      progress=not args.json and sys.stderr.isatty())
    note = unfinished(payload, args.checkpoint)
    result.update(checkpoint=str(args.checkpoint), data=data.name, split=args.split or "test", finished=not note,
                  tau=tau)
    print(json.dumps(result) if args.json else _summary(result) + (" | did not finish its schedule" if note else ""))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: SP then HRL on Fashion-MNIST, evaluate, benchmark, report",
                       description="Train a SkipNet with RNN gates on Fashion-MNIST (SP, then HRL), evaluate it, "
                                   "measure the compact executor's speed-up and write a report.")
    p.add_argument("--out", default=None, help="demo folder (default: runs/demo-<date-time>)")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST idx files "
                                                    "(default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--sp-epochs", type=float, default=None, help="SP epochs (default: the demo's, 2.5)")
    p.add_argument("--hrl-epochs", type=float, default=None, help="HRL epochs (default: the demo's, 0.5)")
    p.add_argument("--target-macs", type=float, default=None,
                   help="HRL compute target, a fraction of the plain network's MACs (default: the demo's, 0.64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=args.out, data_root=args.data_root, sp_epochs=args.sp_epochs, hrl_epochs=args.hrl_epochs,
             target_macs=args.target_macs, progress=not args.no_progress, echo=print)
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write an analysis report of a trained network",
                       description="Accuracy, MACs, measured speed-up, per-block and per-class routing, galleries, "
                                   "paths, input-scale analysis and a threshold sweep, as report.md + PNGs + "
                                   "metrics.json.")
    p.add_argument("checkpoint", help="checkpoint file, run folder, or published name (skipnet.list_pretrained())")
    p.add_argument("--data", default=None, help="dataset name (default: the one the run was trained on)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the run's)")
    p.add_argument("--split", default=None, help="split to analyse (default: the run's test split)")
    p.add_argument("--out", default=None, help="report folder (default: <run folder>/report)")
    p.add_argument("--tau", type=float, default=None, help="the operating threshold (default: the run's own)")
    p.add_argument("--taus", type=float, nargs="*", default=list(SWEEP_TAUS), help="thresholds of the sweep")
    p.add_argument("--scales", type=float, nargs="*", default=[0.75, 1.0, 1.25, 1.5],
                   help="input rescalings of the input-scale analysis")
    p.add_argument("--sweep-images", type=int, default=5000, help="images used by the sweep and scale analysis")
    p.add_argument("--compare", nargs="*", default=[], metavar="RUN",
                   help="other SkipNet runs (e.g. HRL at other alphas) to place on the trade-off plot")
    p.add_argument("--plain", nargs="*", default=[], metavar="RUN",
                   help="plain ResNet runs to place on the trade-off plot as reference points")
    p.add_argument("--no-speed", action="store_true", help="skip the wall-clock measurement")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_report)


SWEEP_TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def cmd_report(args: argparse.Namespace) -> int:
    from .reporting import make_report

    path = make_report(args.checkpoint, data=args.data, data_root=args.data_root, split=args.split, out=args.out,
                       tau=args.tau, taus=args.taus, scales=args.scales, sweep_images=args.sweep_images,
                       compare=args.compare, plain=args.plain, speed=not args.no_speed,
                       overwrite=args.overwrite, batch_size=args.batch_size, device=args.device,
                       progress=sys.stderr.isatty())
    print(f"report: {path}")
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="accuracy vs MACs: a threshold sweep and/or several runs, as a table and plot",
                       description="(a) sweep the greedy threshold of one trained network (no retraining) and "
                                   "(b) evaluate several runs (e.g. HRL at different alphas) and plain ResNets, "
                                   "then write sweep.json, sweep.md and tradeoff.png.")
    p.add_argument("runs", nargs="+", help="SkipNet runs or checkpoints; the first one is also threshold-swept")
    p.add_argument("--plain", nargs="*", default=[], metavar="RUN", help="plain ResNet runs (reference points)")
    p.add_argument("--taus", type=float, nargs="*", default=list(SWEEP_TAUS), help="thresholds of the sweeps")
    p.add_argument("--sweep", nargs="*", default=None, metavar="RUN",
                   help="runs to threshold-sweep (default: the first run)")
    p.add_argument("--random", default=None, metavar="SP_RUN",
                   help="random skipping on these weights at each SkipNet run's per-block rates (same MACs)")
    p.add_argument("--random-seeds", type=int, default=1, help="random-skipping draws per run")
    p.add_argument("--data", default=None, help="dataset name (default: the first run's)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the first run's)")
    p.add_argument("--split", default=None, help="split (default: the run's test split)")
    p.add_argument("--out", required=True, help="folder for sweep.json, sweep.md and tradeoff.png")
    p.add_argument("--overwrite", action="store_true", help="replace files in an existing --out folder")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .reporting import make_sweep

    table = make_sweep(args.runs, plain=args.plain, taus=args.taus, sweep=args.sweep, random_from=args.random,
                       random_seeds=args.random_seeds, data=args.data, data_root=args.data_root,
                       split=args.split, out=args.out, overwrite=args.overwrite, batch_size=args.batch_size,
                       device=args.device, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(table))
    else:
        print(f"{'series':44s} {'point':>12s} {'top-1 %':>8s} {'MMACs':>9s} {'reduction %':>12s}")
        for row in table:
            print(f"{row['series'][:44]:44s} {row['label']:>12s} {row['accuracy']:8.2f} {row['macs'] / 1e6:9.2f} "
                  f"{row['reduction']:12.1f}")
        print(f"written to {args.out}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time the plain network and the SkipNet executors",
                       description="Latency (p50/p90), images/s and speed-up vs the plain ResNet of the dense, "
                                   "masked, compact and per-image executors, next to the ideal (MAC) speed-up.")
    p.add_argument("model", nargs="?", default="cifar_resnet110",
                   help="a preset (random weights, random decisions at --rates) or a checkpoint/run folder "
                        "(its own greedy decisions, on Gaussian-noise images; `skipnet report` times a run on "
                        "its test images)")
    p.add_argument("--gate", default="rnn", help="gate design for a preset")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256], help="batch sizes")
    p.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0],
                   help="execution rates (presets): each gate fires for this fraction of images")
    p.add_argument("--executors", nargs="+", default=["dense", "masked", "compact", "per_image"],
                   help="executors to time: dense, masked, compact, per_image")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per group (sets the repeats)")
    p.add_argument("--min-images", type=int, default=32,
                   help="a timed call covers at least this many images: smaller batches are timed as several "
                        "batches with their own decisions (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON list of rows")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import bench_environment, format_table, run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model: Any = args.model
    kwargs: dict[str, Any] = {}
    from .published import list_pretrained

    if Path(args.model).exists() or args.model in list_pretrained():
        from .reporting import load_run, run_tau

        model, payload = load_run(args.model, torch.device("cpu"))  # (warns when the run did not finish)
        size = payload.get("image_size") or (
            [28, 28] if payload.get("run_config", {}).get("data", {}).get("name") == "fashion_mnist" else None)
        kwargs.update(decisions_from_model=True, tau=run_tau(payload), input_size=tuple(size) if size else None)
    rows = run_bench(model, batch_sizes=args.batch_sizes, exec_rates=args.rates, executors=args.executors,
                     device=args.device, dtype=dtype, budget_s=args.budget, gate=args.gate,
                     min_images=args.min_images, **kwargs)
    if args.json:
        print(json.dumps(rows))
    else:
        print(json.dumps(bench_environment(args.device, dtype)))
        print(format_table(rows))
    return 0


def _add_listings(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the network presets")
    p.set_defaults(func=lambda a: print("\n".join(__import__("skipnet").list_models())) or 0)
    p = sub.add_parser("recipes", help="list the named recipes")
    p.set_defaults(func=cmd_recipes)


def cmd_recipes(args: argparse.Namespace) -> int:
    from .train.config import read_recipe, recipe_names

    for name in recipe_names():
        raw = read_recipe(name)
        print(f"{name:28s} {raw.get('model', {}).get('name', '')} / {raw.get('data', {}).get('name', '')} / "
              f"{raw.get('train', {}).get('stage', '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skipnet", description="SkipNet: learned block skipping in ResNets.")
    parser.add_argument("--version", action="version", version=f"skipnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_report(sub)
    _add_sweep(sub)
    _add_bench(sub)
    _add_listings(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from .train import Interrupted, NonFiniteLossError
    from .train.runs import RunBusyError

    try:
        return int(args.func(args) or 0)
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ValueError, OSError, RunBusyError) as err:  # OSError: files missing or in the way, a full disk
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
