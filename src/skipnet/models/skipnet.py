"""The gated residual network (SPEC §1-§4).

One class builds both families -- CIFAR-style 6n+2 ResNets and torchvision-layout ImageNet ResNets -- with
or without gates. Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``fc``), the
gates live under ``gates.``, so a torchvision state dict loads with only gate keys missing.

``forward`` returns a :class:`SkipNetOutput`: the logits plus the per-image routing record. The decision
mode and the executor are chosen per call; the model holds no per-call state.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..cost import MacTable, MacTabled
from .blocks import BasicBlock, Bottleneck, ResidualBlock, projection
from .decisions import check_mode, decide
from .executors import KeepsCompactRunner, check_executor, run_compact, run_masked
from .gates import GATE_TYPES, build_gates

IMAGENET_LAYOUTS: dict[int, tuple[type[ResidualBlock], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
ARCHS = ("cifar", "imagenet")
GATE_OPEN_BIAS = 3.0  # initial bias of every gate's output layer: sigmoid(3) = 0.95
GRADIENT_MODES = ("straight_through", "gumbel", "soft")  # decisions the gates learn through: masked only


@dataclass(frozen=True)
class SkipNetConfig:
    """Everything needed to rebuild a network. ``gate='none'`` gives the plain ResNet."""

    arch: str = "cifar"
    depth: int = 110
    gate: str = "rnn"
    num_classes: int = 10
    in_channels: int = 3
    embed_dim: int = 10  # RNN gate: projection size
    hidden_dim: int = 10  # RNN gate: LSTM hidden size
    layout: tuple[int, ...] | None = None  # CIFAR: blocks per stage in place of depth's n, n, n (same depth)

    def __post_init__(self) -> None:
        for name in ("depth", "num_classes", "in_channels", "embed_dim", "hidden_dim"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r} ({type(v).__name__})")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if self.arch == "cifar" and self.layout is None and (self.depth < 8 or (self.depth - 2) % 6):
            raise ValueError(f"a CIFAR-style ResNet has depth 6n+2 with n >= 1 (8, 14, 20, 38, ...); got {self.depth}")
        if self.arch == "imagenet" and self.depth not in IMAGENET_LAYOUTS:
            raise ValueError(f"ImageNet-style depth must be one of {sorted(IMAGENET_LAYOUTS)}; got {self.depth}")
        if self.gate not in GATE_TYPES + ("none",):
            raise ValueError(f"unknown gate {self.gate!r}; expected one of {GATE_TYPES + ('none',)}")
        if self.layout is not None:
            self._check_layout()

    def _check_layout(self) -> None:
        if self.arch != "cifar":
            raise ValueError("layout applies to the CIFAR-style ResNets only (the ImageNet layouts are fixed)")
        if not isinstance(self.layout, (list, tuple)):
            raise ValueError(f"layout gives the blocks of the 3 stages, e.g. [1, 2, 3]; got {self.layout!r}")
        layout = tuple(self.layout)
        object.__setattr__(self, "layout", layout)  # a list from YAML or JSON becomes the tuple it stands for
        if len(layout) != 3 or any(not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1
                                   for k in layout):
            raise ValueError(f"layout gives the blocks of the 3 stages, each at least 1; got {self.layout!r}")
        if 2 + 2 * sum(layout) != self.depth:
            raise ValueError(f"layout {list(layout)} has {sum(layout)} blocks, a depth of {2 + 2 * sum(layout)}, "
                             f"not {self.depth}: give the depth that matches (train config: model.depth)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SkipNetOutput:
    """What a forward pass returns. Shapes: B images, N gates.

    ``probs``: gate probabilities (B, N) (None for a plain network); ``decisions``: the decisions taken
    (B, N), detached; ``log_probs``: log pi of the taken decisions (B, N), ``sample`` mode only;
    ``macs``: per-image multiply-accumulates (B,), gates included (float64, float32 on MPS)."""

    logits: Tensor
    probs: Tensor | None
    decisions: Tensor
    log_probs: Tensor | None
    macs: Tensor


class SkipResNet(MacTabled, KeepsCompactRunner, nn.Module):
    """A ResNet with a gate in front of every block but the first (or none, for the plain network)."""

    def __init__(self, config: SkipNetConfig):
        super().__init__()
        self.config = config
        c = config
        if c.arch == "cifar":
            n = (c.depth - 2) // 6
            block_type: type[ResidualBlock] = BasicBlock
            layout, widths = c.layout or (n, n, n), (16, 32, 64)
            self.inplanes = 16
            self.conv1 = nn.Conv2d(c.in_channels, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.maxpool = nn.Identity()
            self.total_stride = 4
        else:
            block_type, layout = IMAGENET_LAYOUTS[c.depth]
            widths = (64, 128, 256, 512)
            self.inplanes = 64
            self.conv1 = nn.Conv2d(c.in_channels, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.total_stride = 32
        self.relu = nn.ReLU(inplace=True)
        gate_channels: list[int] = []
        stage_of_block: list[int] = []
        for stage, (count, width) in enumerate(zip(layout, widths)):
            blocks = []
            for j in range(count):
                stride = 2 if (stage > 0 and j == 0) else 1
                down = None
                if stride != 1 or self.inplanes != width * block_type.expansion:
                    down = projection(self.inplanes, width * block_type.expansion, stride)
                if stage_of_block:  # every block but the very first is gated
                    gate_channels.append(self.inplanes)
                blocks.append(block_type(self.inplanes, width, stride, down))
                stage_of_block.append(stage)
                self.inplanes = width * block_type.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layout)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, c.num_classes)
        self.gates = None if c.gate == "none" else build_gates(c.gate, gate_channels, c.embed_dim, c.hidden_dim)
        # Plain tuples: the blocks are registered once, under layerK.
        self.blocks: tuple[ResidualBlock, ...] = tuple(
            b for k in range(self.num_stages) for b in getattr(self, f"layer{k + 1}")
        )
        self.stage_of_block: tuple[int, ...] = tuple(stage_of_block)
        self.num_gates = len(self.blocks) - 1
        self.min_input_size = self.total_stride * (2 if c.gate == "ffgate1" else 1)
        self._mac_tables: dict[tuple[int, int], MacTable] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.gates is not None:
            # Gates start open (p ~ 0.95): SP begins as the plain ResNet and learns where to skip. With a
            # random start, straight-through gates may close before the blocks behind them learn anything.
            for name, m in self.gates.named_modules():
                if name.split(".")[-1] == "fc" and isinstance(m, nn.Linear):
                    nn.init.constant_(m.bias, GATE_OPEN_BIAS)

    @property
    def is_gated(self) -> bool:
        return self.gates is not None

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` saying what was expected and what came, for input the network can't take."""
        c = self.config
        want = f"a float batch of shape (B, {c.in_channels}, H, W) with B >= 1 and H, W >= {self.min_input_size}"
        if not isinstance(x, Tensor):
            raise ValueError(f"expected {want} as a torch.Tensor; got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected {want}; got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected {want}; got dtype {x.dtype} (convert images to float and normalise)")
        weight = self.conv1.weight.dtype
        if x.dtype != weight and not (torch.is_autocast_enabled(x.device.type)  # (autocast casts these itself)
                                      and x.dtype in (torch.float32, torch.get_autocast_dtype(x.device.type))):
            raise ValueError(f"expected a batch of the model's dtype {weight}; got {x.dtype}: convert the batch "
                             f"(x.to({weight})) or the model (model.to({x.dtype}))")
        if x.shape[0] == 0:
            raise ValueError(f"expected {want}; got an empty batch of shape {tuple(x.shape)}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"expected {want}; got {x.shape[1]} channels (shape {tuple(x.shape)})")
        if x.shape[2] < self.min_input_size or x.shape[3] < self.min_input_size:
            raise ValueError(
                f"expected {want}; got {x.shape[2]}x{x.shape[3]}, too small for the network's "
                f"{self.total_stride}x downsampling" + (" and FFGate-I's pooling" if c.gate == "ffgate1" else "")
            )

    def prepare(
        self,
        x: Tensor,
        mode: str | None,
        *,
        executor: str = "masked",
        tau: float = 0.5,
        decisions: Tensor | None = None,
        temperature: float = 1.0,
        drop_rate: float = 0.0,
    ) -> tuple[MacTable, str, Tensor | None]:
        """Check a call's arguments (``ValueError`` naming what was expected) and return the MAC table for the
        input size, the decision mode (the default filled in) and the fixed decisions as float32 (B, N) (mode
        ``fixed`` only). What :meth:`forward` and :class:`~skipnet.infer.CompactRunner` start with."""
        self.check_input(x)
        check_executor(executor)
        table = self.mac_table((x.shape[2], x.shape[3]))
        if self.gates is None:
            return table, "all", None  # a plain network ignores the mode
        mode = check_mode(mode or ("straight_through" if self.training else "greedy"))
        if executor == "compact" and mode == "soft":
            raise ValueError("the compact executor needs hard decisions; mode 'soft' is only for 'masked'")
        if executor == "compact" and self.training and mode in GRADIENT_MODES:
            raise ValueError(f"in training the compact executor takes decisions without gradient; mode {mode!r} "
                             f"trains the gates through the mask: use 'masked'")
        fixed = self._check_fixed(decisions, x.shape[0], x.device) if mode == "fixed" else None
        if temperature <= 0:
            raise ValueError(f"temperature must be positive; got {temperature}")
        if drop_rate and (mode not in ("straight_through", "gumbel") or not self.training
                          or not 0.0 < drop_rate < 1.0):
            raise ValueError(f"drop_rate goes with training in mode 'straight_through' or 'gumbel' and lies in "
                             f"[0, 1); got "
                             f"{drop_rate} with mode {mode!r}{'' if self.training else ' in eval mode'}")
        if mode == "greedy" and not 0.0 <= tau <= 1.0:
            raise ValueError(f"greedy threshold tau must lie in [0, 1], got {tau}")
        return table, mode, fixed

    def forward(
        self,
        x: Tensor,
        mode: str | None = None,
        *,
        executor: str = "masked",
        tau: float = 0.5,
        decisions: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        drop_rate: float = 0.0,
        explore: float = 0.0,
        backbone_grad: bool = True,
    ) -> SkipNetOutput:
        """Run the network on ``x`` (B, C, H, W).

        ``mode``: a decision mode (:data:`~skipnet.models.decisions.MODES`); by default ``straight_through``
        in training and ``greedy`` in eval. ``decisions`` (B, N) or (N,) go with ``mode='fixed'``.
        ``executor``: ``masked`` (this method: every block on the whole batch, mixed by the decisions) or
        ``compact``: each block runs only on the images whose gate fired -- in eval mode by
        :class:`skipnet.infer.CompactRunner`, in training by this method with
        :func:`~skipnet.models.executors.run_compact` (decisions without gradient only, not the modes of
        :data:`GRADIENT_MODES`; BatchNorm then sees the images that run each block). ``tau``: the
        greedy threshold. ``temperature`` divides the gate logits (HRL's
        policy sharpening). A plain network ignores the mode.
        ``drop_rate`` (training, ``straight_through`` or ``gumbel``): each image also skips each gated block with this
        probability whatever its gate says (stochastic depth on the gated blocks, drawn from ``generator``),
        so that the network learns to work without any one block; ``decisions`` then include those skips.
        ``explore`` (mode ``sample``): bounded exploration, see :func:`~skipnet.models.decisions.decide`.
        ``backbone_grad=False`` (masked executor): the stem, blocks and head run without autograd, so only the
        gates' outputs (``probs``, ``log_probs``) carry gradients, to the gates' own parameters -- a pass whose
        cross-entropy is not trained on costs a forward and the gates' backward, not the backbone's.
        Gates run in float32 even under autocast (a bf16 probability above ~0.998 rounds to 1: no sampling).
        """
        compact = check_executor(executor) == "compact"
        if compact and not self.training:
            from ..infer import compact_runner  # (infer builds on models: imported when first needed)

            return compact_runner(self)(x, mode, tau=tau, decisions=decisions, temperature=temperature,
                                        generator=generator, explore=explore, drop_rate=drop_rate)
        table, mode, fixed = self.prepare(x, mode, executor=executor, tau=tau, decisions=decisions,
                                          temperature=temperature, drop_rate=drop_rate)
        run = run_compact if compact else run_masked  # (compact here: training, decisions without gradient)
        batch = x.shape[0]
        backbone = contextlib.nullcontext() if backbone_grad else torch.no_grad()
        with backbone:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, C0, H', W')
        if self.gates is None:
            with backbone:
                for block in self.blocks:
                    x = block(x)
                ones = x.new_ones(batch, self.num_gates)
                return SkipNetOutput(self._head(x), None, ones, None, table.per_image(ones))

        with backbone:
            x = self.blocks[0](x)
        state = self.gates.init_state(x)
        probs, gs, log_probs = [], [], []
        for i, block in enumerate(self.blocks[1:]):
            logit, state = self.gate(x, i, state)  # (B,)
            if temperature != 1.0:
                logit = logit / temperature
            g, lp = decide(logit, mode, tau=tau, fixed=None if fixed is None else fixed[:, i], generator=generator,
                           explore=explore)
            if drop_rate:
                keep = torch.rand(batch, generator=generator, device=g.device) >= drop_rate
                g = g * keep.to(g.dtype)
            with backbone:
                x = block(x) if mode == "all" else run(block, x, g)  # (B, C, H, W)
            probs.append(torch.sigmoid(logit))
            gs.append(g)
            if lp is not None:
                log_probs.append(lp)
        dec = torch.stack(gs, 1).detach()  # (B, N)
        with backbone:
            logits = self._head(x)
        return SkipNetOutput(
            logits=logits,
            probs=torch.stack(probs, 1),
            decisions=dec,
            log_probs=torch.stack(log_probs, 1) if log_probs else None,
            macs=table.per_image(dec),
        )

    def gate(self, x: Tensor, index: int, state: object) -> tuple[Tensor, object]:
        """Gate ``index`` on the block input ``x``: ``(logits (B,), new state)``, in float32 under autocast."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.gates(x.float(), index, tuple(s.float() for s in state) if state else state)
        return self.gates(x, index, state)

    def _head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, classes)

    def _check_fixed(self, decisions: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """``decisions`` as float32 (B, N) on ``device``, or ``ValueError``: (B, N) or (N,) values 0 or 1
        (bool, integer or float). Anything else would run a fractional, negative or NaN share of a block --
        masked and compact would disagree, and the MACs would be above the dense network's or negative."""
        want = f"fixed decisions of shape ({batch}, {self.num_gates}) or ({self.num_gates},), values 0 or 1"
        if decisions is None:
            raise ValueError(f"mode 'fixed' needs decisions=: {want}")
        if (type(decisions) is Tensor and decisions.dtype == torch.float32 and decisions.device == device
                and decisions.shape == (batch, self.num_gates)):
            d = decisions  # (the usual case, without a copy)
        else:
            try:
                d = torch.as_tensor(decisions, device=device)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"expected {want}; got {type(decisions).__name__} ({err})") from err
            if d.dim() == 1:
                d = d.unsqueeze(0).expand(batch, -1)
            if d.dim() != 2 or d.shape[0] != batch or d.shape[1] != self.num_gates:
                raise ValueError(f"expected {want}; got shape {tuple(d.shape)}")
            if d.is_complex():
                raise ValueError(f"expected {want}; got dtype {d.dtype}")
        valid = ((d == 0) | (d == 1)).all()
        if torch.compiler.is_compiling():  # traced (compile, export): the values are unknown until run time
            torch._assert_async(valid, f"expected {want}")
        elif not bool(valid):
            bad = d[(d != 0) & (d != 1)]  # (NaN too)
            seen = sorted({repr(v) for v in bad.tolist()})
            raise ValueError(f"expected {want}; got {bad.numel()} other value(s): {', '.join(seen[:5])}"
                             + (", ..." if len(seen) > 5 else ""))
        return d if d.dtype == torch.float32 else d.float()
