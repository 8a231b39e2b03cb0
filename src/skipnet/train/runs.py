"""A run folder: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/last.pt``, ``final.json``, ``.lock``.

One process owns a folder at a time (:class:`RunLock`, an OS lock held for the run's life). A folder is never
overwritten unless asked; checkpoints are written atomically (see :mod:`.checkpoint`) and carry the run's
identity and config, which resume uses (:func:`resume_point`); on resume the metric lines written after the
checkpoint are dropped, so the log matches the state it continues from.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import RunConfig, build_config, read_recipe, write_config

LOCK = ".lock"


class RunExistsError(FileExistsError):
    """The run folder exists already; pass overwrite or resume."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


class RunBusyError(RuntimeError):
    """Another process holds the run folder."""


class RunLock:
    """An exclusive OS lock (``flock``) on ``<run>/.lock``, which holds the owner's PID; released when the
    process ends, however it ends. ``created`` says whether this lock made the folder."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise RunBusyError(f"run folder {run_dir} is in use by another process (PID {holder}); wait for "
                                   "it to end or stop it, or choose another --run-dir") from None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def prepare_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Check that ``run_dir`` (locked by the caller) can take a fresh run: an empty folder (``overwrite``
    empties it). A resumed run is checked by :func:`resume_point`."""
    contents = [p for p in run_dir.iterdir() if p.name != LOCK]
    if contents:
        if not overwrite:
            raise RunExistsError(
                f"run folder {run_dir} exists and is not empty; choose another --run-dir, --resume it, "
                "or pass --overwrite to replace it"
            )
        for p in contents:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)


def discard_failed_start(run_dir: Path, lock: RunLock) -> None:
    """A fresh start that failed before its first checkpoint leaves nothing behind that would block its
    retry: the files it wrote go, and the folder too when the start made it."""
    if (run_dir / "checkpoints" / "last.pt").exists():
        return
    for p in run_dir.iterdir():
        if p.name != LOCK:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    lock.release()
    (run_dir / LOCK).unlink(missing_ok=True)
    if lock.created:
        run_dir.rmdir()


def resume_point(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """What a run resumes from: its checkpoint (read once, on the CPU) and the config stored in it. The
    folder's ``config.yaml`` must agree with it (a file cut short or edited would otherwise change the run
    silently)."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        raise CheckpointError(f"nothing to resume in {run_dir}: no checkpoints/last.pt")
    payload = load_checkpoint(last)
    if "run_config" not in payload:
        raise CheckpointError(f"{last} holds no run config (written by an older skipnet); start the run again")
    config = build_config(payload["run_config"])
    on_disk = run_dir / "config.yaml"
    if on_disk.is_file():
        differ = config_differences(build_config(read_recipe(on_disk)), config)
        if differ:
            raise CheckpointError(f"{on_disk} disagrees with its checkpoint {last} ({'; '.join(differ[:6])}); "
                                  "the checkpoint's config is the run's -- restore config.yaml or delete it")
    return config, payload


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """``section.key: a vs b`` for every value that differs."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{section}.{key}: {da[section][key]!r} vs {db[section][key]!r}"
            for section in da for key in da[section] if da[section][key] != db[section][key]]


class RunFolder:
    """What one process (rank 0) writes into a run folder. Other ranks get ``RunFolder(None, ...)``, which
    writes nothing."""

    def __init__(self, path: Path | None, config: RunConfig, *, resumed_at: int | None, run_id: str | None = None):
        self.path, self.config = path, config
        self.run_id = run_id or uuid.uuid4().hex
        self.checkpointed = resumed_at is not None
        self.tau = config.train.tau  # the operating threshold; fit_tau replaces it when the stage ends
        self.image_size: list[int] | None = None  # the training images' (H, W), for tools that make inputs
        self._metrics = None
        if path is not None:
            if resumed_at is None or not (path / "config.yaml").exists():
                write_config(config, path / "config.yaml")
            self._metrics = _metrics_file(path / "metrics.jsonl", resumed_at)

    @property
    def last(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    def kept(self) -> str:
        """What a failed run leaves, in words."""
        if self.path is None:
            return "Rank 0 keeps the checkpoints"
        if self.checkpointed:
            return f"The last good checkpoint is {self.last}"
        return "No checkpoint had been written; the run folder was removed"

    def emit(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def checkpoint(self, model: torch.nn.Module, optimizers: list, stage, step: int, total: int) -> None:
        """Save the run's state; refuses to save non-finite parameters (the last good checkpoint stays)."""
        if self.path is None:
            return
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteLossError(f"parameters became non-finite at step {step}; stopped without saving them. "
                                     f"{self.kept()} -- lower the learning rate")
        save_checkpoint(self.last, {
            "model_config": model.config.to_dict(), "run_config": self.config.to_dict(),
            "model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers], "step": step,
            "finished": step >= total, "stage": stage.state_dict(), "rng_cpu": torch.get_rng_state(),
            "run_id": self.run_id, "total_steps": total, "tau": self.tau, "image_size": self.image_size,
        })
        self.checkpointed = True

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
