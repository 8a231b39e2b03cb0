"""SkipNet: dynamic routing in residual networks, with real skipping and honest compute accounting."""

from .cost import MacTable, build_mac_table, computation_percentage
from .models import (
    MODES,
    SkipNetConfig,
    SkipNetOutput,
    SkipResNet,
    block_set_network,
    create_model,
    from_torchvision,
    list_models,
)
from .published import list_pretrained, pretrained, pretrained_info

__version__ = "0.1.0"
__all__ = [
    "MODES", "MacTable", "SkipNetConfig", "SkipNetOutput", "SkipResNet", "build_mac_table",
    "block_set_network", "computation_percentage", "create_model", "from_torchvision", "list_models",
    "list_pretrained", "pretrained", "pretrained_info", "__version__",
]
