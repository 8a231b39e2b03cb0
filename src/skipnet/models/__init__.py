"""Gated ResNets, gates, decision modes and executors."""

from .blocks import BasicBlock, Bottleneck, ResidualBlock
from .decisions import MODES, bernoulli_log_prob, decide
from .executors import EXECUTORS, run_masked
from .gates import GATE_TYPES, FFGateBank, GateBank, RNNGateBank, build_gates
from .registry import block_set_network, create_model, from_torchvision, kept_layout, list_models, model_config
from .skipnet import SkipNetConfig, SkipNetOutput, SkipResNet

__all__ = [
    "BasicBlock", "Bottleneck", "ResidualBlock", "MODES", "bernoulli_log_prob", "decide", "EXECUTORS",
    "run_masked", "GATE_TYPES", "FFGateBank", "GateBank", "RNNGateBank", "build_gates",
    "block_set_network", "create_model", "from_torchvision", "kept_layout", "list_models", "model_config",
    "SkipNetConfig", "SkipNetOutput",
    "SkipResNet",
]
