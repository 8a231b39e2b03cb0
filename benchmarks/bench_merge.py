"""Does the training merge's C++ kernel still pay for itself against torch.compile? (issue 13)

The masked executor's merge in training is ``lerp(s, relu(r + s), g)`` per image, forward and backward
(:func:`skipnet.ops.gated_merge`). This times one forward + backward of it on the activation shapes of a
CIFAR SkipNet's three stages at a training batch, three ways, interleaved round by round (medians):

* ``kernel``: the ``skipnet::gated_merge`` op's CPU kernel (one pass each way);
* ``inductor``: the plain expression compiled by ``torch.compile`` (Inductor fuses forward and backward);
* ``eager``: the reference in PyTorch ops with its hand-written backward (what runs without a compiler).

If ``inductor`` is within 3 % of ``kernel`` at every shape (``--tolerance``), the kernel is not worth its
code: the script says so. Decisions: every image runs (most straight-through batches), or a mix.

    python benchmarks/bench_merge.py                      # batch 128, PyTorch's default threads
    python benchmarks/bench_merge.py --threads 2 --rounds 30 --json merge.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from skipnet import ops

SHAPES = ((16, 32, 32), (32, 16, 16), (64, 8, 8))  # a CIFAR ResNet's stages: channels, height, width


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved timed rounds")
    p.add_argument("--steps", type=int, default=5, help="forward + backward passes per timed call")
    p.add_argument("--tolerance", type=float, default=0.03)
    p.add_argument("--contiguous", action="store_true", help="contiguous layout (default: channels_last)")
    p.add_argument("--json", help="write the environment and the medians here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ops.kernels_available():
        print("the kernels are not built here (no compiler?): nothing to compare")
        return 1
    compiled = torch.compile(ops.gated_merge_reference, backend="inductor", dynamic=False)
    variants = {
        "kernel": torch.ops.skipnet.gated_merge.default,
        "inductor": compiled,
        "eager": ops.GatedMergeReference.apply,
    }
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    gen = torch.Generator().manual_seed(0)
    results = []
    for c, h, w in SHAPES:
        for decisions in ("all run", "mixed"):
            r = torch.randn(args.batch, c, h, w, generator=gen).contiguous(memory_format=fmt).requires_grad_()
            s = torch.randn(args.batch, c, h, w, generator=gen).contiguous(memory_format=fmt).requires_grad_()
            g = torch.ones(args.batch) if decisions == "all run" else (torch.rand(args.batch, generator=gen) < 0.7)
            g = g.float().requires_grad_()
            grad = torch.randn(args.batch, c, h, w, generator=gen).contiguous(memory_format=fmt)

            def call(fn, r=r, s=s, g=g, grad=grad):
                for _ in range(args.steps):
                    fn(r, s, g).backward(grad)

            times = {k: [] for k in variants}
            for fn in variants.values():  # warm-up (and Inductor's compilation)
                call(fn)
                call(fn)
            for _ in range(args.rounds):
                for k, fn in variants.items():
                    t0 = time.perf_counter()
                    call(fn)
                    times[k].append((time.perf_counter() - t0) / args.steps)
            med = {k: statistics.median(v) for k, v in times.items()}
            results.append({"shape": [args.batch, c, h, w], "decisions": decisions,
                            **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                            "inductor_over_kernel": med["inductor"] / med["kernel"],
                            "eager_over_kernel": med["eager"] / med["kernel"]})
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "kernel_threaded": ops.build.threaded(),
           "cpu": platform.processor() or platform.machine(), "layout": "contiguous" if args.contiguous else
           "channels_last", "rounds": args.rounds, "steps": args.steps, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                             time.gmtime())}
    print(f"gated merge, forward + backward, ms per pass (medians of {args.rounds} interleaved rounds); {env}")
    print(f"  {'shape':18s} {'decisions':9s} {'kernel':>8s} {'inductor':>9s} {'eager':>8s} {'ind/kern':>9s} "
          f"{'eager/kern':>10s}")
    for row in results:
        print(f"  {'x'.join(map(str, row['shape'])):18s} {row['decisions']:9s} {row['kernel_ms']:8.3f} "
              f"{row['inductor_ms']:9.3f} {row['eager_ms']:8.3f} {row['inductor_over_kernel']:9.3f} "
              f"{row['eager_over_kernel']:10.3f}")
    worst = max(row["inductor_over_kernel"] for row in results)
    keep = worst > 1 + args.tolerance
    print(f"\nInductor's merge is at worst {worst:.3f}x the kernel's time: "
          + ("keep the kernel" if keep else f"within {args.tolerance:.0%}: the kernel can go"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": results, "worst_inductor_over_kernel": worst,
                       "keep_kernel": keep}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
