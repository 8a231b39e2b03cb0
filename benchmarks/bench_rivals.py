"""Measured speed of the rivals next to their MAC counts (issue 15; SPEC §8.4: measured latency next to every
FLOP number). Per trained run (or preset, with random weights and noise images) and batch size: the plain
ResNet of the same backbone (through the compact runner, as ``skipnet bench``'s ``dense``: the same block code
and merge kernel as the rivals' compact passes, so a speed-up is the skipping's, not the kernel's), the rival's
``masked`` execution (every unit on the whole batch, weighted) and its ``compact`` one (ACT: a unit runs only on
the images still running; SACT: only at the positions still active, each convolution gathered at them --
usually *slower* than the dense convolution it replaces, so SACT's saving is analytic; SDV: a block only on
the images that keep it), with the ideal (MAC) speed-up beside the measured.

    python benchmarks/bench_rivals.py runs/tradeoff-fashion_mnist/act-0.01 runs/tradeoff-fashion_mnist/sact-0.01 \\
        runs/tradeoff-fashion_mnist/sdv-0.35 --batch-sizes 1 256
    python benchmarks/bench_rivals.py act:cifar_resnet110 sact:cifar_resnet110 --batch-sizes 64   # presets

A timed call runs at least ``--min-images`` images (several batches, each with its own images); after warm-up
the plain, masked and compact calls alternate, round after round (``skipnet bench``'s timing: 5 to 50 rounds,
sized to fill ``--budget`` seconds); rows give the median per batch. Run runs on the run's test images
(halting depends on them); the plain network's weights are random (its speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from skipnet.bench import _time_interleaved
from skipnet.infer import compact_runner
from skipnet.models import SkipResNet
from skipnet.models.rivals import RivalResNet, create_rival


def bench_rival(model: RivalResNet, images: torch.Tensor, batch_sizes: list[int], *, budget_s: float = 2.0,
                min_images: int = 32, device: str | torch.device = "cpu") -> list[dict]:
    """One row per (batch size, executor): median latency per batch, images/s, measured speed-up over the
    plain ResNet, the rival's mean MACs per image on those images and the ideal speed-up (plain MACs over
    them). ``images`` (M, C, H, W): cycled into the batches."""
    device = torch.device(device)
    model = model.to(device).eval()
    plain = SkipResNet(model.config.backbone_config()).to(device).eval()
    plain_runner = compact_runner(plain)  # the plain network through the same block code and merge kernel
    table = model.mac_table((images.shape[2], images.shape[3]))
    rows = []
    with torch.inference_mode():
        for b in batch_sizes:
            draws = max(1, -(-min_images // b))
            index = torch.arange(draws * b) % images.shape[0]
            batches = [images[index[k * b:(k + 1) * b]].to(device) for k in range(draws)]
            macs = torch.cat([model(x, executor="compact").macs.cpu() for x in batches]).double().mean().item()
            fns = {"plain": lambda xs=batches: [plain_runner(x) for x in xs],
                   "masked": lambda xs=batches: [model(x, executor="masked") for x in xs],
                   "compact": lambda xs=batches: [model(x, executor="compact") for x in xs]}
            # interleaved round by round, as skipnet bench: timed one after the other, the same plain network
            # measured 30 % apart on CPU-2c
            times = _time_interleaved(fns, 2, None, budget_s, 1, b * draws, device, "wall")
            seconds = {k: statistics.median(t) / draws for k, t in times.items()}
            for name, s in seconds.items():
                rows.append({"method": model.method if name != "plain" else "plain", "executor": name,
                             "batch_size": b, "latency_ms_p50": 1e3 * s, "images_per_s": b / s,
                             "speedup_vs_plain": seconds["plain"] / s,
                             "macs_per_image": float(table.plain) if name == "plain" else macs,
                             "ideal_speedup": 1.0 if name == "plain" else table.plain / macs, "draws": draws})
    return rows


def _load(spec: str, device: torch.device, input_size: int) -> tuple[RivalResNet, torch.Tensor, str]:
    """A run folder (its model and test images) or ``method:preset`` (random weights, seeded noise)."""
    if Path(spec).exists():
        from skipnet.data import BatchLoader
        from skipnet.reporting import load_eval_data, load_run

        model, payload = load_run(spec, device)
        if not isinstance(model, RivalResNet):
            raise ValueError(f"{spec} is not an ACT, SACT or SDV run (time SkipNet runs with `skipnet bench`)")
        data = load_eval_data(payload)
        images = torch.cat([x for x, _ in BatchLoader(data.subset(slice(0, 512)), 512, train=False)])
        return model, images, spec
    method, _, preset = spec.partition(":")
    model = create_rival(method, preset, **({"drop_rate": 0.3} if method == "sdv" else {}))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(512, model.config.in_channels, input_size, input_size, generator=g)
    return model, images, spec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="rival run folders, or method:preset (e.g. act:cifar_resnet110)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per (model, batch size)")
    p.add_argument("--min-images", type=int, default=32, help="images per timed call (several batches if needed)")
    p.add_argument("--input-size", type=int, default=32, help="presets only: image size of the noise")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object (environment and rows)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for spec in args.models:
        model, images, name = _load(spec, device, args.input_size)
        rows += [{"model": name, **r} for r in bench_rival(model, images, args.batch_sizes, budget_s=args.budget,
                                                           min_images=args.min_images, device=device)]
    from skipnet.bench import bench_environment

    env = bench_environment(device)
    if args.json:
        print(json.dumps({"environment": env, "rows": rows}))
        return 0
    print(json.dumps(env))
    print(f"{'model':40s} {'executor':8s} {'batch':>5s} {'p50 ms':>9s} {'img/s':>9s} {'MMACs':>8s} "
          f"{'speed-up':>8s} {'ideal':>6s}")
    for r in rows:
        print(f"{r['model'][-40:]:40s} {r['executor']:8s} {r['batch_size']:5d} {r['latency_ms_p50']:9.2f} "
              f"{r['images_per_s']:9.0f} {r['macs_per_image'] / 1e6:8.2f} {r['speedup_vs_plain']:8.2f} "
              f"{r['ideal_speedup']:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
