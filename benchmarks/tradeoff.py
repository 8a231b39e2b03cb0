"""The evidence for (or against) SkipNet at one training budget: every alternative a user has, trained and
measured by the same recipe for the same total epochs, on one plot and one table.

    python benchmarks/tradeoff.py --data fashion_mnist --no-rivals  # ~2 hours on 2 CPU cores (six HRL runs)
    python benchmarks/tradeoff.py --data fashion_mnist            # and 11 rival runs (9-23 min each at 1 thread)
    python benchmarks/tradeoff.py --data cifar10 --data-root ../shared/datasets/cifar10-jpeg   # ~15 hours
    python benchmarks/tradeoff.py --data fashion_mnist --sp-epochs 2 --hrl-epochs 6   # another budget

Another budget (``--sp-epochs``/``--hrl-epochs``) trains every series for SP + stage 2 epochs in all, into
its own folders (``runs/tradeoff-<data>-sp2-hrl6``, ``docs/tradeoff/<data>-sp2-hrl6``).

Trains (or, when a run folder is already complete, reuses; an interrupted one is resumed):
  * the plain ResNets of several depths (the static line), for the SkipNet's total epochs (SP + HRL);
  * the SkipNet: SP, then learned HRL (REINFORCE, ours) at several expected-MAC targets, one target with
    three seeds from the same SP checkpoint (each HRL run about 14 minutes on 2 cores for Fashion-MNIST);
  * the HRL stage with the paper's objective, and the calibrate stage (ours: global threshold + fine-tuning),
    from the same SP checkpoint;
  * the rivals (SPEC §10), on the SkipNet's backbone, from scratch by the plain ResNets' recipe for the same
    epochs: ACT and SACT (Figurnov et al. 2017) at several ponder costs tau, and SDV (random skipping, trained
    and evaluated at its rate) at several rates -- skip them with --no-rivals;
  * the static alternative to every HRL run: the plain network (``model.layout``) of its most-run blocks, as
    many as bring its MACs nearest the run's (for a static policy, the blocks it keeps), from scratch, same
    epochs -- does routing per image beat choosing the blocks once?;
and evaluates the tau sweeps of the SP and HRL networks and random skipping at each HRL run's per-block rates
on the SP weights (the paper's stochastic-depth variant). Writes ``docs/tradeoff/<data>/`` (sweep.json with
the epochs and date of every row, sweep.md, tradeoff.png) and prints the table; the demo reads its plain
ResNet reference from there.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from skipnet.models import model_config
from skipnet.reporting import carry_recorded, make_sweep, matched_block_set, plot_table, sweep_markdown, zoom_band
from skipnet.train import load_checkpoint, load_config, load_model, train
from skipnet.train.config import build_config
from skipnet.train.runs import config_differences
from skipnet.train.trainer import load_data

PLANS = {
    "fashion_mnist": {
        "baseline": "fashion_mnist_baseline", "sp": "fashion_mnist_sp", "hrl": "fashion_mnist_hrl",
        "hrl_paper": "fashion_mnist_hrl_paper", "calibrate": "fashion_mnist_calibrate",
        "plain": ["cifar_resnet8", "cifar_resnet14", "cifar_resnet20"],
        # 0.45 reaches into the span between ResNet-8 and -14, where the plain line has a slope to trade along
        "targets": [0.45, 0.55, 0.65, 0.75], "calibrate_targets": [0.55, 0.65], "seeds_at": 0.65, "seeds": [1, 2],
        "taus": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        # method: (recipe, the train key swept, its values); each trains for the SkipNet's total epochs.
        # Halting units start at h ~ 0.05 (bias -3, the authors') and their bias moves ~ lr * tau * h(1 - h) per
        # step: in 4 epochs' 1.9k steps tau 0.01 barely halts (0.3 epochs at tau 0.05 took ResNet-20's ponder
        # cost from 11.7 to 11.25 of 12), so this sweep reaches higher than the authors' 0.01 for 100k steps.
        "rivals": {"act": ("fashion_mnist_act", "ponder_cost", [0.01, 0.02, 0.05, 0.1]),
                   "sact": ("fashion_mnist_sact", "ponder_cost", [0.01, 0.02, 0.05, 0.1]),
                   "sdv": ("fashion_mnist_sdv", "drop_rate", [0.2, 0.35, 0.5])},
    },
    # CIFAR-10 (the JPEG copy: --data-root ../shared/datasets/cifar10-jpeg) at the 2-core CPU's scale, 40 epochs
    # in all (SP 30 + HRL 10); about 15 hours on 2 cores without the rivals (an HRL epoch costs six to eight plain
    # ones), so run it in the background (nohup) and rerun the same command after an interruption: finished
    # runs are reused, an interrupted one resumes. On one GPU the runs take minutes (docs/RESULTS.md). The
    # paper's HRL objective runs its own schedule (10k iterations from the SP network), not the 10-epoch tail.
    "cifar10": {
        "baseline": "cifar10_cpu_baseline", "sp": "cifar10_cpu_sp", "hrl": "cifar10_cpu_hrl",
        "hrl_paper": "cifar10_hrl_paper", "calibrate": "cifar10_cpu_calibrate",
        "hrl_paper_overrides": ["model.name=cifar_resnet38", "data.name=imagefolder"],
        "plain": ["cifar_resnet14", "cifar_resnet20", "cifar_resnet26", "cifar_resnet32", "cifar_resnet38"],
        "targets": [0.5, 0.65], "calibrate_targets": [0.5, 0.65], "seeds_at": 0.65, "seeds": [],
        "taus": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        # the authors' CIFAR-10 ACT/SACT use tau 0.01; each of these 9 runs is about a plain ResNet-38's time or more
        "rivals": {"act": ("cifar10_cpu_act", "ponder_cost", [0.005, 0.01, 0.02]),
                   "sact": ("cifar10_cpu_sact", "ponder_cost", [0.005, 0.01, 0.02]),
                   "sdv": ("cifar10_cpu_sdv", "drop_rate", [0.2, 0.35, 0.5])},
    },
}


def finished(run: Path) -> dict | None:
    """The run's last checkpoint when the run is complete, else None."""
    ckpt = run / "checkpoints" / "last.pt"
    if not ((run / "final.json").is_file() and ckpt.is_file()):
        return None
    payload = load_checkpoint(ckpt)
    return payload if payload.get("finished") else None


def epochs_in_all(run: str | Path) -> float:
    """Epochs of training behind a run: its own, plus those of the run it started from (``train.init``)."""
    train_cfg = load_checkpoint(run)["run_config"]["train"]
    init = train_cfg.get("init")
    return train_cfg["epochs"] + (epochs_in_all(init) if init else 0.0)


def learned_set_plans(runs: list[Path | None], epochs: float, plain_depths: set[int]) -> list[tuple[str, list[str]]]:
    """(run name, overrides of the plain recipe) of the static alternative to each finished SkipNet run: the
    plain network of its most-run blocks at its MACs (``matched_block_set``: every stage's first block and
    the blocks its greedy policy on the test images runs most often, as many as bring the MACs nearest the
    run's; for a static policy, the blocks it keeps), from scratch for ``epochs``. One run per distinct set,
    named by it (``plain-set-1-1-2``); a set that is a plain ResNet of the line (``plain_depths``) is not
    trained twice. A run not on this machine (``None``: ``--report-only`` carrying its row) plans none."""
    plans: dict[tuple[int, ...], list[str]] = {}
    for run in runs:
        if run is None:
            continue
        final = json.loads((run / "final.json").read_text())
        model = load_model(run)
        # in fractions of the plain network, which are the same at any input size the network's stride divides
        # (28 or 32 pixels), up to the classifier's and gates' ~10k MACs, which do not scale with the image
        table = model.mac_table((32, 32))
        fraction = final["macs_per_image"] / final["dense_macs_per_image"]
        layout, macs = matched_block_set(model.stage_of_block, final["exec_rates"], table.block_full, table.plain,
                                         fraction * table.plain)
        depth = 2 + 2 * sum(layout)
        on_line = len(set(layout)) == 1 and depth in plain_depths  # (n, n, n): the plain ResNet-(6n + 2)
        print(f"[block set] {run.name} ({fraction:.1%} of the plain network's MACs): blocks "
              f"{'/'.join(map(str, layout))} ({macs / table.plain:.1%})"
              + (" -- a plain ResNet of the line" if on_line else ""), flush=True)
        if not on_line:
            plans[layout] = [f"model.depth={depth}", f"model.layout=[{','.join(map(str, layout))}]",
                             f"train.epochs={epochs}"]
    return [("plain-set-" + "-".join(map(str, layout)), overrides) for layout, overrides in plans.items()]


def run_stage(recipe: str, run: Path, overrides: list[str], data, log: list[dict],
              missing: list[str] | None = None) -> Path | None:
    """Train ``recipe`` into ``run`` unless it is complete there; resume it when it was interrupted. With a
    ``missing`` list (``--report-only``) nothing is trained: an unfinished run is added to it and ``None``
    returned."""
    done = finished(run)
    if done:  # reused only when it was trained as asked now (its SP run may live elsewhere: init aside)
        saved = build_config(done["run_config"])
        differ = [d for d in config_differences(saved, load_config(recipe, overrides))
                  if not d.startswith("train.init:")]
        if differ:
            raise SystemExit(f"{run} is finished but was trained otherwise ({'; '.join(differ[:6])}): another "
                             "budget or recipe -- pass another --runs folder")
        print(f"[reuse] {run}", flush=True)
        return run
    if missing is not None:
        print(f"[missing] {run}", flush=True)
        missing.append(run.name)
        return None
    resume = (run / "checkpoints" / "last.pt").is_file()
    config = load_config(recipe, overrides)  # resume: the checkpoint's config, which must be this one
    print(f"[{'resume' if resume else 'train'}] {recipe} {' '.join(overrides)} -> {run}", flush=True)
    start = time.perf_counter()
    result = train(config, run, resume=resume, overwrite=not resume, progress=False, data=data)
    log.append({"run": str(run), "recipe": recipe, "overrides": overrides, "seconds": time.perf_counter() - start,
                "accuracy": result["accuracy"], "mac_reduction": result["mac_reduction"]})
    print(f"  {result['accuracy']:.2f}% at {result['mac_reduction']:.1f}% fewer MACs "
          f"({time.perf_counter() - start:.0f}s)", flush=True)
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion_mnist", choices=sorted(PLANS), help="which plan to run")
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: the standard place; cifar10: the JPEG copy's folder)")
    p.add_argument("--runs", default=None, help="folder for the runs (default: runs/tradeoff-<data>)")
    p.add_argument("--out", default=None, help="results folder (default: docs/tradeoff/<data>)")
    p.add_argument("--no-rivals", action="store_true", help="leave out ACT, SACT and SDV (trained or not)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the table and plot of the runs finished so far, the others listed as missing")
    p.add_argument("--sp-epochs", type=float, default=None,
                   help="another budget: SP's epochs (default: the SP recipe's); every series then trains for "
                        "SP + stage 2 epochs in all, SP and stage 2 sharing one cosine over them")
    p.add_argument("--hrl-epochs", type=float, default=None,
                   help="another budget: the learned stage's (and calibrate's) epochs (default: the HRL recipe's)")
    args = p.parse_args()
    plan = PLANS[args.data]
    root = [f"data.root={args.data_root}"] if args.data_root else []
    sp_epochs = load_config(plan["sp"], root).train.epochs if args.sp_epochs is None else args.sp_epochs
    hrl_epochs = load_config(plan["hrl"], root).train.epochs if args.hrl_epochs is None else args.hrl_epochs
    if sp_epochs <= 0 or hrl_epochs <= 0:
        raise SystemExit(f"--sp-epochs and --hrl-epochs must be positive; got {sp_epochs:g} and {hrl_epochs:g}")
    total = sp_epochs + hrl_epochs
    # another budget than the recipes' gets its own run and results folders: the two never mix
    budget = "" if (args.sp_epochs, args.hrl_epochs) == (None, None) else f"-sp{sp_epochs:g}-hrl{hrl_epochs:g}"
    runs = Path(args.runs or f"runs/tradeoff-{args.data}{budget}")
    out = Path(args.out or f"docs/tradeoff/{args.data}{budget}")
    start = time.perf_counter()
    # SP runs the first sp_epochs of the cosine, the stage from it (HRL, calibrate: their recipes agree) the rest
    sp_budget = [f"train.epochs={sp_epochs}", f"train.cosine_epochs={total}"]
    tail = [f"train.epochs={hrl_epochs}", f"train.cosine_epochs={total}", f"train.cosine_start={sp_epochs}"]
    sp_cfg = load_config(plan["sp"], root + sp_budget)
    hrl_cfg = load_config(plan["hrl"], root + tail)
    data = None if args.report_only else load_data(sp_cfg)
    log: list[dict] = []
    missing: list[str] | None = [] if args.report_only else None

    def stage(recipe: str, name: str, overrides: list[str]) -> Path | None:
        return run_stage(recipe, runs / name, overrides, data, log, missing)

    sp = stage(plan["sp"], "sp", root + sp_budget)  # None only under --report-only: then the stages from it too
    from_sp = [f"train.init={runs / 'sp'}"]
    init = from_sp + tail
    hrl = [stage(plan["hrl"], f"hrl-t{t:g}", root + init + [f"train.target_macs={t}"]) for t in plan["targets"]]
    seeds = [stage(plan["hrl"], f"hrl-t{plan['seeds_at']:g}-seed{s}",
                   root + init + [f"train.target_macs={plan['seeds_at']}", f"train.seed={s}"]) for s in plan["seeds"]]
    paper = stage(plan["hrl_paper"], "hrl-paper",  # the paper's objective runs its own schedule from SP
                  root + from_sp + plan.get("hrl_paper_overrides", []))
    calibrate = [stage(plan["calibrate"], f"calibrate-t{t:g}", root + init + [f"train.target_macs={t}"])
                 for t in plan["calibrate_targets"]]
    plain = [stage(plan["baseline"], f"plain-{name.removeprefix('cifar_')}",
                   root + [f"model.name={name}", f"train.epochs={total}"]) for name in plan["plain"]]
    depths = {model_config(name).depth for name in plan["plain"]}
    learned_sets = [stage(plan["baseline"], name, root + overrides)
                    for name, overrides in learned_set_plans(hrl + seeds, total, depths)]
    rivals = []
    for method, (recipe, key, values) in ({} if args.no_rivals else plan["rivals"]).items():
        # from scratch, one cosine over the SkipNet's total epochs: the same budget
        rivals += [stage(recipe, f"{method}-{v:g}", root + [f"train.{key}={v}", f"train.epochs={total}"])
                   for v in values]

    hrl_done = [r for r in hrl if r is not None]
    runs_done = [str(r) for r in hrl + seeds + [paper] + calibrate + learned_sets + rivals if r is not None]
    plain_done = [str(r) for r in plain if r is not None]
    title = f"{args.data}: {total:g} epochs in all, every series trained by us"
    swept = ([sp] if sp else []) + ([hrl_done[len(hrl_done) // 2]] if hrl_done else [])  # SP and the middle HRL
    table = make_sweep(runs_done, plain=plain_done, taus=plan["taus"], sweep=[str(r) for r in swept],
                       random_from=str(sp) if sp else None,
                       out=runs / "sweep", overwrite=True, data_root=args.data_root,
                       title=title) if runs_done or plain_done else []
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"
    for row in table:  # each row's training epochs in all: a stage from the SP run adds the SP run's
        row.update(epochs=epochs_in_all(row["run"]), date=date)
    # --report-only: the rows of the last report for runs not finished here (their folders on another machine)
    recorded = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else []
    table = carry_recorded(table, recorded, missing or [])
    carried = sorted({Path(r["run"]).name for r in table if r.get("carried")})
    if missing:
        missing = [name for name in missing if name not in carried]
    if not table:
        raise SystemExit(f"nothing to report: no finished run in {runs} and no earlier report in {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(table, indent=2))
    plot_table(table, out / "tradeoff.png", title=title)
    band = zoom_band(table)  # the same plot, on the accuracy band around the plain line
    if band:
        plot_table(table, out / "tradeoff-zoom.png", title=f"{title} (zoom)", ylim=band)
    command = "python benchmarks/tradeoff.py " + " ".join(sys.argv[1:])
    (out / "sweep.md").write_text(
        f"Command: `{command}` -- {date}, {machine}, {time.perf_counter() - start:.0f} s in all.\n"
        f"Every series trained by the same recipe family for {total:g} epochs in all (SkipNet: SP "
        f"{sp_cfg.train.epochs:g} + stage 2 {hrl_cfg.train.epochs:g}), except the SP network itself (its tau "
        f"sweep, and random skipping on its weights): {sp_cfg.train.epochs:g}, and the paper's HRL objective, "
        "which runs its own schedule from the SP network "
        f"({f'{epochs_in_all(paper):g} epochs in all' if paper else 'not run yet'}). HRL targets "
        "are on the compute greedy inference spends (the policy's expected MACs during training, then tau fitted "
        "on training images); the MACs in the table are those greedy inference spends on the test set."
        + ("" if args.no_rivals else
           " ACT, SACT (points: ponder cost tau) and SDV (points: skipping rate d) are trained from scratch on the "
           "SkipNet's backbone by the plain ResNets' recipe; their MACs include the halting units, SACT's are counted "
           "per position (its measured time is not in this table).")
        + (f" Carried from the earlier report (each row says when it was measured; the run folders are not "
           f"on this machine): {', '.join(carried)}." if carried else "")
        + (f" **Partial** (`--report-only`): not finished yet, so not in the table: {', '.join(missing)}."
           if missing else "")
        + "\n\n" + sweep_markdown(table) + "\n\n![trade-off](tradeoff.png)\n"
        + (f"\n![trade-off, {band[0]:.1f}-{band[1]:.1f} % (points below are off this chart)](tradeoff-zoom.png)\n"
           if band else ""))
    # the training log: this invocation's runs, and those recorded when the reused ones were trained
    trained = {entry["run"] for entry in log}
    earlier = json.loads((out / "runs.json").read_text()) if (out / "runs.json").is_file() else []
    (out / "runs.json").write_text(json.dumps([e for e in earlier if e["run"] not in trained] + log, indent=2))
    print((out / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
