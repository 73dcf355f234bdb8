"""Page-locking this process's mapping of a segment (cudaHostRegister), once.

A host-to-device copy from pageable memory goes through a driver bounce
buffer and cannot overlap with the host (DESIGN.md measured 7 GB/s pageable
against 52 GB/s from registered /dev/shm on an H100). Each process registers
its own mapping: registration is per virtual address range, so what one
process registered does nothing for another.

Registration keeps the mapping alive (a reference to the Segment's base
pointer) until ``unregister``: an unmapped range that stayed registered could
be mapped again at the same address and then be taken for pinned memory.
Where registration fails (no CUDA, a kernel or sandbox that refuses to pin
shared memory, RLIMIT_MEMLOCK), copies stay correct from pageable memory and
a warning says so, once per mapping.
"""
import os
import threading
import warnings

from ._cuda import cupy

__all__ = ["register_segment", "register", "unregister", "is_registered"]

HOST_REGISTER_PORTABLE = 1   # cudaHostRegisterPortable: pinned for every context
HOST_REGISTER_MAPPED = 2     # cudaHostRegisterMapped: also readable by kernels
_ALREADY = 712               # cudaErrorHostMemoryAlreadyRegistered

_lock = threading.Lock()
_reg = {}                    # address -> (size, pid, keepalive)
_failed = {}                 # address -> reason


def seg_address(seg):
    return seg.address


def register(ptr, size, keepalive=None, flags=HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED):
    """Page-lock [ptr, ptr+size) for this process. True if pinned (now or
    before); False, with a RuntimeWarning the first time, if CUDA refused."""
    pid = os.getpid()
    with _lock:
        r = _reg.get(ptr)
        if r is not None and r[1] == pid:
            return True
        if _failed.get(ptr, (None, None))[1] == pid:
            return False
        rt = cupy().cuda.runtime
        try:
            rt.hostRegister(ptr, size, flags)
        except rt.CUDARuntimeError as e:
            if e.status != _ALREADY:
                _failed[ptr] = (str(e), pid)
                warnings.warn(f"blocktable.gpu: cudaHostRegister of {size} bytes at {ptr:#x} "
                              f"failed ({e}); host-to-device copies from it stay pageable "
                              "(slower, and synchronous with the host)",
                              RuntimeWarning, stacklevel=3)
                return False
        _reg[ptr] = (size, pid, keepalive)
        return True


def register_segment(seg):
    """Register the Segment's whole mapping (the table, the counts and the
    rest) once per process. Returns True if it is pinned."""
    return register(seg_address(seg), seg.info.size, keepalive=seg._base)


def is_registered(seg_or_ptr):
    ptr = seg_or_ptr if isinstance(seg_or_ptr, int) else seg_address(seg_or_ptr)
    r = _reg.get(ptr)
    return r is not None and r[1] == os.getpid()


def unregister(seg_or_ptr):
    """Undo register (the mapping may then go when its last view does)."""
    ptr = seg_or_ptr if isinstance(seg_or_ptr, int) else seg_address(seg_or_ptr)
    with _lock:
        r = _reg.pop(ptr, None)
        if r is not None and r[1] == os.getpid():
            cupy().cuda.runtime.hostUnregister(ptr)


def _after_fork_in_child():
    # Registrations belong to the parent's CUDA state; the child starts bare.
    _reg.clear()
    _failed.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
