"""Where the kernels' machine code comes from, decided once per process:

- "aot": a build made by `qnrt compile` (numba.pycc, qnrt/aot_build.py) that
  matches these kernel sources, this numba version and this machine. Neither
  numba nor llvmlite is imported. pycc's exports do not check their
  arguments, so each call goes through an AotKernel, which picks the export
  compiled for exactly these argument types (dtype, rank, layout, writability)
  and never passes anything else.
- "jit": Numba compiles each kernel on first use and caches it on disk
  (cache=True). Used when there is no matching build, or with QNRT_JIT=1.

`kernel(**options)` is the decorator every kernel uses (through
qnrt.ops._common.njit). The build's location: $QNRT_KERNEL_DIR, else
$XDG_CACHE_HOME/qnrt/kernels, else ~/.cache/qnrt/kernels.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import platform
import sys
import threading
import types

import numpy as np

log = logging.getLogger("qnrt")

# Numba options every kernel compiles with. error_model="numpy": a float x / 0
# gives inf or NaN, as IEEE, ONNX Runtime and NumPy do (Numba's default raises
# ZeroDivisionError inside the kernel). nogil: kernels run without the GIL.
JIT_OPTIONS = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")
MODULE_NAME = "_qnrt_kernels"
MANIFEST = "manifest.json"
FORMAT = 1  # of the manifest

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# The files whose Numba functions the build holds: any change to them makes a build stale.
_KERNEL_SOURCES = ("ops", "codec.py", "backend.py")


def kernel_dir() -> str:
    if os.environ.get("QNRT_KERNEL_DIR"):
        return os.environ["QNRT_KERNEL_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "qnrt", "kernels")


def source_files() -> list[str]:
    out = []
    for entry in _KERNEL_SOURCES:
        path = os.path.join(_PACKAGE, entry)
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
        else:
            out.append(path)
    return out


def source_hash() -> str:
    h = hashlib.sha256()
    for path in source_files():
        h.update(os.path.relpath(path, _PACKAGE).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def numba_version() -> str | None:
    """The installed numba's version, read from its dist-info folder's name beside
    the package (numba is not imported; importlib.metadata costs ~30 ms to import)."""
    spec = importlib.util.find_spec("numba")
    if spec is None or not spec.origin:
        return None
    site = os.path.dirname(os.path.dirname(spec.origin))
    for entry in _listdir(site):
        if entry.startswith("numba-") and entry.endswith(".dist-info"):
            return entry[len("numba-"):-len(".dist-info")]
    from importlib import metadata  # an unusual layout: ask the slow way
    try:
        return metadata.version("numba")
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """What a build is only valid for: ISA, Python ABI, numpy major, CPU features."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return {"machine": platform.machine(), "python": sys.implementation.cache_tag,
            "extension": importlib.machinery.EXTENSION_SUFFIXES[0],
            "numpy": np.__version__.split(".")[0],
            "cpu_features": hashlib.sha256(flags.encode()).hexdigest()[:16]}


# --- the type key: what a pycc export was compiled for --------------------------
# Per argument: an array gives (dtype, ndim, C-contiguous), a scalar its Numba
# type name. Writability is left out: it changes Numba's typing, not the code.

_SCALARS = {bool: "bool", np.bool_: "bool", int: "int64", np.int64: "int64",
            float: "float64", np.float64: "float64", np.float32: "float32",
            np.int32: "int32", np.int8: "int8", np.uint8: "uint8"}
_ndarray = np.ndarray


def value_key(args) -> tuple:
    """The key of a call's arguments (flat: it is hashed on every call)."""
    key = []
    for a in args:
        if type(a) is _ndarray:
            key += (a.dtype, a.ndim, a.flags.c_contiguous)
        else:
            key.append(_SCALARS.get(type(a), type(a)))
    return tuple(key)


def signature_keys(numba_key) -> list[tuple]:
    """The value_keys a build's signature serves (from the manifest's per-argument
    [dtype, ndim, layout, readonly] or scalar type names): an 'A'-layout array
    parameter takes C-contiguous arrays too."""
    keys = [()]
    for k in numba_key:
        if isinstance(k, (list, tuple)):
            dtype, ndim, layout = np.dtype(k[0]), int(k[1]), k[2]
            c = [True] if layout == "C" else [False, True] if layout == "A" else [False]
            keys = [key + (dtype, ndim, ci) for key in keys for ci in c]
        else:
            keys = [key + (k,) for key in keys]
    return keys


class AotKernel:
    """A kernel served by the AOT build: one pycc export per argument-type key.
    A call with types the build lacks compiles that kernel with Numba (imported
    then), after one warning naming it."""

    def __init__(self, py_func, options: dict, exports: dict):
        self.py_func = py_func
        self.options = options
        self.exports = exports  # value_key -> compiled function
        self.__name__, self.__qualname__ = py_func.__name__, py_func.__qualname__
        self.__module__, self.__doc__ = py_func.__module__, py_func.__doc__
        self._jit = None
        self._warned = False

    def __call__(self, *args):
        key = []
        for a in args:  # value_key, inline: this runs on every kernel call
            if type(a) is _ndarray:
                key += (a.dtype, a.ndim, a.flags.c_contiguous)
            else:
                key.append(_SCALARS.get(type(a), type(a)))
        fn = self.exports.get(tuple(key))
        if fn is None:
            if not self._warned:
                self._warned = True
                log.warning("kernel %s.%s: the ahead-of-time build has no version for "
                            "these argument types; compiling it with Numba (run `qnrt "
                            "compile` with this model to include it)", self.__module__,
                            self.__name__)
            fn = self.jit()
        return fn(*args)

    def jit(self):
        """A Numba dispatcher of the same source whose calls to other kernels go
        to their dispatchers (Numba cannot call an AotKernel)."""
        with _LOCK:
            if self._jit is None:
                numba = _import_numba()
                g: dict = {}
                fn = types.FunctionType(self.py_func.__code__, g, self.py_func.__name__,
                                        self.py_func.__defaults__, self.py_func.__closure__)
                fn.__qualname__, fn.__module__ = self.py_func.__qualname__, self.__module__
                self._jit = numba.njit(**{**JIT_OPTIONS, **self.options})(fn)
                g.update({k: v._jit if v is self else v for k, v in
                          self.py_func.__globals__.items()})
                for k, v in g.items():
                    if isinstance(v, AotKernel) and v is not self:
                        g[k] = v.jit()
                    elif isinstance(v, JitOnly):
                        g[k] = v.resolve()
            return self._jit


_LOCK = threading.RLock()


def _import_numba():
    import numba
    from .ops._numba_probe import skip_scipy_probe
    skip_scipy_probe()
    return numba


class Backend:
    """The process's kernel backend: `name` is "aot" or "jit"; `reason` says why."""

    def __init__(self):
        self.name, self.reason, self._exports = "jit", "", None
        self.where = kernel_dir()
        if os.environ.get("QNRT_JIT") == "1":
            self.reason = "QNRT_JIT=1"
        else:
            self._exports, self.reason = _load_build(kernel_dir())
            if self._exports is not None:
                self.name = "aot"
                log.info("kernels: ahead-of-time build in %s", self.where)
        if self.name == "jit":
            log.info("kernels: Numba JIT (%s)", self.reason)

    def kernel(self, py_func, options: dict):
        if self.name == "aot":
            return AotKernel(py_func, options,
                             self._exports.get((py_func.__module__, py_func.__name__), {}))
        return _import_numba().njit(**{**JIT_OPTIONS, **options})(py_func)


def _load_build(folder: str):
    """({(module, function): {key: export}}, "") for a build that matches, else (None, why)."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None, f"no ahead-of-time kernel build in {folder} (run `qnrt compile`)"
    except (OSError, ValueError) as exc:
        return None, f"unreadable kernel build manifest {path}: {exc}"
    want = {"format": FORMAT, "sources": source_hash(), "numba": numba_version(),
            "machine": machine()}
    for field, value in want.items():
        if manifest.get(field) != value:
            return None, (f"the kernel build in {folder} is for other {field} "
                          f"({manifest.get(field)!r}, here {value!r}): run `qnrt compile` again")
    lib = os.path.join(folder, manifest.get("library", ""))
    try:
        loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, lib)
        spec = importlib.util.spec_from_file_location(MODULE_NAME, lib, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except (ImportError, OSError) as exc:
        return None, f"cannot load the kernel build {lib}: {exc}"
    ranked: dict = {}  # (module, function) -> value_key -> (rank, export)
    try:
        for e in manifest["exports"]:
            table = ranked.setdefault((e["module"], e["function"]), {})
            rank = _rank(e["key"])
            for key in signature_keys(e["key"]):
                if key not in table or rank < table[key][0]:
                    table[key] = (rank, getattr(module, e["symbol"]))
        exports = {name: {k: fn for k, (_, fn) in t.items()} for name, t in ranked.items()}
    except (KeyError, TypeError, AttributeError) as exc:
        return None, f"the kernel build manifest {path} is malformed: {exc}"
    return exports, ""


def _rank(numba_key) -> tuple:
    """Which export serves a key several can take: fewest any-layout ('A') array
    parameters (contiguous code is faster), then fewest readonly-typed ones."""
    arrays = [k for k in numba_key if isinstance(k, list)]
    return (sum(k[2] == "A" for k in arrays), sum(bool(k[3]) for k in arrays))


def jit_cache_is_cold() -> bool:
    """Whether a loaded kernel module has no Numba cache index yet (its kernels
    will compile on first use). Unknown (False) with NUMBA_CACHE_DIR set."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return False
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if not name.startswith("qnrt.") or not path or not any(
                getattr(getattr(v, "py_func", None), "__module__", None) == name
                for v in vars(module).values()):
            continue  # not a module that defines kernels
        folder, stem = os.path.split(os.path.splitext(path)[0])
        if not any(f.startswith(stem + ".") and f.endswith(".nbi")
                   for f in _listdir(os.path.join(folder, "__pycache__"))):
            return True
    return False


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


_BACKEND: Backend | None = None


def backend() -> Backend:
    """The process's backend, decided at the first kernel definition."""
    global _BACKEND
    with _LOCK:
        if _BACKEND is None:
            _BACKEND = Backend()
        return _BACKEND


class JitOnly:
    """A Numba extension kernels call (qnrt.ops._numba_ext), named but not
    imported where the kernels come from the ahead-of-time build: the build
    holds it compiled in, and importing it would import numba."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def resolve(self):
        return getattr(importlib.import_module(self.module), self.name)


def jit_only(module: str, name: str):
    """The extension itself on the JIT backend; a JitOnly placeholder on "aot"
    (AotKernel.jit resolves it if a kernel must compile after all)."""
    placeholder = JitOnly(module, name)
    return placeholder.resolve() if backend().name == "jit" else placeholder


def kernel(**options):
    """Decorator: the function as a kernel of the process's backend."""
    def wrap(py_func):
        return backend().kernel(py_func, options)
    return wrap
