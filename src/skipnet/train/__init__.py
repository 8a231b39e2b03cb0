"""Training: losses, stages, checkpoints, run folders."""

from .checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from .config import RunConfig, load_config, recipe_names
from .evaluate import evaluate, random_skipping
from .losses import hrl_loss, per_gate_returns, sp_loss
from .trainer import Interrupted, NonFiniteLossError, RunBusyError, RunExistsError, train

__all__ = [
    "CheckpointError", "load_checkpoint", "load_model", "save_checkpoint", "RunConfig", "load_config",
    "recipe_names", "evaluate", "random_skipping", "hrl_loss", "per_gate_returns", "sp_loss", "Interrupted",
    "NonFiniteLossError", "RunBusyError", "RunExistsError", "train",
]
