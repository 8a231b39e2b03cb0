"""The methods SkipNet is compared with (SPEC §7, §10), built from the same blocks and counted by the same MAC table.

* ``act`` -- Adaptive Computation Time on ResNet stages (Graves 2016, as applied to ResNets by Figurnov et al.,
  "Spatially Adaptive Computation Time for Residual Networks", CVPR 2017): per image and stage, a halting unit
  after each residual block; the stage stops once the halting scores sum to 1 - eps.
  :class:`~skipnet.models.act.ACTResNet`.
* ``sact`` -- Spatially Adaptive Computation Time (the same paper): the same per spatial position.
  :class:`~skipnet.models.act.ACTResNet` with ``method='sact'``.
* ``sdv`` -- the stochastic-depth variant (random skipping): every image skips each gated block with
  probability ``drop_rate``, in training and at inference. :class:`~skipnet.models.sdv.StochasticDepthResNet`.

Each network takes the backbone of the plain ResNet of the same preset (:class:`~skipnet.models.SkipResNet`
with ``gate='none'``: the same block code, initialisation and torchvision parameter names, so a plain
ResNet's weights load into it), and returns a :class:`RivalOutput` whose ``decisions`` (B, N) say which of
SkipNet's N gated blocks ran (SACT: on what share of the positions), so that accuracy, MACs per image,
reduction and the authors' block fraction come out of :func:`skipnet.train.evaluate` for every method alike.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from ..cost import MacTable, MacTabled
from .blocks import ResidualBlock
from .executors import KeepsCompactRunner
from .registry import from_torchvision, model_config
from .skipnet import SkipNetConfig, SkipResNet

RIVAL_METHODS = ("act", "sact", "sdv")
EXECUTORS = ("masked", "compact")


@dataclass(frozen=True)
class RivalConfig:
    """Everything needed to rebuild a rival network (checkpoints store it as ``model_config``; the key
    ``method`` tells it from a :class:`~skipnet.models.SkipNetConfig`)."""

    method: str = "act"  # act | sact | sdv
    arch: str = "cifar"
    depth: int = 110
    num_classes: int = 10
    in_channels: int = 3
    halt_eps: float = 0.01  # act/sact: a stage halts once its halting scores sum to >= 1 - halt_eps (paper: 0.01)
    drop_rate: float = 0.0  # sdv: the probability that an image skips each gated block (training and inference)

    def __post_init__(self) -> None:
        if self.method not in RIVAL_METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {RIVAL_METHODS}")
        self.backbone_config()  # checks arch, depth, num_classes, in_channels
        for name in ("halt_eps", "drop_rate"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise ValueError(f"{name} must be a number; got {v!r}")
        if not 0.0 < self.halt_eps < 1.0:
            raise ValueError(f"halt_eps lies in (0, 1); got {self.halt_eps}")
        if self.method == "sdv" and not 0.0 < self.drop_rate < 1.0:
            raise ValueError(f"sdv skips each gated block with probability drop_rate in (0, 1); got {self.drop_rate}")
        if self.method != "sdv" and self.drop_rate:
            raise ValueError(f"drop_rate belongs to method 'sdv'; got {self.drop_rate} with {self.method!r}")

    def backbone_config(self) -> SkipNetConfig:
        """The plain ResNet whose blocks the rival is built from."""
        return SkipNetConfig(arch=self.arch, depth=self.depth, gate="none", num_classes=self.num_classes,
                             in_channels=self.in_channels)

    def to_dict(self) -> dict:
        return asdict(self)


def is_rival_config(config: dict) -> bool:
    """Whether a stored ``model_config`` describes a rival (it names a ``method``)."""
    return "method" in config


@dataclass
class RivalOutput:
    """What a rival's forward pass returns. Shapes: B images, N gated blocks (SkipNet's), S stages.

    ``decisions`` (B, N), detached: whether each of SkipNet's gated blocks ran for the image (SACT: the share
    of its positions where it ran); ``macs`` (B,): per-image multiply-accumulates, halting units included
    (float64); ``ponder`` (B,), ACT/SACT only, differentiable: the ponder cost summed over stages, N + R per
    stage (SACT: the stage's ponder map averaged over positions); ``units`` (B, S), ACT/SACT: units run per
    stage (SACT: averaged over positions); ``ponder_maps`` (SACT): per stage the (B, H, W) map of N + R,
    detached. ``probs`` and ``log_probs`` are None (no gates), kept for code that reads SkipNet's record."""

    logits: Tensor
    decisions: Tensor
    macs: Tensor
    ponder: Tensor | None = None
    units: Tensor | None = None
    ponder_maps: list[Tensor] | None = None
    probs: None = None
    log_probs: None = None


class RivalResNet(MacTabled, KeepsCompactRunner, nn.Module):
    """The shared part: the plain ResNet's backbone (adopted, not copied: same modules and parameter names),
    input checks, the MAC table and the head. Subclasses define ``forward``: the masked (training) pass; the
    compact one (inference) is :class:`skipnet.infer.CompactRunner`'s (:mod:`skipnet.infer.rivals`)."""

    is_gated = False  # no SkipNet gates (the analysis of gates does not apply; evaluate() treats it apart)

    def __init__(self, config: RivalConfig):
        super().__init__()
        self.config = config
        plain = SkipResNet(config.backbone_config())
        for name in ("conv1", "bn1", "relu", "maxpool", "avgpool", "fc"):
            setattr(self, name, getattr(plain, name))
        for k in range(plain.num_stages):
            self.add_module(f"layer{k + 1}", getattr(plain, f"layer{k + 1}"))
        self.gates = None  # (build_mac_table reads it)
        self.num_stages = plain.num_stages
        self.total_stride = plain.total_stride
        self.min_input_size = plain.total_stride
        self.blocks: tuple[ResidualBlock, ...] = plain.blocks  # registered once, under layerK
        self.stage_of_block: tuple[int, ...] = plain.stage_of_block
        self.stages: tuple[tuple[ResidualBlock, ...], ...] = tuple(
            tuple(getattr(self, f"layer{k + 1}")) for k in range(self.num_stages))
        self.num_gates = len(self.blocks) - 1
        self._mac_tables: dict[tuple[int, int], MacTable] = {}

    @property
    def method(self) -> str:
        return self.config.method

    def check_input(self, x: Tensor, executor: str) -> None:
        """``ValueError`` for input the network can't take, or an executor it does not have."""
        c = self.config
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r}; expected one of {EXECUTORS}")
        if executor == "compact" and self.training:
            raise ValueError("the compact executor is for inference: call model.eval() first (training masks)")
        want = f"a float batch of shape (B, {c.in_channels}, H, W) with B >= 1 and H, W >= {self.min_input_size}"
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point() or x.shape[0] == 0:
            got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected {want}; got {got}")
        if x.shape[1] != c.in_channels or min(x.shape[2], x.shape[3]) < self.min_input_size:
            raise ValueError(f"expected {want}; got shape {tuple(x.shape)}")

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, classes)


def rival_config(method: str, name: str, **overrides) -> RivalConfig:
    """The config of preset ``name`` (see :func:`~skipnet.models.list_models`) as a rival ``method``."""
    own = {f.name for f in fields(RivalConfig)} - {"method", "arch", "depth"}
    unknown = set(overrides) - own
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for method {method!r}; known: {sorted(own)}")
    base = model_config(name)
    values = {"arch": base.arch, "depth": base.depth, "num_classes": base.num_classes,
              "in_channels": base.in_channels, **overrides}
    return RivalConfig(method=method, **values)


def build_rival(config: RivalConfig) -> RivalResNet:
    if config.method == "sdv":
        from .sdv import StochasticDepthResNet

        return StochasticDepthResNet(config)
    from .act import ACTResNet

    return ACTResNet(config)


def create_rival(method: str, name: str, **overrides) -> RivalResNet:
    """A rival network on preset ``name``, e.g. ``create_rival("act", "cifar_resnet110")`` or
    ``create_rival("sdv", "cifar_resnet38", drop_rate=0.3)``; ``num_classes``, ``in_channels``, ``halt_eps``
    and ``drop_rate`` may be overridden."""
    return build_rival(rival_config(method, name, **overrides))


def rival_from_torchvision(method: str, tv_model: nn.Module, **overrides) -> RivalResNet:
    """A rival holding the weights of a ``torchvision.models.resnetNN()`` (the authors started their ImageNet
    ACT/SACT from a pretrained ResNet-101): every backbone tensor is copied; the halting units start fresh."""
    plain = from_torchvision(tv_model, gate="none")
    c = plain.config
    model = build_rival(RivalConfig(method=method, arch=c.arch, depth=c.depth, num_classes=c.num_classes,
                                    in_channels=c.in_channels, **overrides))
    result = model.load_state_dict(plain.state_dict(), strict=False)
    if result.unexpected_keys or any(not k.startswith("halting.") for k in result.missing_keys):
        raise ValueError(f"torchvision weights did not match: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")  # pragma: no cover - same backbone by construction
    return model
