"""Publish a finished run's weights into the package (``skipnet/weights/``), for ``skipnet.pretrained(name)``.

    python benchmarks/publish_weights.py /work/runs/c10cpu-sk38-hrl skipnet38_cifar10 \
        --title "SkipNet-38 (RNN gates), SP->HRL" --command "skipnet train --recipe cifar10_cpu_hrl ..." \
        --data-root ../shared/datasets/cifar10-jpeg

Evaluates the run on its whole test set and on a fixed slice of it (every ``--slice-step``-th image, which the
test suite re-checks when the data is present), at the run's own tau, and records those numbers with the
command, machine and date beside the file's SHA-256 and a fingerprint (logits on seeded noise) in
``skipnet/weights/index.json``. Commit both files.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from skipnet.data import BatchLoader
from skipnet.published import publish
from skipnet.reporting import load_eval_data, load_run, run_tau
from skipnet.train import evaluate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished run folder")
    p.add_argument("name", help="the name users load it by, e.g. skipnet38_cifar10")
    p.add_argument("--title", required=True, help="what it is, in words")
    p.add_argument("--command", required=True, help="the command(s) that trained it")
    p.add_argument("--data-root", default=None, help="its test data's folder (default: the run's)")
    p.add_argument("--slice-step", type=int, default=10, help="the slice: every k-th test image")
    p.add_argument("--root", default=None, help="weights folder (default: the package's skipnet/weights)")
    args = p.parse_args()

    model, payload = load_run(args.run, torch.device("cpu"))
    if not payload.get("finished"):
        raise SystemExit(f"{args.run} did not finish its schedule")
    test = load_eval_data(payload, None, args.data_root, None)
    tau = run_tau(payload)
    full = evaluate(model, BatchLoader(test, 500, train=False), tau=tau)
    part = test.subset(torch.arange(0, len(test), args.slice_step))
    sliced = evaluate(model, BatchLoader(part, 500, train=False), tau=tau)
    record = {
        "title": args.title, "data": f"{test.name} test ({len(test)} images)", "tau": tau,
        "accuracy": round(full["accuracy"], 2), "macs_per_image": full["macs_per_image"],
        "dense_macs_per_image": full["dense_macs_per_image"], "mac_reduction": round(full["mac_reduction"], 2),
        "block_fraction": round(full["block_fraction"], 2),
        "slice": {"start": 0, "step": args.slice_step, "images": sliced["images"],
                  "accuracy": sliced["accuracy"], "mac_reduction": sliced["mac_reduction"]},
        "command": args.command, "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    path = publish(args.run, args.name, record, root=Path(args.root) if args.root else None)
    print(f"{args.name}: {path} ({path.stat().st_size / 1e6:.1f} MB), top-1 {record['accuracy']}% at "
          f"{record['mac_reduction']}% fewer MACs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
