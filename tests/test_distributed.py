"""Every stage runs under DDP (two CPU processes, gloo), HRL included."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from skipnet.train import load_checkpoint, train

from .test_train import DATA, _config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODES = {
    "sp": ("sp", {}),
    "hrl": ("hrl", {"target_macs": 0.5, "baseline": "ema", "rl_reduction": "mean", "rl_weight": 1.0}),
    "hrl_st": ("hrl", {"target_macs": 0.5, "gate_gradient": "straight_through", "freeze_bn": True,
                       "gate_optimizer": "adam", "gate_lr": 0.01}),
}


def _worker(rank: int, world: int, port: int, run: str, mode: str, init: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    stage, extra = MODES[mode]
    if init:
        extra = {**extra, "init": init}
    try:
        train(_config(stage, epochs=1, **extra), run, data=DATA, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sp_then_hrl_under_ddp(tmp_path):
    sp = str(tmp_path / "sp")
    for mode, init in (("sp", None), ("hrl", sp), ("hrl_st", sp)):
        mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / mode), mode, init), nprocs=2, join=True)
        payload = load_checkpoint(tmp_path / mode)
        assert payload["finished"] and payload["step"] == 4  # 64 images, global batch 16 split over 2 ranks
        assert not any(k.startswith("module.") for k in payload["model"])  # the unwrapped module is saved
    assert load_checkpoint(tmp_path / "hrl")["controller"]["alpha"] != 0.1
    # the threshold controller's shift is averaged over the ranks and applied to the shared output bias
    moved = payload["model"]["gates.fc.bias"] - load_checkpoint(sp)["model"]["gates.fc.bias"]
    assert payload["threshold"]["offset"] != 0
    torch.testing.assert_close(moved, torch.tensor([payload["threshold"]["offset"]]))
