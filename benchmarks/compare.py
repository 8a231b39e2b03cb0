"""Before/after speed of two source trees, measured in one sitting, interleaved: the inference targets
(``bench_executors.py``) and the training ratios (``bench_training.py``) of each tree, run alternately.

    git worktree add /tmp/skipnet-before 3a4df5a        # the tree to compare with (here: before issue 13)
    python benchmarks/compare.py --before /tmp/skipnet-before --after . --rounds 3 --json compare.json

Each tree is run with its own benchmark scripts and its own package (``PYTHONPATH=<tree>/src``, checked
before anything is timed), in separate processes: round r runs the inference benchmark of both trees, then
the training benchmark of both, the order of the trees alternating from round to round, so that a change in
the machine's load hits both alike. A warm-up pass first builds whatever each tree compiles (its kernels), so
no build is timed. Medians over the rounds are compared:

* inference targets (``bench_executors.py --quick --skip-old-request``; 1 thread, CPU-time clock by
  default): the compact/ideal speed-up efficiency and the compact/plain latency ratio, each within 3 % of
  the before tree's (relative); the RNN gate's share of the latency within 1 point (absolute);
* the raw latencies of every (model, executor, batch, rate) row, for information (a faster plain network
  in one tree shows there);
* training (``bench_training.py --depth 38 --stages sp hrl calibrate``; 2 threads): each SkipNet stage's
  images/s as a fraction of the plain network's, within 3 % of the before tree's (relative).

Run it on a quiet machine (it prints the load average before and after). ``--quick-check`` runs tiny
benchmarks once (a smoke test of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = 0.03  # relative, for speed-ups, latency ratios and training ratios
GATE_SHARE_POINTS = 0.01  # absolute, for the gate's share of the latency


def tree_env(tree: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": str(threads)}
    env.pop("GLIBC_TUNABLES", None)  # (bench_executors.py sets its own)
    return env


def check_tree(tree: Path) -> str:
    """The package a tree's processes import (must be the tree's own) and its commit."""
    code = "import skipnet, sys; print(skipnet.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=tree_env(tree, 1), capture_output=True, text=True,
                         check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to((tree / "src").resolve()):
        raise SystemExit(f"{tree}: its processes import skipnet from {out}, not from the tree")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree, capture_output=True,
                            text=True)
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def warm_up(tree: Path) -> None:
    """One pass of each path the benchmarks time, so that kernels are built before any timing."""
    code = """
import torch
from skipnet import create_model
m = create_model("cifar_resnet8").eval()
x = torch.randn(4, 3, 32, 32)
with torch.no_grad():
    m(x, "greedy", executor="compact")
m.train()
m(x, "straight_through").logits.sum().backward()
"""
    subprocess.run([sys.executable, "-c", code], env=tree_env(tree, 1), check=True, timeout=1800)


def run_inference(tree: Path, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, str(tree / "benchmarks" / "bench_executors.py"), "--skip-old-request",
               "--threads", "1", "--clock", args.clock, "--json", str(out)]
        cmd += ["--batch-sizes", "1", "2", "--rates", "0.5", "--repeats", "1", "--models", "cifar_resnet8"] \
            if args.quick_check else ["--quick", *(["--repeats", str(args.repeats)] if args.repeats else [])]
        subprocess.run(cmd, env=tree_env(tree, 1), check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def run_training(tree: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(tree / "benchmarks" / "bench_training.py"), "--json", "--threads",
           str(args.train_threads)]
    cmd += ["--depth", "8", "--stages", "sp", "--rounds", "1", "--steps", "1", "--batch", "8"] if args.quick_check \
        else ["--depth", str(args.depth), "--stages", *args.stages, "--rounds", str(args.train_rounds)]
    done = subprocess.run(cmd, env=tree_env(tree, args.train_threads), check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(results: dict[str, dict[str, list]]) -> tuple[list[dict], bool]:
    """Rows comparing the trees' medians, and whether the after tree holds every checked figure."""
    rows, ok = [], True

    def add(kind: str, name: str, before: list[float], after: list[float], better: str, checked: bool) -> None:
        nonlocal ok
        b, a = statistics.median(before), statistics.median(after)
        if better == "points":  # lower is better, absolute
            change, holds = a - b, a - b <= GATE_SHARE_POINTS
        elif better == "higher":
            change = a / b - 1 if b else float("nan")
            holds = a >= b * (1 - TOLERANCE)
        else:
            change = a / b - 1 if b else float("nan")
            holds = a <= b * (1 + TOLERANCE)
        ok = ok and (holds or not checked)
        rows.append({"kind": kind, "name": name, "before": b, "after": a, "change": change, "better": better,
                     "checked": checked, "holds": holds, "before_runs": before, "after_runs": after})

    targets: dict[str, dict[str, list[float]]] = {}
    for tree in ("before", "after"):
        for run in results[tree]["inference"]:
            for t in run["targets"]:
                targets.setdefault(f"{t['model']}: {t['target']}", {"before": [], "after": []})[tree].append(
                    t["measured"])
    for name, v in sorted(targets.items()):
        if v["before"] and v["after"]:
            better = "points" if "gate share" in name else ("higher" if "speed-up" in name else "lower")
            add("inference target", name, v["before"], v["after"], better, True)
    latencies: dict[str, dict[str, list[float]]] = {}
    for tree in ("before", "after"):
        for run in results[tree]["inference"]:
            for r in run["rows"]:
                key = f"{r['model']} {r['executor']} batch {r['batch_size']} rate {r['exec_rate']:.2f} (ms)"
                latencies.setdefault(key, {"before": [], "after": []})[tree].append(r["latency_ms_p50"])
    for name, v in sorted(latencies.items()):
        if v["before"] and v["after"]:
            add("latency", name, v["before"], v["after"], "lower", False)
    ratios: dict[str, dict[str, list[float]]] = {}
    for tree in ("before", "after"):
        for run in results[tree]["training"]:
            for r in run["rows"]:
                name = f"depth {r['depth']} {r['stage']} images/s vs plain"
                ratios.setdefault(name, {"before": [], "after": []})[tree].append(r["ratio_vs_plain"])
    for name, v in sorted(ratios.items()):
        if v["before"] and v["after"] and "baseline" not in name:
            add("training ratio", name, v["before"], v["after"], "higher", True)
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--before", type=Path, required=True, help="a source tree (src/ and benchmarks/)")
    p.add_argument("--after", type=Path, required=True, help="the other one")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs both trees)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="inference timing clock (1 thread)")
    p.add_argument("--repeats", type=int, default=None, help="inference: timed rounds per group")
    p.add_argument("--depth", type=int, default=38, help="training: CIFAR ResNet depth")
    p.add_argument("--stages", nargs="+", default=["sp", "hrl", "calibrate"], help="training: gated stages")
    p.add_argument("--train-rounds", type=int, default=5, help="training: interleaved rounds inside one run")
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--quick-check", action="store_true", help="tiny runs: checks this script, measures nothing")
    p.add_argument("--json", type=Path, help="write every run's results and the comparison here")
    args = p.parse_args(argv)

    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    commits = {k: check_tree(t) for k, t in trees.items()}
    print(f"before: {trees['before']} ({commits['before']}); after: {trees['after']} ({commits['after']})")
    for tree in trees.values():
        warm_up(tree)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.time()
    results: dict[str, dict[str, list]] = {k: {"inference": [], "training": []} for k in trees}
    for r in range(args.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for kind, fn, skip in (("inference", run_inference, args.skip_inference),
                               ("training", run_training, args.skip_training)):
            if skip:
                continue
            for name in order:
                t = time.time()
                results[name][kind].append(fn(trees[name], args))
                print(f"round {r + 1}/{args.rounds}: {kind} {name} ({time.time() - t:.0f} s)", flush=True)
    rows, ok = summarise(results)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\n{time.time() - t0:.0f} s; load average {load0} at start, {load1} at end; medians of {args.rounds} "
          "round(s); change = after / before - 1 (gate share: after - before, in points)")
    width = max((len(r["name"]) for r in rows), default=10)
    for r in rows:
        verdict = ("holds" if r["holds"] else "WORSE") if r["checked"] else ""
        change = f"{100 * r['change']:+.1f} pt" if r["better"] == "points" else f"{100 * r['change']:+.1f} %"
        print(f"  {r['kind']:16s} {r['name']:{width}s} {r['before']:10.4f} {r['after']:10.4f} {change:>9s}  {verdict}")
    print(f"\nafter holds every checked figure within {TOLERANCE:.0%} (gate share: {GATE_SHARE_POINTS:.0%} point): "
          f"{'yes' if ok else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "commits": commits,
                                         "load_average": [load0, load1], "results": results, "comparison": rows,
                                         "holds": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
