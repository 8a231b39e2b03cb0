"""Where skipnet keeps what it can rebuild: decoded datasets and compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SKIPNET_CACHE`` if set, else ``~/.cache/skipnet``."""
    env = os.environ.get("SKIPNET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "skipnet"
