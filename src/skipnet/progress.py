"""Progress display: a live bar on a terminal, a plain line every few seconds in a file or CI log.

A tqdm bar written to a file puts every refresh on its own line (a demo log was ~2,000 bar lines); redirected
output gets :class:`LineProgress` instead, which writes one line per ``every`` seconds and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

LINE_EVERY_S = 30.0


class LineProgress:
    """The part of tqdm's interface the package uses (``update``, ``set_postfix``, ``close``), as plain lines."""

    def __init__(self, total: int | None, *, desc: str = "", unit: str = "step", initial: int = 0,
                 every: float = LINE_EVERY_S, stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.n, self.every = total, desc, unit, initial, every
        self.stream = stream if stream is not None else sys.stderr
        self._initial, self._postfix = initial, ""
        self._start = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.every:
            self._write()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self._postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed and self.n > self._initial:
            self._write()
        self._closed = True

    def _write(self) -> None:
        now = time.monotonic()
        self._last = now
        elapsed = now - self._start
        done = self.n - self._initial
        units = self.unit + ("es" if self.unit.endswith(("ch", "s", "x")) else "s")
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {units}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{_duration(elapsed)} elapsed")
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"~{_duration(elapsed / done * (self.total - self.n))} left")
        if self._postfix:
            parts.append(self._postfix)
        print(", ".join(parts), file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_bar(total: int | None, *, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True,
                 leave: bool = True) -> Any:
    """A tqdm bar when stderr is a terminal, :class:`LineProgress` when it is not, nothing when disabled."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return LineProgress(total, desc=desc, unit=unit, initial=initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=leave,
                dynamic_ncols=True)


def track(items: Iterable[Any], *, total: int | None = None, desc: str, unit: str = "batch",
          enabled: bool = True) -> Iterator[Any]:
    """Iterate ``items`` with a :func:`progress_bar` (a transient one on a terminal)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = progress_bar(total, desc=desc, unit=unit, enabled=enabled, leave=False)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
