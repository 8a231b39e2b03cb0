"""Every stage runs under DDP (two CPU processes, gloo), and the HRL stage's gradient is that of the joined batch."""

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import skipnet
import skipnet.models.skipnet as skipnet_module
from skipnet.models.decisions import bernoulli_log_prob, decide
from skipnet.train import load_checkpoint, train
from skipnet.train.stages import make_stage

from .test_train import DATA, _config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


MODES = {
    "sp": ("sp", {}),
    "hrl": ("hrl", {"target_macs": 0.5, "baseline": "ema", "rl_reduction": "mean", "rl_weight": 1.0}),
    "calibrate": ("calibrate", {"target_macs": 0.5, "freeze_bn": True}),
}


def _worker(rank: int, world: int, port: int, run: str, mode: str, init: str | None) -> None:
    _join(rank, world, port)
    stage, extra = MODES[mode]
    if init:
        extra = {**extra, "init": init}
    try:
        train(_config(stage, epochs=1, **extra), run, data=DATA, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sp_then_hrl_and_calibrate_under_ddp(tmp_path):
    sp = str(tmp_path / "sp")
    for mode, init in (("sp", None), ("hrl", sp), ("calibrate", sp)):
        mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / mode), mode, init), nprocs=2, join=True)
        payload = load_checkpoint(tmp_path / mode)
        assert payload["finished"] and payload["step"] == 4  # 64 images, global batch 16 split over 2 ranks
        assert not any(k.startswith("module.") for k in payload["model"])  # the unwrapped module is saved
    assert load_checkpoint(tmp_path / "hrl")["stage"]["controller"]["alpha"] != 0.1
    # the threshold controller's shift is averaged over the ranks and applied to the shared output bias
    moved = payload["model"]["gates.fc.bias"] - load_checkpoint(sp)["model"]["gates.fc.bias"]
    offset = payload["stage"]["threshold"]["offset"]
    assert offset != 0
    torch.testing.assert_close(moved, torch.tensor([offset]))


# --- the policy gradient under DDP equals one process's on the joined batch -----------------------------------
#
# Gates are sampled from per-process generators, so a split batch would not draw the decisions the joined batch
# draws. Here ``sample`` mode takes each image's decisions from a fixed table instead (the log-probabilities are
# still the policy's, of those decisions), so both runs take the same paths and only the reduction over
# processes differs. BatchNorm is frozen (running statistics), as batch statistics differ between the halves.

BATCH = 16
VARIANTS = {
    "sum": {"rl_reduction": "sum", "rl_weight": 0.01},  # the paper's summed term: scaled by the world size
    "mean": {"rl_reduction": "mean", "rl_weight": 1.0},
    "sum-greedy": {"rl_reduction": "sum", "rl_weight": 0.01, "baseline": "greedy", "alpha": 0.5},
    # the backbone's cross-entropy on the greedy path: a second forward pass through DDP before one backward
    "greedy-backbone": {"rl_reduction": "mean", "rl_weight": 1.0, "baseline": "greedy", "alpha": 0.5,
                        "backbone_path": "greedy"},
    # ... and the sampled pass without the backbone's autograd (rl_backbone false): a partly grad-free forward
    "greedy-backbone-detached": {"rl_reduction": "mean", "rl_weight": 1.0, "baseline": "greedy", "alpha": 0.5,
                                 "backbone_path": "greedy", "rl_backbone": False},
    # ... and the all-blocks path teaching the greedy one (distill): a third forward pass before the backward
    "greedy-distill": {"rl_reduction": "mean", "rl_weight": 1.0, "baseline": "greedy", "alpha": 0.5,
                       "backbone_path": "greedy", "rl_backbone": False, "distill": 0.5},
    # ... with the sampled and greedy passes compact: a block no image of a process takes has no gradient there
    "compact": {"rl_reduction": "mean", "rl_weight": 1.0, "baseline": "greedy", "alpha": 0.5,
                "backbone_path": "greedy", "rl_backbone": False, "executor": "compact"},
}
_TABLE: dict = {}  # per process: the decisions of its images (B, N), and the next gate's index


def _table_decide(logits, mode, *, explore=0.0, generator=None, **kw):
    if mode != "sample":
        return decide(logits, mode, explore=explore, generator=generator, **kw)
    assert explore == 0.0
    i = _TABLE["gate"]
    _TABLE["gate"] = i + 1
    g = _TABLE["decisions"][:, i].to(logits)
    return g, bernoulli_log_prob(logits, g)


def _joined_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, 12, 12, generator=gen)
    y = torch.randint(0, 4, (BATCH,), generator=gen)
    decisions = torch.bernoulli(torch.full((BATCH, 2), 0.5), generator=gen)  # cifar_resnet8: 2 gates
    return x, y, decisions


def _reinforce_gradients(variant: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """One ReinforceStage step on this process's slice of the batch; the gradients after backward (under DDP:
    all-reduced)."""
    torch.manual_seed(0)
    model = skipnet.create_model("cifar_resnet8", gate="rnn", in_channels=1, num_classes=4)
    x, y, decisions = _joined_batch()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    cfg = _config("hrl", freeze_bn=True, **VARIANTS[variant]).train
    stage = make_stage(cfg, model, model.mac_table((12, 12)), 10, torch.device("cpu"), world)
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(  # (as the trainer builds it)
        model, find_unused_parameters=cfg.executor == "compact")
    stage.train_mode(net)
    _TABLE.update(decisions=decisions[rows], gate=0)
    loss, _ = stage.loss(net, x[rows], y[rows], None)
    assert _TABLE["gate"] == 2  # every gate sampled from the table
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _gradient_worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    skipnet_module.decide = _table_decide
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grads = {v: _reinforce_gradients(v, rank, world) for v in VARIANTS}
        if rank == 0:
            torch.save(grads, out)
        gc.collect()  # the DDP wrappers (and their reducers' threads) go before the process group does
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_policy_gradient_equals_the_joined_batch_gradient(tmp_path, monkeypatch):
    out = tmp_path / "grads.pt"
    mp.spawn(_gradient_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    split = torch.load(out)
    monkeypatch.setattr(skipnet_module, "decide", _table_decide)
    for variant in VARIANTS:
        joined = _reinforce_gradients(variant, 0, 1)
        gates = [n for n in joined if n.startswith("gates.")]
        assert gates and all(joined[n].abs().sum() > 0 for n in gates)  # the gates get a REINFORCE gradient
        for name in gates + [n for n in joined if n not in gates]:  # the policy's parameters first
            grad = joined[name]
            torch.testing.assert_close(split[variant][name], grad, rtol=1e-4, atol=1e-7,
                                       msg=f"{variant}: {name}")
