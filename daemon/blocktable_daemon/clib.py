"""The daemon's one door to libbt's compiled library (cffi `lib`, `ffi`, `seg._s()`).

Every direct use of the cffi library in btd is here, so that it can be routed
through the bindings' own thin layer in one place. The calls are the raw ones
on purpose: btd needs what libbt reports on a failure too (a check report's
stuck client), reads every slot every tick, and must never raise from its
loop on a value that another process scribbled into the segment.

Thread/process safety: each function is one libbt call (see bt.h for each);
the slot and segment reads are racy snapshots, as libbt documents.
"""
import enum

from blocktable import ffi, lib

# Constants btd uses, by their bt.h names.
CLIENT_FREE, CLIENT_ACTIVE, CLIENT_DEAD = lib.BT_CLIENT_FREE, lib.BT_CLIENT_ACTIVE, lib.BT_CLIENT_DEAD
CHECK_REPAIR, CHECK_FROZEN = lib.BT_CHECK_REPAIR, lib.BT_CHECK_FROZEN
EBUSY, EBADMAGIC, ECONFIG = lib.BT_EBUSY, lib.BT_EBADMAGIC, lib.BT_ECONFIG
ROW_RAW, ROW_PAGED = lib.BT_ROW_RAW, lib.BT_ROW_PAGED


class ClientState(enum.IntEnum):
    """A client slot's state word: bt.h's BT_CLIENT_*."""
    FREE = CLIENT_FREE
    ACTIVE = CLIENT_ACTIVE
    DEAD = CLIENT_DEAD
    RESERVED = lib.BT_CLIENT_RESERVED
    RECOVERING = lib.BT_CLIENT_RECOVERING


# Keys follow libbt's structs, so a field added there shows up in reports and `status`.
REPORT_KEYS = tuple(n for n, _ in ffi.typeof("bt_check_report").fields if not n.startswith("_"))
CFG_KEYS = tuple(n for n, _ in ffi.typeof("bt_config").fields if not n.startswith("_"))


def errname(rc):
    """libbt's name of an error code ("BT_EBUSY")."""
    return ffi.string(lib.bt_errname(rc)).decode()


def slot_get(seg, sid):
    """bt_client_slot_get: the cffi struct (state, pid, start_time, in_op,
    hand_count, rows, ops), or raises BtError."""
    from blocktable import BtError
    out = ffi.new("bt_client_slot_info *")
    rc = lib.bt_client_slot_get(seg._s(), sid, out)
    if rc:
        raise BtError(f"slot {sid}: {rc}")
    return out


def _report(rep):
    return {k: int(getattr(rep, k)) for k in REPORT_KEYS}


def check(seg, flags, wait_ms):
    """bt_seg_check: (rc, report dict); the report is filled on a failure too."""
    rep = ffi.new("bt_check_report *")
    rc = lib.bt_seg_check(seg._s(), flags, wait_ms, rep)
    return rc, _report(rep)


def recover_client(seg, sid, wait_ms):
    """bt_seg_recover_client: (rc, report dict)."""
    rep = ffi.new("bt_check_report *")
    rc = lib.bt_seg_recover_client(seg._s(), sid, wait_ms, rep)
    return rc, _report(rep)


def seg_info(seg):
    """bt_seg_info_get: {"size", "generation", "owner_pid"}."""
    info = ffi.new("bt_seg_info *")
    lib.bt_seg_info_get(seg._s(), info)
    return {"size": int(info.size), "generation": int(info.generation),
            "owner_pid": int(info.owner_pid)}


def proc_start_time(pid):
    """libbt's bt_proc_start_time: clock ticks since boot (never 0), the value
    libbt records in slots and segment headers; 0 if the process is gone, a
    zombie, or unreadable."""
    out = ffi.new("uint64_t *")
    return out[0] if 0 < pid < 2**31 and lib.bt_proc_start_time(pid, out) == 0 else 0
