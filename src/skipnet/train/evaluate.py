"""Evaluation of a (gated) network on a test set: accuracy and honest compute accounting."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..data.loader import check_class_count, check_eval_batch
from ..models import SkipResNet


def evaluate(model: SkipResNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, mode: str = "greedy",
             tau: float = 0.5, executor: str = "masked", amp: str = "off", progress: bool = False,
             decisions: Callable[[int], torch.Tensor] | None = None, seed: int = 0) -> dict[str, Any]:
    """Top-1 accuracy (%), mean/std MACs per image (gates included), the plain ResNet's MACs
    (``dense_macs_per_image``), the reduction vs it (%), the authors' block fraction (%), and per-gate
    execution rates. The model is put in eval mode. A rival (ACT, SACT, SDV; ``model.method``) runs its
    own inference with ``executor``; its ``exec_rates`` are those of SkipNet's gated blocks (SACT: the share
    of positions); SDV's random skips come from a generator seeded with ``seed``, so an evaluation is
    repeatable (other seeds show its spread). ``decisions`` (mode ``fixed``): called with each batch's
    size, returns that batch's (B, N) decisions. Refuses (``ValueError``) a loader of another class count than
    the model's, labels beyond it, and images holding NaN or infinite values."""
    if (mode == "fixed") != (decisions is not None):
        raise ValueError("mode 'fixed' goes with decisions (a function of the batch size), and only it")
    check_class_count(batches, model.config.num_classes)
    from ..progress import track
    from .device import autocast

    model.eval()
    rival = getattr(model, "method", None)  # ACT, SACT or SDV (skipnet.models.rivals)
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed) if rival == "sdv" else None
    correct = total = 0
    macs: list[torch.Tensor] = []
    exec_sum: torch.Tensor | None = None
    size = None
    with torch.inference_mode(), autocast(device, amp):
        for index, (x, y) in enumerate(track(batches, enabled=progress, desc="eval", unit="batch")):
            check_eval_batch(x, y, model.config.num_classes, index)
            if generator is not None:
                out = model(x, executor=executor, generator=generator)
            elif rival:
                out = model(x, executor=executor)
            elif not model.is_gated:
                out = model(x)
            elif decisions is not None:
                out = model(x, mode, decisions=decisions(x.shape[0]), executor=executor)
            else:
                out = model(x, mode, tau=tau, executor=executor)
            correct += int((out.logits.argmax(1) == y).sum())
            total += y.shape[0]
            macs.append(out.macs.cpu())
            s = out.decisions.sum(0).double().cpu()
            exec_sum = s if exec_sum is None else exec_sum + s
            size = (x.shape[2], x.shape[3])
    if total == 0:
        raise ValueError("evaluation got no images")
    table = model.mac_table(size)
    m = torch.cat(macs).double()
    rates = (exec_sum / total).tolist()
    return {
        "accuracy": 100.0 * correct / total,
        "images": total,
        "macs_per_image": float(m.mean()),
        "macs_std": float(m.std(unbiased=False)),
        "dense_macs_per_image": float(table.plain),
        "gated_dense_macs_per_image": float(table.dense),
        "mac_reduction": 100.0 * (1.0 - float(m.mean()) / table.plain),
        "block_fraction": 100.0 * (1.0 + sum(rates)) / (len(rates) + 1),
        "exec_rates": rates,
        "mode": mode if model.is_gated else rival or "plain",
        "tau": tau,
    }


def random_skipping(model: SkipResNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    rates: list[float] | torch.Tensor, *, seed: int = 0, executor: str = "compact",
                    progress: bool = False) -> dict[str, Any]:
    """The paper's random-skipping baseline (its "stochastic-depth variant"): every image runs gated block i
    with probability ``rates[i]``, independently of the image, on the given weights. Same result dictionary
    as :func:`evaluate`; match ``rates`` to a SkipNet's per-block execution rates to compare at equal MACs."""
    rates = torch.as_tensor(rates, dtype=torch.float32).flatten()
    if rates.numel() != model.num_gates or not bool(((rates >= 0) & (rates <= 1)).all()):
        raise ValueError(f"rates must be {model.num_gates} probabilities in [0, 1]; got {rates.tolist()}")
    g = torch.Generator().manual_seed(seed)

    def draw(batch: int) -> torch.Tensor:
        return torch.bernoulli(rates.expand(batch, -1), generator=g)

    result = evaluate(model, batches, mode="fixed", executor=executor, decisions=draw, progress=progress)
    result["mode"] = "random"
    return result
