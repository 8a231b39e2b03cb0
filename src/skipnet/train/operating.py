"""The operating point of a trained SkipNet: the greedy threshold tau at which it spends a given share of
the plain network's MACs, found on training images (MACs need no labels; no test image is used).

HRL's dual ascent holds the policy's *expected* cost at its target while training; greedy inference then
spends a different amount, which depends on the run (docs/RESULTS.md: three seeds landed 12 points of MACs
apart). Choosing tau afterwards puts every run at the asked cost. The routing stays the learned policy's;
tau is the paper's own inference knob, set by a measurement instead of by hand (ours, not in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models import SkipResNet


@torch.inference_mode()
def greedy_mac_fraction(model: SkipResNet, images: Sequence[torch.Tensor], tau: float) -> float:
    """Mean MACs per image of greedy inference at ``tau``, as a fraction of the plain network's. Runs the
    compact executor (each block only on the images that take it): the masked one's decisions and MACs (to
    float rounding at the threshold), at a fraction of its time."""
    model.eval()
    total, count = 0.0, 0
    for x in images:
        out = model(x, "greedy", tau=tau, executor="compact")
        total += float(out.macs.double().sum())
        count += x.shape[0]
    return total / count / model.mac_table(tuple(images[0].shape[-2:])).plain


def fit_tau(model: SkipResNet, images: Sequence[torch.Tensor], target: float, *, lo: float = 0.01,
            hi: float = 0.99, iterations: int = 12, tol: float = 5e-4) -> tuple[float, float]:
    """A tau in [lo, hi] whose greedy MAC fraction on ``images`` is within ``tol`` of ``target``, by
    bisection (the fraction falls as tau rises; with RNN gates not strictly), stopping at the first such tau
    (each step is a pass over ``images``). When none comes that close (a target beyond the fractions of
    ``lo`` and ``hi``, or one the fraction jumps over: few images, saturated gates), ``lo`` and ``hi`` are
    measured too and the nearest point seen is returned. Returns (tau, its MAC fraction)."""
    if not model.is_gated:
        raise ValueError("a plain network has no threshold to fit")
    if not 0 < lo < hi < 1:
        raise ValueError(f"expected 0 < lo < hi < 1; got {lo}, {hi}")
    seen: dict[float, float] = {}
    a, b = lo, hi
    for _ in range(iterations):
        mid = 0.5 * (a + b)
        seen[mid] = greedy_mac_fraction(model, images, mid)
        if abs(seen[mid] - target) <= tol:
            break
        if seen[mid] > target:
            a = mid  # spends too much: skip more, higher tau
        else:
            b = mid
    else:
        seen.update({t: greedy_mac_fraction(model, images, t) for t in (lo, hi)})
    tau = min(seen, key=lambda t: (abs(seen[t] - target), abs(t - 0.5)))
    return tau, seen[tau]
