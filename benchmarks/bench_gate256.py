"""Issue 13's open figure: a compact SkipNet-38 pass at batch 256 with every block run, against the plain
ResNet-38, with the runner's CPU kernels each on and off (``RunnerConfig.gate_kernel`` / ``merge_kernel``),
in fixed (every decision 1) and greedy (τ 0: the gates decide, every block runs) mode. 1 thread, CPU-time
clock, channels_last, the settings timed round by round; medians.

    python benchmarks/bench_gate256.py --rounds 9 --json /tmp/gate256.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from skipnet import create_model
from skipnet.infer.runner import CompactRunner, RunnerConfig

SETTINGS = {"compact": {}, "gate_kernel_off": {"gate_kernel": False}, "merge_kernel_off": {"merge_kernel": False},
            "both_off": {"gate_kernel": False, "merge_kernel": False}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--json", default=None, help="write the medians and every time here")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gated = create_model("cifar_resnet38").eval().to(memory_format=torch.channels_last)
    plain = create_model("cifar_resnet38", gate="none").eval().to(memory_format=torch.channels_last)
    plain.load_state_dict(gated.state_dict(), strict=False)
    x = torch.randn(args.batch, 3, 32, 32).to(memory_format=torch.channels_last)
    ones = torch.ones(args.batch, gated.num_gates)
    fns = {"plain": lambda: plain(x)}
    for name, kw in SETTINGS.items():
        runner = CompactRunner(gated, RunnerConfig(**kw))
        fns[name] = lambda r=runner: r(x, "fixed", decisions=ones)
        fns[name + "_greedy"] = lambda r=runner: r(x, "greedy", tau=0.0)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up: builds, allocator
            fn()
            fn()
        for _ in range(args.rounds):
            for k, fn in fns.items():
                t0 = time.process_time()
                fn()
                times[k].append(time.process_time() - t0)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:24s} {v:8.1f} ms   / plain {v / med['plain']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_ms": med, "times_s": times, "rounds": args.rounds, "batch": args.batch}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
