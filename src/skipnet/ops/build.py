"""Building and loading the CPU kernels of :mod:`skipnet.ops` (the sources are ``skipnet/csrc/*.cpp``).

The kernels are compiled on first use with PyTorch's own extension builder (:func:`torch.utils.cpp_extension.load`,
the system C++ compiler and ninja) into ``$SKIPNET_CACHE/ops`` (default ``~/.cache/skipnet/ops``), once per
source text, flags, PyTorch and Python version, and imported as a Python module: loading it registers the
kernels as the CPU implementations of the ``skipnet::`` ops, and the module binds the RNN gate step directly
(:func:`direct_gate_step`, for the eager CPU path of compact inference, where a call through ``torch.ops`` costs
as much as the step). A build takes a minute or less; later processes load the cached module.

Flags: ``-O3``, warnings on (``-Wall -Wextra``; a test builds the sources with ``-Werror``), no
floating-point contraction and no ``-march`` (one file suits any machine of the architecture; the merge kernel
carries per-CPU clones where GCC supports them), OpenMP so that ``at::parallel_for`` runs on PyTorch's
threads. A compiler that refuses OpenMP or the clones gets a second attempt without both; the kernels then
run on one thread, and :func:`threaded` says so (the callers then prefer PyTorch's threaded ops when
PyTorch has several threads).

Nothing is built when ``SKIPNET_NATIVE=0``, or when ``$CC`` or ``$CXX`` names a command that does not answer
``--version`` (``CC=false`` simulates a machine without a compiler); a failed build is logged once. Either
way the ops keep their PyTorch reference implementations, which compute the same.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from .._paths import cache_root

logger = logging.getLogger(__name__)

SOURCES = ("merge.cpp", "rnn_gate.cpp", "python.cpp")
HEADERS = ("skipnet_ops.h",)
CSRC = Path(__file__).resolve().parent.parent / "csrc"
BASE_FLAGS = ["-O3", "-Wall", "-Wextra", "-ffp-contract=off", "-fno-trapping-math"]
# (compile flags, link flags, threaded): the first that builds wins
ATTEMPTS = [(BASE_FLAGS + ["-fopenmp"], ["-fopenmp"], True), (BASE_FLAGS + ["-DSKIPNET_NO_CLONES"], [], False)]

_lock = threading.Lock()
_state: dict = {}  # "loaded", "threaded", "module": set once per process


def load() -> bool:
    """Build (if needed) and load the kernels once per process; whether they are loaded."""
    if "loaded" not in _state:
        with _lock:
            if "loaded" not in _state:
                _state["threaded"] = False
                _state["loaded"] = _try_build()
    return _state["loaded"]


def direct_gate_step():
    """The RNN gate step's CPU kernel as a plain function (the module's direct binding: no dispatcher, so no
    dispatch mode, tracer or fallback sees it), or ``None`` where the kernels are not loaded."""
    return _state["module"].rnn_gate_step if load() else None


def threaded() -> bool:
    """Whether the loaded kernels run ``at::parallel_for`` on PyTorch's threads (built with OpenMP)."""
    return load() and _state["threaded"]


def compiler_available() -> bool:
    """Whether ``$CC`` and ``$CXX`` (where set) and the C++ compiler PyTorch would use answer ``--version``."""
    names = [os.environ[v] for v in ("CC", "CXX") if os.environ.get(v)]
    if not os.environ.get("CXX"):
        names.append("c++")
    for name in names:
        cmd = name.split()
        if not cmd or shutil.which(cmd[0]) is None:
            return False
        try:
            if subprocess.run([*cmd, "--version"], capture_output=True, timeout=30).returncode != 0:
                return False
        except (OSError, subprocess.SubprocessError):
            return False
    return True


def _try_build() -> bool:
    if os.environ.get("SKIPNET_NATIVE", "1") == "0":
        logger.info("skipnet kernels off (SKIPNET_NATIVE=0): PyTorch reference implementations")
        return False
    if not compiler_available():
        logger.info("no working C++ compiler: skipnet ops use their PyTorch reference implementations")
        return False
    errors = []
    for cflags, ldflags, is_threaded in ATTEMPTS:
        try:
            _state["module"] = build_and_load(cflags, ldflags)
        except Exception as err:  # no OpenMP, no ninja, a read-only cache, a compiler error, ...
            errors.append(f"{' '.join(cflags)}: {type(err).__name__}: {str(err).strip()[-500:]}")
            continue
        _state["threaded"] = is_threaded
        return True
    logger.warning("skipnet kernels could not be built; PyTorch reference implementations are used "
                   "(same results, slower on the CPU):\n%s", "\n".join(errors))
    return False


def build_and_load(cflags: list[str], ldflags: list[str], directory: Path | None = None):
    """Compile the sources with these flags into ``directory`` (default: the cache), import the module (which
    registers the kernels) and return it. Raises where the build fails."""
    sources = [CSRC / name for name in SOURCES]
    key = hashlib.sha256("\0".join(
        [*(p.read_text() for p in sources), *((CSRC / h).read_text() for h in HEADERS), *cflags, *ldflags,
         torch.__version__, sys.version, sys.platform]
    ).encode()).hexdigest()[:16]
    name = f"skipnet_ops_{key}"
    directory = directory or cache_root() / "ops" / name
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cpp_extension = _cpp_extension()
    return cpp_extension.load(name, [str(p) for p in sources], extra_cflags=cflags, extra_ldflags=ldflags,
                              build_directory=str(directory), is_python_module=True, verbose=False)


def _cpp_extension():
    """:mod:`torch.utils.cpp_extension`, imported without its warning about a missing CUDA toolkit (only C++
    is built here)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension
