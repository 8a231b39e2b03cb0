"""Checkpoints: written atomically, read with ``weights_only=True``, checked with clear errors.

A checkpoint is a dict of tensors and plain Python values:
``{"format": 1, "model_config": {...}, "model": state_dict, ...training state...}``.
The model config alone rebuilds the network (:func:`load_model`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..models import SkipNetConfig, SkipResNet
from ..models.rivals import RivalConfig, RivalResNet, build_rival, is_rival_config

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt, or does not match the model."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename.
    A crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is as readable as the other files
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is None:
            raise
        kept = f"the previous checkpoint {path} is intact" if path.exists() else "no checkpoint was kept"
        raise CheckpointWriteError(f"could not write checkpoint {path} ({_first_line(cause)}); {kept}") from None
    return path


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); the previous one is intact."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err`` (torch.save wraps a full disk in a RuntimeError whose context it is)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (``weights_only=True``) and check its structure; raise :class:`CheckpointError`
    saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise CheckpointError(f"no checkpoint in run folder {path} (expected checkpoints/last.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, random bytes, pickled code that weights_only refuses, ...
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated, or not a safe PyTorch file ({type(err).__name__}: {detail})"
        ) from err
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{path} is not a skipnet checkpoint (expected keys 'model' and 'model_config')")
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {payload.get('format')!r}; this version reads {FORMAT}")
    return payload


def build_model_from_checkpoint(payload: dict[str, Any], path: str | Path = "<checkpoint>") -> SkipResNet | RivalResNet:
    """The network of a checkpoint: a SkipNet / plain ResNet, or a rival (ACT, SACT, SDV: its model config
    names a ``method``)."""
    rival = is_rival_config(payload["model_config"])
    try:
        config = (RivalConfig if rival else SkipNetConfig)(**payload["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid model config {payload['model_config']!r}: {err}") from err
    model = build_rival(config) if rival else SkipResNet(config)
    load_state(model, payload["model"], path)
    return model


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path = "<checkpoint>") -> None:
    """``load_state_dict`` with an error that names the mismatching keys and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}"
        )
    model.load_state_dict(state)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> SkipResNet | RivalResNet:
    """Rebuild the network stored in a checkpoint (or a run folder), in eval mode."""
    payload = load_checkpoint(path, map_location)
    return build_model_from_checkpoint(payload, path).eval()
