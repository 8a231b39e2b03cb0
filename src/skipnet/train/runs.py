"""A run folder: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/last.pt``, ``final.json``.

Never overwritten unless asked; checkpoints are written atomically (see :mod:`.checkpoint`); on resume the
metric lines written after the checkpoint are dropped, so the log matches the state it continues from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, save_checkpoint
from .config import RunConfig, write_config


class RunExistsError(FileExistsError):
    """The run folder exists already; pass overwrite or resume."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise CheckpointError(f"nothing to resume in {run_dir}: no checkpoints/last.pt")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunExistsError(
                f"run folder {run_dir} exists and is not empty; choose another --run-dir, --resume it, "
                "or pass --overwrite to replace it"
            )
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)


class RunFolder:
    """What one process (rank 0) writes into a run folder. Other ranks get ``RunFolder(None, ...)``, which
    writes nothing."""

    def __init__(self, path: Path | None, config: RunConfig, *, resumed_at: int | None):
        self.path, self.config = path, config
        self._metrics = None
        if path is not None:
            write_config(config, path / "config.yaml")
            self._metrics = _metrics_file(path / "metrics.jsonl", resumed_at)

    @property
    def last(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    def emit(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def checkpoint(self, model: torch.nn.Module, optimizers: list, stage, step: int, finished: bool) -> None:
        """Save the run's state; refuses to save non-finite parameters (the last good checkpoint stays)."""
        if self.path is None:
            return
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteLossError(
                f"parameters became non-finite at step {step}; stopped without saving them. The last good "
                f"checkpoint is {self.last} -- lower the learning rate")
        save_checkpoint(self.last, {
            "model_config": model.config.to_dict(), "run_config": self.config.to_dict(),
            "model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers], "step": step,
            "finished": finished, "stage": stage.state_dict(), "rng_cpu": torch.get_rng_state(),
        })

    def finish(self, result: dict[str, Any]) -> None:
        if self.path is None:
            return
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": result["step"], "epoch": result["epochs"], **prefixed(result, "test_")})
                    + "\n")
        (self.path / "final.json").write_text(json.dumps(result, indent=2))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def prefixed(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k: v for k, v in d.items() if not isinstance(v, (list, dict))}


def _metrics_file(path: Path, keep_until_step: int | None):
    if keep_until_step is not None and path.exists():  # resume: drop lines written after the checkpoint
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= keep_until_step]
        path.write_text("".join(ln + "\n" for ln in kept))
    return path.open("a")
