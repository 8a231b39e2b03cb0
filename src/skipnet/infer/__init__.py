"""Compact inference: the runner that executes each gated block only for the images whose gate fired."""

from .runner import CompactRunner, RunnerConfig, compact_runner

__all__ = ["CompactRunner", "RunnerConfig", "compact_runner"]
