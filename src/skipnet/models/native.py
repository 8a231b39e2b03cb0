"""Small C kernels, compiled at run time with the system C compiler and cached.

Two hot spots are memory-bound chains of tiny PyTorch calls that no library op fuses: the RNN gate's step at
small inference batches (:mod:`.gates`) and the gated merge's forward and backward in training
(:mod:`.executors`). Each keeps its C source next to the Python that calls it; this module only builds and
loads them. A kernel is compiled once per source, compiler, flags and platform into ``$SKIPNET_CACHE``
(default ``~/.cache/skipnet``, where the decoded datasets also go) and reused after that; ``-O3
-fno-trapping-math``, ISO C (so no floating-point contraction) and no ``-march``, so a file suits any machine
of the architecture. Where no compiler is available, or ``SKIPNET_NATIVE=0``, :func:`load_kernel` returns
``None`` and the callers use PyTorch ops.

OpenMP kernels (``openmp=True``) link ``libgomp.so.1``, which resolves to the copy PyTorch has already loaded,
so they share PyTorch's thread pool; they take the thread count as an argument (``torch.get_num_threads()``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .._paths import cache_root

logger = logging.getLogger(__name__)

_loaded: dict[str, ctypes.CDLL | None] = {}  # name -> library (or None: unavailable), once per process


def load_kernel(name: str, source: str, signatures: dict[str, tuple[list, object]],
                openmp: bool = False) -> ctypes.CDLL | None:
    """The library built from ``source`` with the functions ``signatures`` (name -> (argtypes, restype))
    declared, or ``None`` where it cannot be built (no compiler, read-only cache) or ``SKIPNET_NATIVE=0``.
    Built at most once per process and ``name``. With ``openmp`` a compiler without OpenMP support gets the
    source without it (the pragmas are ignored: one thread)."""
    if name not in _loaded:
        lib = None
        if os.environ.get("SKIPNET_NATIVE", "1") != "0":
            try:
                lib = _build(name, source, openmp)
                for fn, (argtypes, restype) in signatures.items():
                    getattr(lib, fn).argtypes = argtypes
                    getattr(lib, fn).restype = restype
            except Exception as err:  # no compiler, read-only cache, ...: the caller falls back to PyTorch ops
                logger.info("native kernel %r unavailable (%s); using PyTorch ops", name, err)
                lib = None
        _loaded[name] = lib
    return _loaded[name]


def _build(name: str, source: str, openmp: bool) -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler {cc!r} on PATH")
    base = ["-O3", "-fno-trapping-math", "-std=c99", "-shared", "-fPIC"]  # same results; lets the loops vectorise
    attempts = [base + ["-fopenmp"], base] if openmp else [base]
    cache = cache_root()
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    for i, flags in enumerate(attempts):
        key = hashlib.sha256("\0".join([source, cc, *flags, platform.machine(), platform.system()]).encode())
        target = cache / f"{name}_{key.hexdigest()[:16]}.so"
        try:
            if not target.exists():
                _compile(cc, flags, source, target, name)
                for old in cache.glob(f"{name}_*.so"):  # other versions' builds, unless maybe just built
                    with contextlib.suppress(OSError):
                        if old != target and time.time() - old.stat().st_mtime > 3600:
                            old.unlink()  # a process that loaded it keeps its mapping
            return ctypes.CDLL(str(target))
        except (subprocess.CalledProcessError, OSError):
            if i + 1 == len(attempts):
                raise
            # e.g. no OpenMP support in the compiler, or a runtime the loader cannot find: try without
    raise AssertionError("unreachable")


def _compile(cc: str, flags: list[str], source: str, target: Path, name: str) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        subprocess.run([cc, *flags, "-o", str(out), str(src), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(out, target)  # atomic: concurrent builders leave one complete file
