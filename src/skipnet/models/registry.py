"""A tiny registry of named presets: ``create_model(name, **overrides)`` and ``list_models()``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace

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


def kept_layout(stage_of_block: Sequence[int], keep: Sequence[bool]) -> tuple[int, ...]:
    """Blocks per stage of the network that runs only the kept blocks (``keep``: one flag per gated block, i.e.
    every block but the first). ``ValueError`` when a stage's first block is dropped (there a plain network
    downsamples; a SkipNet that skips it keeps only the shortcut, which no layout builds)."""
    if len(keep) != len(stage_of_block) - 1:
        raise ValueError(f"expected {len(stage_of_block) - 1} keep flags (one per gate); got {len(keep)}")
    counts = [0] * (max(stage_of_block) + 1)
    for i, (stage, kept) in enumerate(zip(stage_of_block, [True, *keep])):
        if not kept and stage_of_block[i - 1] != stage:
            raise ValueError(f"block {i} (the first of stage {stage + 1}) is dropped: a plain network of the kept "
                             "blocks needs every stage's first block")
        counts[stage] += bool(kept)
    return tuple(counts)


def block_set_network(model: SkipResNet, keep: Sequence[bool]) -> SkipResNet:
    """The plain network (no gates) of a CIFAR-style SkipNet's kept blocks, holding their trained weights: what
    a static policy computes, as an ordinary ResNet with ``layout`` :func:`kept_layout` (e.g. to fine-tune the
    blocks a learned policy keeps as a plain network, or to deploy a static policy without gates). Blocks keep
    their order; the stem and the classifier are copied. The outputs equal the SkipNet's with those decisions
    fixed, in eval mode."""
    if model.config.arch != "cifar":
        raise ValueError("block_set_network needs a CIFAR-style network (the ImageNet layouts are fixed)")
    layout = kept_layout(model.stage_of_block, [bool(k) for k in keep])
    net = SkipResNet(replace(model.config, gate="none", layout=layout, depth=2 + 2 * sum(layout)))
    source = {k: v for k, v in model.state_dict().items() if not k.startswith("gates.")}
    state, moved = {}, {}
    position = [0] * len(layout)
    for i, (stage, kept) in enumerate(zip(model.stage_of_block, [True, *keep])):
        j = i - model.stage_of_block.index(stage)  # the block's index within its stage
        if kept:
            moved[f"layer{stage + 1}.{j}."] = f"layer{stage + 1}.{position[stage]}."
            position[stage] += 1
    for key, value in source.items():
        if not key.startswith("layer"):
            state[key] = value
            continue
        prefix = ".".join(key.split(".")[:2]) + "."
        if prefix in moved:
            state[moved[prefix] + key[len(prefix):]] = value
    net.load_state_dict(state)
    return net.to(next(model.parameters()).device)
