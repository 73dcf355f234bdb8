"""What the GPU modules share: importing cupy on demand, the errors, streams,
device UUIDs, and watching another process for its death.

Nothing here imports cupy at module load: `import blocktable.gpu` works on a
machine without CUDA, and the first call that needs the GPU raises
GpuUnavailable with the reason.
"""
import ctypes
import errno
import os
import select
import sys

from .._errors import BtError
from .._lib import proc_start_time  # noqa: F401  (re-exported for gpu/)

__all__ = ["GpuUnavailable", "MirrorGone", "MirrorNotFound", "cupy", "device_uuid",
           "device_by_uuid", "stream_ptr", "proc_start_time", "ProcWatch"]


class GpuUnavailable(BtError, RuntimeError):
    """No usable GPU here: cupy is missing, or CUDA found no device."""
    code = -errno.ENODEV


class MirrorGone(BtError):
    """The mirror this handle opened is gone: its exporter died or retired it,
    or republished it (a new generation). Views made from the handle must not
    be used any more; call ``reopen()`` (or ``Mirror.open`` again) once an
    exporter has published the mirror anew."""
    code = -errno.ESTALE


class MirrorNotFound(BtError, LookupError):
    """No published mirror matches (none for this device, or its device is
    not visible in this process)."""
    code = -errno.ENOENT


def _err(cls, msg):
    e = cls(f"{cls.__name__}: {msg}")
    e.detail = msg
    return e


_cp = None


def cupy():
    """The cupy module, or GpuUnavailable saying why not."""
    global _cp
    if _cp is None:
        try:
            import cupy as cp
        except Exception as e:  # ImportError, or a CUDA library that fails to load
            raise _err(GpuUnavailable, f"cupy could not be imported ({e}); "
                                       "install blocktable[gpu] (cupy-cuda13x)") from e
        try:
            n = cp.cuda.runtime.getDeviceCount()
        except Exception as e:
            raise _err(GpuUnavailable, f"CUDA found no usable device ({e})") from e
        if n < 1:
            raise _err(GpuUnavailable, "CUDA found no device")
        _cp = cp
    return _cp


def gpu_available():
    """(True, "") or (False, why): for tests and examples to skip with a reason."""
    try:
        cupy()
        return True, ""
    except GpuUnavailable as e:
        return False, str(e)


def stream_ptr(stream):
    """The raw cudaStream_t of `stream`: a cupy Stream, a torch Stream, an
    int, or None for the caller's current stream (torch's if torch has
    initialised CUDA in this process, else cupy's; both are the legacy
    default stream unless someone changed them)."""
    if stream is None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            try:     # what torch.cuda.current_stream() reads, without building a Stream
                C = torch._C
                return C._cuda_getCurrentRawStream(C._cuda_getDevice())
            except AttributeError:
                return torch.cuda.current_stream().cuda_stream
        return cupy().cuda.get_current_stream().ptr
    if hasattr(stream, "ptr"):
        return stream.ptr
    if hasattr(stream, "cuda_stream"):
        return stream.cuda_stream
    return int(stream)


# ---- device UUIDs -----------------------------------------------------------
# cupy's getDeviceProperties(i)['uuid'] goes through a Cython char[16] -> bytes
# conversion that stops at the first zero byte (cupy works around the same bug
# for IPC handles). The driver's cuDeviceGetUuid gives all 16 bytes; cupy's
# value, zero-padded, is the fallback. Exporter and opener use this same
# function, so both sides agree either way.
_libcuda = None
_uuids = {}


def _driver_uuid(ordinal):
    global _libcuda
    if _libcuda is None:
        _libcuda = ctypes.CDLL("libcuda.so.1")
        if _libcuda.cuInit(0) != 0:
            raise OSError("cuInit failed")
    dev = ctypes.c_int()
    if _libcuda.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
        raise OSError(f"cuDeviceGet({ordinal}) failed")
    buf = (ctypes.c_ubyte * 16)()
    fn = getattr(_libcuda, "cuDeviceGetUuid_v2", None) or _libcuda.cuDeviceGetUuid
    if fn(buf, dev) != 0:
        raise OSError("cuDeviceGetUuid failed")
    return bytes(buf)


def device_uuid(ordinal):
    """The 16-byte UUID of the visible device `ordinal` (CUDA_VISIBLE_DEVICES
    numbering of this process)."""
    u = _uuids.get(ordinal)
    if u is None:
        try:
            u = _driver_uuid(ordinal)
        except (OSError, AttributeError):
            raw = cupy().cuda.runtime.getDeviceProperties(ordinal).get("uuid", b"")
            u = bytes(raw)[:16].ljust(16, b"\0")
        _uuids[ordinal] = u
    return u


def device_by_uuid(uuid):
    """This process's ordinal of the device with that UUID, or None."""
    uuid = bytes(uuid)[:16]
    for i in range(cupy().cuda.runtime.getDeviceCount()):
        if device_uuid(i) == uuid:
            return i
    return None


def uuid_str(uuid):
    h = bytes(uuid).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ---- processes --------------------------------------------------------------


class ProcWatch:
    """Is process (pid, start time) still the one we saw? A pidfd where the
    kernel has them (race-free, one poll to ask), else kill(pid, 0) and the
    start time (which defeats pid reuse)."""
    __slots__ = ("pid", "start", "_fd", "_poll", "_dead")

    def __init__(self, pid, start):
        self.pid, self.start, self._fd, self._poll, self._dead = pid, start, None, None, False
        if pid <= 0:
            self._dead = True
            return
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = None
        # Checked after the pidfd is taken: if the start time matches now, the
        # pidfd refers to that very process.
        if not start or proc_start_time(pid) != start:
            if fd is not None:
                os.close(fd)
            self._dead = True
            return
        if fd is not None:
            self._fd = fd
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)

    def alive(self):
        if self._dead:
            return False
        if self._poll is not None:
            if self._poll.poll(0):
                self._dead = True
        elif proc_start_time(self.pid) != self.start:
            self._dead = True
        return not self._dead

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._poll = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
