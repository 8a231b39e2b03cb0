"""Wall-clock speed of the executors next to the compute-ideal speed-up, and the speed targets.

    python benchmarks/bench_executors.py            # full table, SkipNet-110 and -38 (RNN gates): ~5 min
    python benchmarks/bench_executors.py --quick    # batch 1 and 256, rates 0.5 and 1: ~2 min
    python benchmarks/bench_executors.py --json out.json --threads 2

What it does (see skipnet.bench for the method):

1. For each model, ``run_bench`` over batch sizes x execution rates with the executors ``dense`` (the plain
   ResNet with the same backbone weights), ``masked``, ``compact``, ``per_image`` and
   ``compact_no_gates``; it prints the table.
2. Checks the targets (issue "Real speed"), printing PASS/MISS and the measured ratio:
   * compact at 50% execution reaches >= 0.9 x the compute-ideal speed-up, at batch 1 and batch 256;
   * at 100% execution compact is at most 5% slower than the plain network (every batch size);
   * the RNN gate's share of the latency is <= 10% at batch 1 and <= 3% at batch 256 (at 50% and 100%).
   Gate share, the method: the same pass (compact, same fixed decisions) timed a second time with the gate
   computation bypassed -- the host gate stepper replaced by a stub that neither pools nor runs the RNN --
   interleaved with the real one: share = 1 - t(no gates) / t(compact).
3. The older request: eval images/s of the plain ResNet-110, SkipNet-110 masked and SkipNet-110 compact with
   half of the gates forced off at random (per image), at batch 1 and 128.

Timing: one process, ``torch.set_num_threads(--threads)`` (default 1: on a shared 2-core machine a second
thread mostly measures the neighbours), executors interleaved round by round, medians; ``--clock cpu``
times process CPU time instead of wall time (immune to other processes' load; 1 thread only). Layout:
channels_last by default (11-15% faster eval than contiguous at 1 thread here, for dense and compact). glibc's malloc
returns big freed blocks to the OS, so every batch-256 activation is page-faulted in again (~20% of the
time at batch 256, and noisy); the script re-executes itself with GLIBC_TUNABLES raising the mmap and trim
thresholds (``--no-malloc-tuning`` to keep the defaults; the setting is in the printed environment).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

MALLOC_TUNING = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
MODELS = ("cifar_resnet110", "cifar_resnet38")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1 and 256, rates 0.5 and 1.0")
    p.add_argument("--models", nargs="*", default=list(MODELS), help="none: only the other sections")
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--rates", type=float, nargs="+")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, immune to other processes' load (only with --threads 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per group (default: ~2 s of rounds, 5-50)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed rounds per group (no --repeats)")
    p.add_argument("--min-images", type=int, default=32,
                   help="images per timed call: smaller batches run as several draws (see skipnet.bench)")
    p.add_argument("--json", help="write environment, rows and target checks here")
    p.add_argument("--skip-old-request", action="store_true", help="skip the batch 1/128 images/s table")
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                   help="layout of networks and inputs (channels_last: faster eval on the 1-thread CPU measured)")
    p.add_argument("--memory-format-check", action="store_true",
                   help="also time dense and compact with channels_last against contiguous")
    p.add_argument("--no-malloc-tuning", action="store_true")
    args = p.parse_args(argv)

    if not args.no_malloc_tuning and sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = MALLOC_TUNING
        os.execv(sys.executable, [sys.executable, *sys.argv])  # glibc reads its tunables at start-up

    import torch

    from skipnet.bench import bench_environment, format_table, run_bench

    torch.set_num_threads(args.threads)
    batch_sizes = args.batch_sizes or ([1, 256] if args.quick else [1, 8, 64, 256])
    rates = args.rates or ([0.5, 1.0] if args.quick else [0.25, 0.5, 0.75, 1.0])
    env = bench_environment()
    env["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
    env["clock"] = args.clock
    env["memory_format"] = args.memory_format
    print("environment:", json.dumps(env))
    t0 = time.time()

    rows, checks = [], []
    for name in args.models:
        model_rows = run_bench(name, batch_sizes=batch_sizes, exec_rates=rates, repeats=args.repeats,
                               budget_s=args.budget, clock=args.clock, memory_format=args.memory_format,
                               min_images=args.min_images,
                               executors=("dense", "masked", "compact", "per_image", "compact_no_gates"))
        rows += model_rows
        print(f"\n{name} (RNN gates), {args.threads} thread(s), {args.clock} clock, {args.memory_format}, "
              "ms per batch:")
        print(format_table(model_rows))
        checks += check_targets(name, model_rows)

    print("\ntargets:")
    for c in checks:
        print(f"  {'PASS' if c['pass'] else 'MISS'}  {c['model']:16s} {c['target']:58s} measured {c['measured']:.3f}"
              f"  (limit {c['limit']})")

    old = []
    if not args.skip_old_request:
        old = run_bench("cifar_resnet110", batch_sizes=(1, 128), exec_rates=(0.5,), repeats=args.repeats,
                        budget_s=args.budget, clock=args.clock, memory_format=args.memory_format,
                        min_images=args.min_images, executors=("dense", "masked", "compact"))
        print("\neval images/s, ResNet-110 / SkipNet-110 (RNN gates), half of the gates off at random per image:")
        for r in old:
            label = {"dense": "plain ResNet-110", "masked": "SkipNet-110 masked", "compact": "SkipNet-110 compact"}
            print(f"  batch {r['batch_size']:4d}  {label[r['executor']]:22s} {r['images_per_s']:9.1f} img/s"
                  f"  (speed-up {r['speedup_vs_dense']:.2f}, ideal {r['ideal_speedup']:.2f})")

    formats = []
    if args.memory_format_check:
        print("\nchannels_last / contiguous, median latency (interleaved): ResNet-110, compact SkipNet-110 at 50%")
        for b, reps in ((1, 30), (64, 4)):
            ratios = memory_format_check(b, reps, args.clock)
            formats.append({"batch_size": b, **ratios})
            print(f"  batch {b:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in ratios.items()))

    env["loadavg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    print(f"\n{time.time() - t0:.0f} s; load average at start {env.get('loadavg_1m')}, at end {env['loadavg_1m_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "targets": checks, "old_request": old,
                       "memory_format": formats}, f, indent=1)
    return 0


def memory_format_check(batch: int, repeats: int, clock: str) -> dict:
    """Latency ratio channels_last / contiguous of the plain ResNet-110 and the compact SkipNet-110 (random
    decisions at 50%), the four timed round by round."""
    import torch

    from skipnet import create_model

    gated = create_model("cifar_resnet110").eval()
    plain = create_model("cifar_resnet110", gate="none").eval()
    plain.load_state_dict(gated.state_dict(), strict=False)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    d = (torch.rand(batch, gated.num_gates, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    fns = {}
    for fmt in ("contiguous", "channels_last"):
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        g = create_model("cifar_resnet110").eval().to(memory_format=mf)
        g.load_state_dict(gated.state_dict())
        p = create_model("cifar_resnet110", gate="none").eval().to(memory_format=mf)
        p.load_state_dict(plain.state_dict())
        xf = x.to(memory_format=mf)
        fns[("plain", fmt)] = lambda p=p, xf=xf: p(xf)
        fns[("compact", fmt)] = lambda g=g, xf=xf: g(xf, "fixed", decisions=d, executor="compact")
    timer = time.process_time if clock == "cpu" else time.perf_counter
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = timer()
                fn()
                times[k].append(timer() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {ex: med[(ex, "channels_last")] / med[(ex, "contiguous")] for ex in ("plain", "compact")}


def check_targets(model: str, rows: list[dict]) -> list[dict]:
    """The issue's targets, from one model's rows (those that were measured)."""
    by = {(r["executor"], r["batch_size"], r["exec_rate"]): r for r in rows}
    out = []

    def add(target: str, measured: float, limit: str, ok: bool) -> None:
        out.append({"model": model, "target": target, "measured": measured, "limit": limit, "pass": bool(ok)})

    for b in (1, 256):
        r = by.get(("compact", b, 0.5))
        if r:
            add(f"batch {b}, 50%: compact speed-up / ideal speed-up", r["efficiency"], ">= 0.9", r["efficiency"] >= 0.9)
    for (ex, b, rate), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        if ex == "compact" and rate == 1.0:
            slower = by[("dense", b, rate)]["latency_ms_p50"]
            ratio = r["latency_ms_p50"] / slower
            add(f"batch {b}, 100%: compact latency / plain-network latency", ratio, "<= 1.05", ratio <= 1.05)
    for b, limit in ((1, 0.10), (256, 0.03)):
        for rate in (0.5, 1.0):
            r = by.get(("compact", b, rate))
            if r and "gate_share" in r:
                add(f"batch {b}, {rate:.0%}: RNN gate share of compact latency", r["gate_share"], f"<= {limit}",
                    r["gate_share"] <= limit)
    return out


if __name__ == "__main__":
    sys.exit(main())
