"""Does a trained SkipNet lose accuracy to stale BatchNorm statistics? Re-estimates every BatchNorm layer's
running mean and variance (a cumulative average, from reset) on the greedy paths of training images, then
evaluates on the test set before and after. A probe, not a training step: the run's checkpoint is not touched.

    python benchmarks/probe_bn.py RUN [--images 10000]

Each batch runs the masked executor in training mode, so a block's statistics come from every image of the
batch, including those that skip it (exact for a static policy; for a routed one, a mix).
"""

from __future__ import annotations

import argparse
import copy

import torch

from skipnet.data import BatchLoader
from skipnet.reporting import load_eval_data, load_run, run_tau
from skipnet.train import evaluate


def reestimated(model, data, tau: float, *, augment: bool, crop_padding: int, seed: int = 1):
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on ``data``'s greedy paths at ``tau``."""
    model = copy.deepcopy(model)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over every batch
    loader = BatchLoader(data, 128, train=True, augment=augment, crop_padding=crop_padding, flip=augment, seed=seed)
    model.train()
    with torch.no_grad():
        for x, _ in loader.epoch(0):
            model(x, "greedy", tau=tau)
    return model.eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished SkipNet run folder or checkpoint")
    p.add_argument("--images", type=int, default=10000, help="training images to re-estimate on")
    args = p.parse_args()
    model, payload = load_run(args.run, torch.device("cpu"))
    if not model.is_gated:
        raise SystemExit(f"{args.run} is not a SkipNet (no gates): nothing to probe")
    tau = run_tau(payload)
    test = BatchLoader(load_eval_data(payload), 500, train=False)
    train = load_eval_data(payload, split=payload["run_config"]["data"].get("train_split", "train"))
    train = train.subset(slice(0, args.images))
    padding = payload["run_config"]["data"].get("crop_padding", 4)
    rows = [("as trained", model)] + [(f"re-estimated on {len(train.labels)} training images"
                                       + (", augmented" if augment else ""),
                                       reestimated(model, train, tau, augment=augment, crop_padding=padding))
                                      for augment in (False, True)]
    print("| BatchNorm statistics | top-1 % | fewer MACs % |\n|---|---|---|")
    for name, m in rows:
        r = evaluate(m, test, tau=tau, executor="masked")
        print(f"| {name} | {r['accuracy']:.2f} | {r['mac_reduction']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
