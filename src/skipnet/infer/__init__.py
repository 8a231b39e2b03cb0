"""Compact inference: the runner that executes each gated block only for the images whose gate fired, and the
rivals' compact passes (:mod:`skipnet.infer.rivals`: ACT, SACT, SDV), which it runs for them."""

from .runner import CompactRunner, RunnerConfig, compact_runner

__all__ = ["CompactRunner", "RunnerConfig", "compact_runner"]
