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


def _worker(rank: int, world: int, port: int, run: str, stage: str, init: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    extra = {"init": init, "target_macs": 0.5, "baseline": "ema", "rl_reduction": "mean", "rl_weight": 1.0} \
        if stage == "hrl" else {}
    try:
        train(_config(stage, epochs=1, **extra), run, data=DATA, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sp_then_hrl_under_ddp(tmp_path):
    for stage, init in (("sp", None), ("hrl", str(tmp_path / "sp"))):
        mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / stage), stage, init), nprocs=2, join=True)
        payload = load_checkpoint(tmp_path / stage)
        assert payload["finished"] and payload["step"] == 4  # 64 images, global batch 16 split over 2 ranks
        assert not any(k.startswith("module.") for k in payload["model"])  # the unwrapped module is saved
    assert payload["controller"]["alpha"] != 0.1
