"""A deterministic data-race detector for the Numba CUDA simulator (in the spirit of ``compute-sanitizer
--tool racecheck``), plus a fix for the simulator's own shared-array race. Import before any kernel runs.

The simulator runs every CUDA thread of a block as a Python thread, so a missing ``syncthreads`` shows up
only when the interpreter happens to switch threads inside the unsynchronised window: once in a while, as
in issue 7 item 2. This module makes such a fault fail on *every* run instead. Each thread counts the
barriers it has passed (its *epoch*; all threads of a block are in the same epoch between two barriers),
and every element access inside a kernel, to shared memory (``cuda.shared.array``) and to global memory
(kernel arguments and their views), is recorded per byte address. Two accesses of one element in the same
epoch by different threads, at least one a write, are a race (read-after-write, write-after-read,
write-after-write) whatever order the scheduler ran them in; so is an element of global memory written by
one block and touched by another in the same launch (blocks cannot synchronise), and a block whose threads
pass different numbers of barriers (a divergent ``syncthreads``). A race raises :class:`RaceError` naming both
source lines.

The simulator itself had a race that made issue 7 item 2's failure: ``FakeCUDAShared.array`` looks the
allocation up by call site and creates it when missing, unsynchronised (check, then set), so two threads
that reach the line together can each get their own private "shared" array and compute with the other
threads' values missing. Here the look-up holds a lock, so every thread of a block gets the same array.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
from numba.core import types
from numba.cuda.simulator import kernel as _kernel
from numba.cuda.simulator import kernelapi as _api
from numba.cuda.simulator.cudadrv import devicearray as _devarray
from numba.np import numpy_support


class RaceError(AssertionError):
    """Two threads (or blocks) touched one element between the same pair of barriers, one of them writing."""


_lock = threading.RLock()
_intra: dict[int, list] = {}  # address -> [epoch, writer tid | None, writer site, {reader tid: site}]
_inter: dict[int, list] = {}  # address -> [writer block | None, {reader block}] within one launch
_exits: list[tuple] = []  # (block, tid, epoch at exit) of the current block
#: Counts block runs. A thread records accesses and its exit only while the block run that started it is the
#: current one: when a kernel raises, the simulator aborts the block's other threads without joining them, and
#: such a thread, finishing late on a loaded machine, must not report into a later launch's block (a stale exit
#: after 29 barriers once failed a one-barrier kernel as "divergent syncthreads").
_generation = [0]
_enabled = [True]
stats = {"accesses": 0, "launches": 0}


def _site(depth: int) -> str:
    f = sys._getframe(depth)
    while f is not None and (f.f_code.co_filename == __file__ or "/simulator/" in f.f_code.co_filename):
        f = f.f_back
    return f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno} ({f.f_code.co_name})" if f else "?"


def _addresses(ary: np.ndarray, idx) -> list[int] | None:
    """Byte addresses of the elements ``ary[idx]`` touches, or None when ``idx`` only makes a view."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    base = ary.__array_interface__["data"][0]
    if len(idx) == ary.ndim and all(isinstance(i, (int, np.integer)) for i in idx):
        off = 0
        for i, n, s in zip(idx, ary.shape, ary.strides):
            off += (int(i) + n if i < 0 else int(i)) * s
        return [base + off]
    return None


def _record(addrs, write: bool, shared: bool) -> None:
    t = threading.current_thread()
    if not _enabled[0] or not isinstance(t, _kernel.BlockThread) or addrs is None:
        return
    if getattr(t, "_rc_generation", None) != _generation[0]:
        return  # a thread of an earlier, aborted block run
    epoch, tid, block = getattr(t, "_rc_epoch", 0), t.thread_id, tuple(t.blockIdx)
    with _lock:
        stats["accesses"] += len(addrs)
        for a in addrs:
            rec = _intra.get(a)
            if rec is None or rec[0] != epoch:
                rec = _intra[a] = [epoch, None, None, {}]
            if rec[1] is not None and rec[1] != tid:
                kind = "write-after-write" if write else "read-after-write"
                raise RaceError(f"{kind} race in block {block} between barriers {epoch} and {epoch + 1}: thread "
                                f"{tid} at {_site(3)} and thread {rec[1]} at {rec[2]} (missing syncthreads?)")
            if write:
                others = [(r, s) for r, s in rec[3].items() if r != tid]
                if others:
                    raise RaceError(f"write-after-read race in block {block} between barriers {epoch} and "
                                    f"{epoch + 1}: thread {tid} writes at {_site(3)} what thread {others[0][0]} "
                                    f"read at {others[0][1]} (missing syncthreads?)")
                rec[1], rec[2] = tid, _site(3)
            elif tid not in rec[3]:
                rec[3][tid] = _site(3)
            if shared:
                continue
            g = _inter.setdefault(a, [None, set()])
            if (g[0] is not None and g[0] != block) or (write and g[1] - {block}):
                raise RaceError(f"inter-block race: block {block} {'writes' if write else 'reads'} at {_site(3)} "
                                f"global memory that another block of the same launch wrote or read")
            if write:
                g[0] = block
            else:
                g[1].add(block)


class _Shared:
    """A shared array as the kernel sees it: numpy storage, every element access recorded."""

    __slots__ = ("_ary",)

    def __init__(self, ary: np.ndarray):
        self._ary = ary

    shape = property(lambda self: self._ary.shape)
    ndim = property(lambda self: self._ary.ndim)
    dtype = property(lambda self: self._ary.dtype)
    size = property(lambda self: self._ary.size)

    def __len__(self):
        return len(self._ary)

    def __getitem__(self, idx):
        addrs = _addresses(self._ary, idx)
        if addrs is None:
            return _Shared(self._ary[idx])
        _record(addrs, False, True)
        return self._ary[idx]

    def __setitem__(self, idx, val):
        addrs = _addresses(self._ary, idx)
        if addrs is None:
            view = self._ary[idx]
            addrs = [view.__array_interface__["data"][0] + int(np.dot(i, view.strides)) for i in np.ndindex(view.shape)]
        _record(addrs, True, True)
        self._ary[idx] = val


def _shared_array(self, shape, dtype, alignment=None):
    """``cuda.shared.array``: one array per call site and launch, created under a lock (see module doc)."""
    if alignment is not None:
        raise RuntimeError("Array alignment is not supported in cudasim")
    if isinstance(dtype, types.Type):
        dtype = numpy_support.as_dtype(dtype)
    if shape == 0:
        raise NotImplementedError("dynamic shared memory is not used by mesagen kernels")
    f = sys._getframe(1)
    caller = (f.f_code.co_filename, f.f_lineno)
    with _lock:
        res = self._allocations.get(caller)
        if res is None:
            res = self._allocations[caller] = _Shared(np.empty(shape, dtype))
    return res


_orig_get, _orig_set = _devarray.FakeCUDAArray.__getitem__, _devarray.FakeCUDAArray.__setitem__


def _get(self, idx):
    _record(_addresses(self._ary, idx), False, False)
    return _orig_get(self, idx)


def _set(self, idx, val):
    addrs = _addresses(self._ary, idx)
    if addrs is None and isinstance(threading.current_thread(), _kernel.BlockThread):
        view = self._ary[idx]
        addrs = [view.__array_interface__["data"][0] + int(np.dot(i, view.strides)) for i in np.ndindex(view.shape)]
    _record(addrs, True, False)
    return _orig_set(self, idx, val)


_orig_sync = _kernel.BlockThread.syncthreads
_orig_thread_run = _kernel.BlockThread.run
_orig_block_run = _kernel.BlockManager.run
_orig_call = _kernel.FakeCUDAKernel.__call__


def _syncthreads(self):
    _orig_sync(self)
    self._rc_epoch = getattr(self, "_rc_epoch", 0) + 1


def _thread_run(self):
    self._rc_generation = _generation[0]
    _orig_thread_run(self)
    with _lock:
        if self._rc_generation == _generation[0]:
            _exits.append((tuple(self.blockIdx), self.thread_id, getattr(self, "_rc_epoch", 0)))


def _block_run(self, grid_point, *args):
    with _lock:
        _generation[0] += 1
        _intra.clear()
        _exits.clear()
    _orig_block_run(self, grid_point, *args)
    epochs = {e for _, _, e in _exits}
    if _enabled[0] and len(epochs) > 1:
        raise RaceError(f"divergent syncthreads in block {grid_point}: threads passed {sorted(epochs)} barriers")


def _call(self, *args):
    if not self._device and _kernel._kernel_context is None:
        with _lock:
            _inter.clear()
            stats["launches"] += 1
    return _orig_call(self, *args)


_api.FakeCUDAShared.array = _shared_array
_devarray.FakeCUDAArray.__getitem__ = _get
_devarray.FakeCUDAArray.__setitem__ = _set
_kernel.BlockThread.syncthreads = _syncthreads
_kernel.BlockThread.run = _thread_run
_kernel.BlockManager.run = _block_run
_kernel.FakeCUDAKernel.__call__ = _call
