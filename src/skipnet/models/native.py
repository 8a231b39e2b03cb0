"""Small C kernels, compiled at run time with the system C compiler and cached.

Two hot spots are memory-bound chains of tiny PyTorch calls that no library op fuses: the RNN gate's step at
small inference batches (:mod:`.gates`) and the gated merge's forward and backward in training
(:mod:`.executors`). Each keeps its C source next to the Python that calls it; this module only builds and
loads them. A kernel is compiled once per source, compiler, flags and platform into ``$SKIPNET_CACHE``
(default ``~/.cache/skipnet``, where the decoded datasets also go) and reused after that; ``-O3
-fno-trapping-math``, ISO C (so no floating-point contraction) and no ``-march``, so a file suits any machine
of the architecture; a kernel may carry per-CPU clones (GCC's ``target_clones`` on x86-64 Linux: picked when
it loads), and is built without them where the compiler refuses them. Where no compiler is available, or
``SKIPNET_NATIVE=0``, :func:`load_kernel` returns ``None`` and the callers use PyTorch ops.

OpenMP kernels (``openmp=True``) link ``libgomp.so.1``, which resolves to the copy PyTorch has already loaded,
so they share PyTorch's thread pool; they take the thread count as an argument (``torch.get_num_threads()``).

Calls: where Python's headers are installed, a kernel is built as a small extension module, with a generated
wrapper per function (``METH_FASTCALL``, the GIL released during the call): ~0.1 us a call. Elsewhere it is
a shared library called through :mod:`ctypes`, ~1.5-2.5 us a call -- which mattered at batch 1, where the
gate kernel runs 53 times per ResNet-110 pass. Both take the same arguments: Python ints (addresses, such
as ``tensor.data_ptr()``, or ``None`` for a null pointer, and integers).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from .._paths import cache_root

logger = logging.getLogger(__name__)

_loaded: dict[str, Any] = {}  # name -> library or module (or None: unavailable), once per process

# ctypes argument types -> (C type, converter in the generated wrapper)
_C_ARGS = {ctypes.c_void_p: ("void *", "sk_ptr_"), ctypes.c_int64: ("int64_t", "sk_i64_"),
           ctypes.c_int: ("int", "sk_int_")}
_C_RESULTS = {None: None, ctypes.c_int64: "int64_t"}


def load_kernel(name: str, source: str, signatures: dict[str, tuple[list, object]], openmp: bool = False) -> Any:
    """The kernels of ``source`` with the functions ``signatures`` (name -> (ctypes argtypes, restype); pointers
    ``c_void_p``, integers ``c_int64`` or ``c_int``; result ``None`` or ``c_int64``) callable as attributes --
    an extension module, or a :class:`ctypes.CDLL` without Python's headers -- or ``None`` where neither can
    be built (no compiler, read-only cache) or ``SKIPNET_NATIVE=0``. Built at most once per process and
    ``name``. With ``openmp`` a compiler without OpenMP support gets the source without it (the pragmas are
    ignored: one thread)."""
    if name not in _loaded:
        lib = None
        if os.environ.get("SKIPNET_NATIVE", "1") != "0":
            for kind in ("extension", "ctypes"):
                try:
                    lib = _build(name, source, signatures, openmp, kind)
                    break
                except Exception as err:  # no headers, no compiler, read-only cache, ...
                    logger.info("native kernel %r unavailable as %s (%s)", name, kind, err)
        _loaded[name] = lib
    return _loaded[name]


def _wrapper(module: str, signatures: dict[str, tuple[list, object]]) -> str:
    """C source of an extension module ``module`` exposing each function of ``signatures`` (declared earlier in
    the translation unit) with Python ints for its arguments."""
    out = [r"""
static int sk_ptr_(PyObject *o, void **v) {
    if (o == Py_None) { *v = NULL; return 0; }
    *v = PyLong_AsVoidPtr(o);
    return *v == NULL && PyErr_Occurred() ? -1 : 0;
}
static int sk_i64_(PyObject *o, int64_t *v) {
    *v = PyLong_AsLongLong(o);
    return *v == -1 && PyErr_Occurred() ? -1 : 0;
}
static int sk_int_(PyObject *o, int *v) {
    const long x = PyLong_AsLong(o);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < INT_MIN || x > INT_MAX) { PyErr_SetString(PyExc_OverflowError, "int argument out of range"); return -1; }
    *v = (int)x;
    return 0;
}
"""]
    table = []
    for fn, (argtypes, restype) in signatures.items():
        if restype not in _C_RESULTS or any(a not in _C_ARGS for a in argtypes):
            raise TypeError(f"{fn}: unsupported argument or result type")
        n = len(argtypes)
        lines = [f"static PyObject *py_{fn}(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {{",
                 f"    if (nargs != {n}) {{",
                 f'        PyErr_SetString(PyExc_TypeError, "{fn}() takes {n} arguments");',
                 "        return NULL;", "    }"]
        for i, a in enumerate(argtypes):
            ctype, conv = _C_ARGS[a]
            lines.append(f"    {ctype} a{i}; if ({conv}(args[{i}], &a{i})) return NULL;")
        call = f"{fn}({', '.join(f'a{i}' for i in range(n))})"
        result = _C_RESULTS[restype]
        if result is None:
            lines += ["    Py_BEGIN_ALLOW_THREADS", f"    {call};", "    Py_END_ALLOW_THREADS", "    Py_RETURN_NONE;"]
        else:
            lines += [f"    {result} r;", "    Py_BEGIN_ALLOW_THREADS", f"    r = {call};", "    Py_END_ALLOW_THREADS",
                      "    return PyLong_FromLongLong(r);"]
        out.append("\n".join(lines) + "\n}\n")
        table.append(f'    {{"{fn}", (PyCFunction)(void (*)(void))py_{fn}, METH_FASTCALL, NULL}},')
    out.append("static PyMethodDef sk_methods_[] = {\n" + "\n".join(table) + "\n    {NULL, NULL, 0, NULL}\n};\n")
    out.append(f'static struct PyModuleDef sk_module_ = {{PyModuleDef_HEAD_INIT, "{module}", NULL, -1, sk_methods_}};\n'
               f"PyMODINIT_FUNC PyInit_{module}(void) {{ return PyModule_Create(&sk_module_); }}\n")
    return "".join(out)


def _build(name: str, source: str, signatures: dict[str, tuple[list, object]], openmp: bool, kind: str) -> Any:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler {cc!r} on PATH")
    base = ["-O3", "-fno-trapping-math", "-std=c99", "-shared", "-fPIC"]  # same results; lets the loops vectorise
    suffix = ".so"
    if kind == "extension":
        include = sysconfig.get_paths().get("include")
        if not include or not Path(include, "Python.h").exists():
            raise OSError("no Python headers (Python.h)")
        base += ["-I" + include]
        if platform.system() == "Darwin":  # Python's symbols resolve when the interpreter loads the module
            base += ["-undefined", "dynamic_lookup"]
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    attempts = [base + ["-fopenmp"], base] if openmp else [base]
    if "target_clones" in source:  # a compiler or assembler that refuses per-CPU clones builds without them
        attempts += [flags + ["-DSKIPNET_NO_CLONES"] for flags in attempts]
    cache = cache_root()
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)

    def text(module: str) -> str:  # Python.h first, as it asks; then the kernels, then their wrappers
        if kind != "extension":
            return source
        head = "#define PY_SSIZE_T_CLEAN\n#include <Python.h>\n#include <limits.h>\n"
        return head + source + _wrapper(module, signatures)

    for i, flags in enumerate(attempts):
        key = hashlib.sha256("\0".join([text(""), repr(signatures), kind, cc, *flags, platform.machine(),
                                         platform.system()]).encode()).hexdigest()[:16]
        module = f"{name}_{key}"
        target = cache / (module + suffix)
        try:
            if not target.exists():
                _compile(cc, flags, text(module), target, name)
                for old in cache.glob(f"{name}_*"):  # this kind's other builds (not other Pythons')
                    if not old.name.endswith(suffix) or (kind == "ctypes") != (old.suffixes == [".so"]):
                        continue
                    with contextlib.suppress(OSError):  # unless maybe just built
                        if old != target and time.time() - old.stat().st_mtime > 3600:
                            old.unlink()  # a process that loaded it keeps its mapping
            if kind == "ctypes":
                lib = ctypes.CDLL(str(target))
                for fn, (argtypes, restype) in signatures.items():
                    getattr(lib, fn).argtypes = argtypes
                    getattr(lib, fn).restype = restype
                return lib
            spec = importlib.util.spec_from_file_location(module, target)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {target}")
            lib = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(lib)
            return lib
        except (subprocess.CalledProcessError, OSError, ImportError):
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
