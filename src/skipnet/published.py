"""Published weights: trained networks shipped inside the package, loaded by name, checked by SHA-256.

``skipnet.pretrained("skipnet38_cifar10")`` returns the network in eval mode; ``list_pretrained()`` names
them; ``pretrained_info(name)`` says how each was trained and what it measured (accuracy, MACs, command,
machine, date). Nothing is downloaded: the files live in ``skipnet/weights/`` next to ``index.json``, which
holds their hashes. Each entry also records a *fingerprint* -- the network's logits on a fixed batch of seeded
noise -- so a test can check, without any dataset, that the weights compute what they computed when published.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .models import SkipResNet

INDEX = "index.json"
FINGERPRINT_SEED = 0
FINGERPRINT_IMAGES = 4


def weights_dir() -> Path:
    return Path(str(resources.files("skipnet").joinpath("weights")))


def _index(root: Path | None = None) -> dict[str, dict[str, Any]]:
    path = (root or weights_dir()) / INDEX
    return json.loads(path.read_text()) if path.is_file() else {}


def list_pretrained(root: Path | None = None) -> list[str]:
    """The names :func:`pretrained` accepts."""
    return sorted(_index(root))


def pretrained_info(name: str, root: Path | None = None) -> dict[str, Any]:
    """What is recorded of a published network: file, sha256, data, accuracy, MACs, command, machine, date."""
    index = _index(root)
    if name not in index:
        known = ", ".join(sorted(index)) or "none"
        raise ValueError(f"no published weights named {name!r}; known: {known}")
    return dict(index[name])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def published_path(name: str, root: Path | None = None) -> Path:
    """The file of the published network ``name``, after checking its SHA-256 against the index."""
    from .train.checkpoint import CheckpointError

    info = pretrained_info(name, root)
    path = (root or weights_dir()) / info["file"]
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} of {name!r} is missing from this installation")
    found = sha256(path)
    if found != info["sha256"]:
        raise CheckpointError(f"{path} has SHA-256 {found}, but {name!r} was published with {info['sha256']}: "
                              "the file is damaged or not the published one (a Git LFS pointer?)")
    return path


def pretrained(name: str, map_location: str | torch.device = "cpu", root: Path | None = None) -> SkipResNet:
    """The published network ``name`` in eval mode, after checking its file's SHA-256 against the index.
    Evaluate a SkipNet at ``pretrained_info(name)["tau"]``, the threshold it was published at."""
    from .train.checkpoint import build_model_from_checkpoint, load_checkpoint

    path = published_path(name, root)
    return build_model_from_checkpoint(load_checkpoint(path, map_location), path).eval()


def stored_config(name: str, root: Path | None = None) -> dict[str, Any]:
    """The model config of a published network (to build it with fresh weights)."""
    return dict(pretrained_info(name, root)["model_config"])


@torch.inference_mode()
def fingerprint(model: SkipResNet, tau: float = 0.5, image_size: tuple[int, int] = (32, 32)) -> dict[str, list]:
    """The model's greedy logits at ``tau`` (rounded to 1e-4) and gate decisions on a fixed batch of seeded
    noise."""
    model.eval()
    g = torch.Generator().manual_seed(FINGERPRINT_SEED)
    x = torch.randn(FINGERPRINT_IMAGES, model.config.in_channels, *image_size, generator=g)
    device = next(model.parameters()).device
    out = model(x.to(device), "greedy", tau=tau) if model.is_gated else model(x.to(device))
    logits = [[round(v, 4) for v in row] for row in out.logits.float().cpu().tolist()]
    decisions = out.decisions.int().cpu().tolist() if out.decisions is not None else []
    return {"logits": logits, "decisions": decisions}


def publish(run: str | Path, name: str, record: dict[str, Any], root: Path | None = None) -> Path:
    """Write a run's final weights (model config and state only) as ``<name>.pt`` into the weights folder
    and add ``record`` (accuracy, MACs, command, machine, date, ...) with the hash and fingerprint to the
    index. For maintainers; refuses a run that did not finish its schedule."""
    from .train.checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint, save_checkpoint

    root = root or weights_dir()
    payload = load_checkpoint(run)
    if not payload.get("finished"):
        raise CheckpointError(f"{run} did not finish its schedule; publish finished runs only")
    model = build_model_from_checkpoint(payload, run).eval()
    path = root / f"{name}.pt"
    tau = payload.get("tau", payload.get("run_config", {}).get("train", {}).get("tau", 0.5))
    save_checkpoint(path, {"model_config": payload["model_config"], "model": model.state_dict(), "finished": True,
                           "step": payload["step"], "run_config": payload.get("run_config", {}), "tau": tau})
    index = _index(root)
    index[name] = {**record, "file": path.name, "sha256": sha256(path), "model_config": payload["model_config"],
                   "tau": tau, "fingerprint": fingerprint(model, tau)}
    (root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return path
