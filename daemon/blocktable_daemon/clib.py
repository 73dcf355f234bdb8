"""btd's use of libbt, all of it here, through the bindings' one door to C
(blocktable._lib). The calls return result codes rather than raise where btd
must see them: btd needs what libbt reports on a failure too (a check report's
stuck client), reads every slot every tick, and must never raise from its
loop on a value that another process scribbled into the segment.

Thread/process safety: each function is one libbt call (see bt.h for each);
the slot and segment reads are racy snapshots, as libbt documents.
"""
from __future__ import annotations

import enum
from typing import Any

from blocktable import _lib
from blocktable._lib import proc_start_time  # noqa: F401  (btd's callers import it here)
from blocktable import Segment

# Constants btd uses, by their bt.h names.
CLIENT_FREE, CLIENT_ACTIVE, CLIENT_DEAD = _lib.BT_CLIENT_FREE, _lib.BT_CLIENT_ACTIVE, _lib.BT_CLIENT_DEAD
CHECK_REPAIR, CHECK_FROZEN = _lib.BT_CHECK_REPAIR, _lib.BT_CHECK_FROZEN
EBUSY, EBADMAGIC, ECONFIG = _lib.BT_EBUSY, _lib.BT_EBADMAGIC, _lib.BT_ECONFIG
ROW_RAW, ROW_PAGED = _lib.BT_ROW_RAW, _lib.BT_ROW_PAGED


class ClientState(enum.IntEnum):
    """A client slot's state word: bt.h's BT_CLIENT_*."""
    FREE = CLIENT_FREE
    ACTIVE = CLIENT_ACTIVE
    DEAD = CLIENT_DEAD
    RESERVED = _lib.BT_CLIENT_RESERVED
    RECOVERING = _lib.BT_CLIENT_RECOVERING


# Keys follow libbt's structs, so a field added there shows up in reports and `status`.
REPORT_KEYS = tuple(_lib.struct_fields("bt_check_report"))
CFG_KEYS = tuple(_lib.struct_fields("bt_config"))


def errname(rc: int) -> str:
    """libbt's name of an error code ("BT_EBUSY")."""
    return _lib.errname(rc)


def slot_get(seg: Segment, sid: int) -> Any:
    """bt_client_slot_get: the cffi struct (state, pid, start_time, in_op,
    hand_count, rows, ops), or raises BtError."""
    return _lib.client_slot_get(_lib.seg_handle(seg), sid)


def _report(rep: Any) -> dict[str, int]:
    return {k: int(getattr(rep, k)) for k in REPORT_KEYS}


def check(seg: Segment, flags: int, wait_ms: int) -> tuple[int, dict[str, int]]:
    """bt_seg_check: (rc, report dict); the report is filled on a failure too."""
    rc, rep = _lib.seg_check(_lib.seg_handle(seg), flags, wait_ms)
    return rc, _report(rep)


def recover_client(seg: Segment, sid: int, wait_ms: int) -> tuple[int, dict[str, int]]:
    """bt_seg_recover_client: (rc, report dict)."""
    rc, rep = _lib.seg_recover_client(_lib.seg_handle(seg), sid, wait_ms)
    return rc, _report(rep)


def seg_info(seg: Segment) -> dict[str, int]:
    """bt_seg_info_get: {"size", "generation", "owner_pid"}."""
    info = _lib.seg_info(_lib.seg_handle(seg))
    return {"size": int(info.size), "generation": int(info.generation),
            "owner_pid": int(info.owner_pid)}
