"""Measure the compact runner's settings (skipnet.infer.RunnerConfig) on this machine.

    python benchmarks/bench_runner.py                     # 1 thread, ~3 min
    python benchmarks/bench_runner.py --threads 2 --json runner.json

Three measurements, each timed in place (whole blocks or whole passes, so that the caches are as in a real
pass), the variants interleaved round by round, medians:

1. **Crossover** (``copy_cost``): a basic block of each width of a CIFAR ResNet at batch ``--batch``, run for
   n of the B images either by gathering them (one copy: the fragmented bookkeeping) or on the whole batch with
   the skipped images' shortcut put back. The smallest n/B from which the whole batch is not slower is the
   crossover x; ``copy_cost = C (1/x - 1)`` is what the runner's formula needs to cross over there.
2. **Merge kernel size** (``merge_kernel_min_numel``): a whole block (convolutions and merge) at each width and
   several batch sizes with the merge kernel allowed and not. The smallest size from which the kernel is never
   slower is the suggested threshold.
3. **Gate kernel batch** (``gate_kernel_max_batch``): a compact pass of SkipNet-110 (half the blocks per image)
   with the RNN gate kernel and with the reference's ops, per batch size, at this thread count. With one
   thread the kernel is used at every batch size; with several, up to the largest batch where it still wins.

The printed suggestions are what this machine measured; RunnerConfig's defaults are those of the machine in
docs/RESULTS.md. Change them there (with the figures) if a machine that matters disagrees.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch

from skipnet import create_model, ops
from skipnet.infer import CompactRunner, RunnerConfig
from skipnet.infer.batch import index_tensor, take_rows


def interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds per call of each callable, timed round by round after one warm-up call each."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def blocks_by_width(model) -> dict:
    """One identity-shortcut block per width, with the spatial size of its input at 32 x 32 images."""
    out, size = {}, 32
    for block in model.blocks:
        if block.downsample is not None:
            size //= 2
        c = block.conv1.in_channels
        if block.downsample is None and c not in out:
            out[c] = (block, size)
    return out


def crossover(model, batch: int, rounds: int, fmt) -> list[dict]:
    runner = CompactRunner(model)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for c, (block, size) in blocks_by_width(model).items():
        x = torch.randn(batch, c, size, size, generator=gen).contiguous(memory_format=fmt)
        found = None
        for frac in np.arange(0.50, 1.0, 0.02):
            n = int(round(frac * batch))
            idx = index_tensor(np.sort(np.random.default_rng(0).permutation(batch)[:n]), x.device)

            def gather(idx=idx, x=x, block=block):
                sub = take_rows(x, idx)
                runner.merge(block, block.residual(sub), sub)

            def whole(idx=idx, x=x, block=block):
                keep = torch.ones(batch, dtype=torch.bool)
                keep[idx] = False
                skipped = keep.nonzero().squeeze(1)
                runner.run_block(block, x, pool=False)[0].index_copy_(0, skipped, take_rows(x, skipped))

            med = interleaved({"gather": gather, "whole": whole}, rounds)
            rows.append({"channels": c, "fraction": float(frac), "gather_ms": 1e3 * med["gather"],
                         "whole_ms": 1e3 * med["whole"]})
            if found is None and med["whole"] <= med["gather"]:
                found = float(frac)
        rows.append({"channels": c, "crossover": found,
                     "copy_cost": None if found is None else c * (1 / found - 1)})
    return rows


def merge_size(model, batches: list[int], rounds: int, fmt) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    runners = {"kernel": CompactRunner(model, RunnerConfig(merge_kernel_min_numel=0)),
               "reference": CompactRunner(model, RunnerConfig(merge_kernel=False))}
    for c, (block, size) in blocks_by_width(model).items():
        for b in batches:
            x = torch.randn(b, c, size, size, generator=gen).contiguous(memory_format=fmt)
            med = interleaved({k: (lambda r=r, b=block, x=x: r.run_block(b, x)) for k, r in runners.items()}, rounds)
            rows.append({"channels": c, "batch": b, "numel": x.numel(), "kernel_ms": 1e3 * med["kernel"],
                         "reference_ms": 1e3 * med["reference"], "kernel_over_reference": med["kernel"] /
                         med["reference"]})
    return rows


def gate_batch(model, batches: list[int], rounds: int, fmt) -> list[dict]:
    rows = []
    big = 1 << 30
    runners = {"kernel": CompactRunner(model, RunnerConfig(gate_kernel_max_batch=big)),
               "reference": CompactRunner(model, RunnerConfig(gate_kernel=False))}
    for b in batches:
        x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)).contiguous(memory_format=fmt)
        d = (torch.rand(b, model.num_gates, generator=torch.Generator().manual_seed(0)) < 0.5).float()
        med = interleaved({k: (lambda r=r, x=x, d=d: r(x, "fixed", decisions=d)) for k, r in runners.items()},
                          rounds)
        rows.append({"batch": b, "kernel_ms": 1e3 * med["kernel"], "reference_ms": 1e3 * med["reference"],
                     "kernel_over_reference": med["kernel"] / med["reference"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128, help="crossover: batch size")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--contiguous", action="store_true", help="contiguous layout (default: channels_last)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and rounds (a smoke test)")
    p.add_argument("--json", help="write the environment and every row here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    rounds = 2 if args.quick else args.rounds
    torch.manual_seed(0)
    model = create_model("cifar_resnet110").eval().to(memory_format=fmt)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "kernels": ops.kernels_available(),
           "kernel_threaded": ops.build.threaded(), "cpu": platform.processor() or platform.machine(),
           "layout": "contiguous" if args.contiguous else "channels_last",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print("environment:", json.dumps(env))
    if not ops.kernels_available():
        print("the kernels are not built here: only the crossover is measured")
    out: dict = {"environment": env}
    with torch.inference_mode():
        out["crossover"] = crossover(model, 16 if args.quick else args.batch, rounds, fmt)
        print("\n1. crossover (fraction of the batch from which the whole batch is not slower):")
        for r in out["crossover"]:
            if "crossover" in r:
                cost = "-" if r["copy_cost"] is None else f"{r['copy_cost']:.2f}"
                print(f"  width {r['channels']:3d}: crossover {r['crossover']}, copy_cost {cost}")
        costs = [r["copy_cost"] for r in out["crossover"] if r.get("copy_cost") is not None]
        if costs:
            print(f"  suggested copy_cost: {statistics.median(costs):.2f} (default {RunnerConfig().copy_cost})")
        if ops.kernels_available():
            batches = [1, 2, 4] if args.quick else [1, 2, 4, 8, 16, 64]
            out["merge"] = merge_size(model, batches, rounds, fmt)
            print("\n2. whole block, merge kernel / reference (time ratio):")
            for r in out["merge"]:
                print(f"  width {r['channels']:3d} batch {r['batch']:4d} ({r['numel']:8d} values): "
                      f"{r['kernel_over_reference']:.3f}")
            losing = [r["numel"] for r in out["merge"] if r["kernel_over_reference"] > 1.0]
            print(f"  suggested merge_kernel_min_numel: above {max(losing) if losing else 0} "
                  f"(default {RunnerConfig().merge_kernel_min_numel})")
            batches = [1, 8, 32] if args.quick else [1, 8, 16, 32, 64, 128, 256]
            out["gate"] = gate_batch(model, batches, rounds, fmt)
            print(f"\n3. compact SkipNet-110 pass at 50 %, RNN gate kernel / reference, {args.threads} thread(s):")
            for r in out["gate"]:
                print(f"  batch {r['batch']:4d}: {r['kernel_ms']:9.2f} ms / {r['reference_ms']:9.2f} ms = "
                      f"{r['kernel_over_reference']:.3f}")
            wins = [r["batch"] for r in out["gate"] if r["kernel_over_reference"] <= 1.0]
            print(f"  kernel no slower up to batch {max(wins) if wins else None} "
                  f"(default gate_kernel_max_batch {RunnerConfig().gate_kernel_max_batch}, which applies "
                  "only with several threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
