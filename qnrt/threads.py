"""Threads inside a step: a Session's worker pool, and numpy's BLAS kept to one
thread while qnrt runs.

A kernel that splits (Kernel.parts > 1) computes disjoint pieces of its
output in `run_parts(p0, p1, ins, outs, workspace, ...)`: each piece with the
same arithmetic as the whole run, so the pieces may run in any order on any
thread and the outputs are the same bits whatever the thread count. The
parts are fixed when the kernel is built (at most MAX_PARTS), never by the
thread count. Each thread works in its own share of the kernel's scratch
(Kernel.workspace is one share; the compiler plans one per thread that can
hold a part), so one thread's plan is exactly the one-thread plan.

The workers are Python threads: the kernels release the GIL (Numba's nogil,
kept by the `qnrt compile` build's exports; the BLAS-bound kernels call
numpy's sgemm from inside Numba), so they run on separate cores. While a run is in progress numpy's BLAS is set to one thread
(its own threads would compete with the workers for the same cores) and
set back to the caller's setting when the last concurrent run ends.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import os
import threading
import warnings

from .planner import aligned

MAX_PARTS = 8  # pieces a kernel splits into at most: threads beyond this have nothing to do


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(num_threads) -> int:
    """The thread count a Session uses: num_threads, or for 0 / None every core
    the process may use (as ONNX Runtime's intra_op_num_threads=0), at most
    MAX_PARTS."""
    if num_threads is None or num_threads == 0:
        return max(1, min(available_cores(), MAX_PARTS))
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"num_threads must be a non-negative int (0: all cores), "
                         f"not {num_threads!r}")
    return min(num_threads, MAX_PARTS)


class OversubscriptionWarning(UserWarning):
    """More qnrt threads are running at once than the process has cores."""


class WorkerPool:
    """`threads - 1` daemon worker threads, started at the first call that has
    parts for them; the caller's thread is the other one. run_spans(fn, parts,
    args) hands each thread one contiguous span of range(parts) (slot: the
    thread's index, 0 for the caller's, for its share of the workspace), and
    returns when all are done (re-raising the first exception a span raised).
    Nothing is allocated per call beyond the call's own frames."""

    def __init__(self, threads: int):
        self.threads = threads
        self._job = None
        self._errors: list = []
        self._wake: list = []
        self._done: list = []
        self._workers: list = []
        self._closed = False
        self._start_lock = threading.Lock()

    def _start(self) -> None:
        with self._start_lock:
            if self._workers or self._closed:
                return
            self._wake = [threading.Lock() for _ in range(self.threads - 1)]
            self._done = [threading.Lock() for _ in range(self.threads - 1)]
            for lock in self._wake + self._done:
                lock.acquire()
            workers = [threading.Thread(target=self._work, args=(i,), daemon=True,
                                        name=f"qnrt-worker-{i + 1}")
                       for i in range(self.threads - 1)]
            for t in workers:
                t.start()
            self._workers = workers

    def _work(self, i: int) -> None:
        wake, done = self._wake[i], self._done[i]
        while True:
            wake.acquire()
            if self._closed:
                done.release()
                return
            self._drain(i + 1)
            done.release()

    def _drain(self, slot: int) -> None:
        fn, args, parts, spans = self._job
        try:
            fn(parts * slot // spans, parts * (slot + 1) // spans, slot, *args)
        except BaseException as exc:  # noqa: BLE001  (handed to the caller)
            self._errors.append(exc)

    def run_spans(self, fn, parts: int, args: tuple) -> None:
        """fn(p0, p1, slot, *args) for near-equal contiguous spans [p0, p1) of
        range(parts), one span to each thread (the caller's is slot 0), so a
        kernel makes one call per thread and may merge its neighbouring parts."""
        if not self._workers:
            self._start()
        spans = min(len(self._workers) + 1, parts)
        if spans <= 1:
            fn(0, parts, 0, *args)
            return
        self._job = (fn, args, parts, spans)
        for i in range(spans - 1):
            self._wake[i].release()
        self._drain(0)
        for i in range(spans - 1):
            self._done[i].acquire()
        self._job = None
        if self._errors:
            exc, self._errors = self._errors[0], []
            raise exc

    def close(self) -> None:
        """Ends the workers (the owning Session does this when it is collected;
        the workers hold the pool, so it is never collected while they run)."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        for i in range(len(self._workers)):
            self._wake[i].release()
        for i, t in enumerate(self._workers):
            self._done[i].acquire()
            t.join()


def slots(kernel, threads: int) -> int:
    """Shares of scratch a kernel needs on `threads` threads: one per thread
    that can have a part at once."""
    return max(1, min(kernel.parts, threads)) if kernel.workspace else 1


def parallel(run_parts, parts: int, pool: WorkerPool, slot_bytes: int = 0):
    """A callable with the serial signature (ins, outs, workspace, *rows) that
    runs run_parts(p0, p1, ins, outs, scratch, *rows) for one span of the
    parts on each of the pool's threads, each thread on its own slot_bytes of
    the workspace (all of it where slot_bytes is 0)."""
    def in_slot(p0, p1, slot, ins, outs, workspace, *rows):
        if slot_bytes:
            workspace = workspace[slot * slot_bytes:(slot + 1) * slot_bytes]
        run_parts(p0, p1, ins, outs, workspace, *rows)

    def threaded_run(*args):
        pool.run_spans(in_slot, parts, args)
    return threaded_run


# --- numpy's BLAS ----------------------------------------------------------------

class BlasThreads:
    """Sets numpy's OpenBLAS to one thread while any qnrt run is in progress
    and back to what it was when the last one ends: its own threads would
    compete with qnrt's for the cores, and its results can depend on its
    thread count (OpenBLAS's Haswell kernel on AMD Zen 3 splits a product
    into pieces that round differently), so a run's bits depend only on qnrt's
    own parts, which do not. Without an OpenBLAS that numpy loaded, it does
    nothing."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._threads_running = 0
        self._saved = None
        self._get, self._set = _openblas_functions()

    @property
    def controllable(self) -> bool:
        return self._set is not None

    def enter(self, threads: int) -> bool:
        """Returns whether the process now runs more qnrt threads than cores."""
        with self._lock:
            if self._active == 0 and self._set is not None:
                self._saved = self._get()
                if self._saved != 1:
                    self._set(1)
            self._active += 1
            self._threads_running += threads
            return self._threads_running > available_cores()

    def exit(self, threads: int) -> None:
        with self._lock:
            self._active -= 1
            self._threads_running -= threads
            if self._active == 0 and self._set is not None and self._saved not in (None, 1):
                self._set(self._saved)

    @contextlib.contextmanager
    def one_thread(self, threads: int = 1):
        """enter/exit around a block that runs kernels outside Session.run
        (tools, tests), so they compute what a run does."""
        self.enter(threads)
        try:
            yield
        finally:
            self.exit(threads)


def _openblas_functions():
    """(get, set) of the OpenBLAS numpy links to, found without importing a
    BLAS helper package; (None, None) elsewhere."""
    try:
        import numpy as np
        folder = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
        libs = sorted(glob.glob(os.path.join(folder, "*openblas*")))
        if not libs:
            from numpy import _core as core  # a system numpy: whatever it loaded
            libs = [core._multiarray_umath.__file__]
        lib = ctypes.CDLL(libs[0])
    except (ImportError, OSError, AttributeError):
        return None, None
    for get_name, set_name in (
            ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
            ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
            ("openblas_get_num_threads", "openblas_set_num_threads")):
        get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
        if get is not None and set_ is not None:
            get.restype, get.argtypes = ctypes.c_int, []
            set_.restype, set_.argtypes = None, [ctypes.c_int]
            return get, set_
    return None, None


_BLAS: BlasThreads | None = None
_BLAS_LOCK = threading.Lock()


def blas_threads() -> BlasThreads:
    """The process's one BlasThreads (numpy's BLAS is one per process)."""
    global _BLAS
    with _BLAS_LOCK:
        if _BLAS is None:
            _BLAS = BlasThreads()
        return _BLAS


def warn_oversubscribed(threads: int) -> None:
    warnings.warn(f"qnrt sessions are running more threads at once than the "
                  f"{available_cores()} cores this process has (this one uses {threads}); "
                  "they slow each other down: give each Session fewer num_threads",
                  OversubscriptionWarning, stacklevel=3)


def threaded(kernel, pool: WorkerPool | None):
    """The kernel with run (and run_rows) spreading its parts over the pool's
    threads, each with its own share of a workspace of slots(kernel) x
    aligned(kernel.workspace) bytes (the compiler plans that much); the kernel
    itself where it does not split or there is no pool."""
    if pool is None or pool.threads == 1 or kernel.parts <= 1 or kernel.run_parts is None:
        return kernel
    run = parallel(kernel.run_parts, kernel.parts, pool, aligned(kernel.workspace))
    return dataclasses.replace(kernel, run=run, workspace=threaded_workspace(kernel, pool.threads),
                               run_rows=run if kernel.run_rows is not None else None)


def threaded_workspace(kernel, threads: int) -> int:
    """The scratch bytes a kernel needs on `threads` threads."""
    n = slots(kernel, threads)
    return kernel.workspace if n == 1 else aligned(kernel.workspace) * n
