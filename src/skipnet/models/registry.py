"""A tiny registry of named presets: ``create_model(name, **overrides)`` and ``list_models()``."""

from __future__ import annotations

from dataclasses import fields

from torch import nn

from .blocks import Bottleneck
from .skipnet import IMAGENET_LAYOUTS, SkipNetConfig, SkipResNet

CIFAR_DEPTHS = (8, 14, 20, 26, 32, 38, 74, 110, 152)
_PRESETS: dict[str, dict] = {f"cifar_resnet{d}": {"arch": "cifar", "depth": d} for d in CIFAR_DEPTHS}
_PRESETS.update({f"resnet{d}": {"arch": "imagenet", "depth": d, "num_classes": 1000} for d in IMAGENET_LAYOUTS})


def list_models() -> list[str]:
    """Preset names: ``cifar_resnet{8,14,20,26,32,38,74,110,152}`` (6n+2, 32x32) and ``resnet{18,...,152}``
    (torchvision layout)."""
    return list(_PRESETS)


def model_config(name: str, **overrides) -> SkipNetConfig:
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    known = {f.name for f in fields(SkipNetConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(known)}")
    return SkipNetConfig(**{**_PRESETS[name], **overrides})


def create_model(name: str, **overrides) -> SkipResNet:
    """Build preset ``name`` with config overrides, e.g. ``create_model("cifar_resnet110", gate="rnn")``;
    ``gate="none"`` gives the plain ResNet."""
    return SkipResNet(model_config(name, **overrides))


def from_torchvision(tv_model: nn.Module, gate: str = "rnn", **overrides) -> SkipResNet:
    """A gated network holding the weights of a ``torchvision.models.resnetNN()``: every backbone tensor
    is copied; only the new gate parameters are freshly initialised."""
    layers = [getattr(tv_model, f"layer{k}", None) for k in range(1, 5)]
    if any(layer is None for layer in layers) or not hasattr(tv_model, "fc"):
        raise ValueError("expected a torchvision ResNet (with conv1, layer1..layer4 and fc)")
    counts = tuple(len(layer) for layer in layers)
    bottleneck = hasattr(layers[0][0], "conv3")
    depth = next(
        (d for d, (bt, lay) in IMAGENET_LAYOUTS.items() if lay == counts and (bt is Bottleneck) == bottleneck),
        None,
    )
    if depth is None:
        raise ValueError(f"no ImageNet ResNet preset has blocks {counts} (bottleneck={bottleneck})")
    cfg = SkipNetConfig(
        arch="imagenet",
        depth=depth,
        gate=gate,
        num_classes=tv_model.fc.out_features,
        in_channels=tv_model.conv1.in_channels,
        **overrides,
    )
    model = SkipResNet(cfg)
    result = model.load_state_dict(tv_model.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("gates.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"torchvision weights did not match: missing {missing}, unexpected {result.unexpected_keys}")
    return model
