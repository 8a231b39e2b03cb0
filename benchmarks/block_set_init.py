"""The plain network of the blocks a static SkipNet policy keeps, holding another run's weights, written as a
checkpoint that ``train.init`` reads. Issue 11's decomposition: train it for the rest of the schedule and
compare with the SkipNet trained from the same weights (its HRL stage) and with the plain network of the same
blocks from scratch -- is the accuracy lost where the blocks start (SP), or in the learned stage?

    python benchmarks/block_set_init.py --weights runs/sp --policy runs/hrl --out runs/sp-blocks.pt
    skipnet train --recipe fashion_mnist_baseline --init runs/sp-blocks.pt --set model.depth=14 \\
        --set model.layout=[1,2,3] --set train.epochs=3 --set train.cosine_epochs=4 --set train.cosine_start=1 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from skipnet import block_set_network
from skipnet.reporting import static_block_set
from skipnet.train import load_model, save_checkpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="the SkipNet run whose weights the blocks take (e.g. SP)")
    p.add_argument("--policy", required=True, help="a finished SkipNet run with a static policy: its final "
                   "evaluation's execution rates (all 0 or 1) say which blocks are kept")
    p.add_argument("--out", required=True, type=Path, help="the checkpoint to write (refused if it exists)")
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: choose another --out")
    rates = json.loads((Path(args.policy) / "final.json").read_text())["exec_rates"]
    model = load_model(args.weights)
    layout = static_block_set(model.stage_of_block, rates)
    if layout is None:
        raise SystemExit(f"{args.policy} routes per image (execution rates {rates}): no static block set")
    net = block_set_network(model, [r >= 0.5 for r in rates])
    save_checkpoint(args.out, {"model": net.state_dict(), "model_config": net.config.to_dict(), "finished": True})
    print(f"{args.out}: blocks {'/'.join(map(str, layout))} (depth {net.config.depth}) of {args.weights}")
    print(f"train it with --init {args.out} --set model.depth={net.config.depth} "
          f"--set model.layout=[{','.join(map(str, layout))}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
