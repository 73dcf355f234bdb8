"""Layer 3: Segment, Client and StepPlan, the classes over libbt's handles.

They reach C only through the door, blocktable._lib (the guard, argument
conversion and result codes are written there once). The per-call methods
have a fast path: plain integers (the INTS_ONLY test, see _lib), the array
they were given last time (its C view kept), the bare C function, and an
error built only when the result is nonzero; anything else goes through the
checked path, which names the argument at fault. Array arguments go to C
through a C view without a copy when they already are contiguous arrays of
the C type (see _types.c_array), lists through array.array.
"""
from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any, Callable, overload

import numpy as np

from . import _lib
from ._errors import make_error
from ._lib import BtTypeError, as_int as _int, arg_error as _arg_error, \
    count_error as _count_error, range_error as _range_error, fail as _fail, \
    seg_handle as _seg_handle, call as _call, check as _check
from ._types import (I32, I64, U32, U64, BlockInfo, CheckReport, ClientSlotInfo,
                     RowInfo, SegmentInfo, SegmentConfig, as_array, c_array, c_out, cbuf,
                     from_struct, out_array, preview)
from ._types import I32Array, I64Array, IntsLike, U32Array, U64Array

if TYPE_CHECKING:
    from .cache import CachePool

__all__ = ["Segment", "Client", "StepPlan", "SlotParams", "ROW_MANAGED", "ROW_RAW", "ROW_PAGED",
           "BtTypeError"]

ROW_MANAGED: int = _lib.BT_ROW_MANAGED
ROW_RAW: int = _lib.BT_ROW_RAW
ROW_PAGED: int = _lib.BT_ROW_PAGED
_EINVAL, _ERANGE, _ECLIENT = _lib.BT_EINVAL, _lib.BT_ERANGE, _lib.BT_ECLIENT
_NO_ROWS = np.empty(0, U32)
_NO_ROWS_C = _lib.from_buffer("uint32_t[]", _NO_ROWS)
_SCRATCH_MAX = 1 << 16  # entries of a client's step buffer (grown on demand)
_NONE = object()        # "no array cached yet" (never an argument)

# The per-call C functions, bare (see _lib): locals of the hot methods.
_alloc_c, _release_c, _share_c = _lib.blocks_alloc, _lib.blocks_release, _lib.blocks_share
_claim_c, _release_row_c = _lib.row_claim, _lib.row_release
_append_c, _append_shared_c, _alloc_append_c = _lib.row_append, _lib.row_append_shared, \
    _lib.row_alloc_append
_set_row_c, _truncate_c, _set_block_c = _lib.row_set, _lib.row_truncate, _lib.row_set_block
_punch_c, _set_tokens_c = _lib.row_punch, _lib.row_set_tokens
_move_c, _swap_c, _step_c = _lib.row_move, _lib.row_swap, _lib.step_ex
_step_run_c = _lib.step_run
_slots_row_c, _slots_qsl_c = _lib.slots_row, _lib.slots_qsl
# slots_qsl's cache: (qsl, positions, out, rows, num_reqs, room, qsl C view,
# rows C view, positions C view, out C view, last n, out[:last n]).
_QSL_NONE: tuple[Any, ...] = (_NONE, _NONE, _NONE, _NONE, 0, 0, None, None, None, None, -1, None)

# Every open Client, so that a forked child can disown its parent's handles.
_live_clients = weakref.WeakSet()


def _after_fork_in_child():
    """A client is one registered process: the child must not use or close
    the parent's. Detaching the destructor leaks a few bytes of malloc in the
    child and touches nothing shared (bt_client_close would agree, this just
    does not depend on it)."""
    for c in list(_live_clients):
        c._disown(f"opened by pid {c._pid}, unusable in forked child {os.getpid()}")
    _live_clients.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Closed:
    """Stands in for a closed Segment's views: any use says why."""
    __slots__ = ("what",)

    def __init__(self, what):
        self.what = what

    def _raise(self, *a, **k):
        raise make_error(_EINVAL, f"the segment is closed (its {self.what} view is gone)")

    __getitem__ = __setitem__ = __len__ = __iter__ = __array__ = _raise

    def __getattr__(self, name):
        self._raise()

    def __repr__(self):
        return f"<{self.what} of a closed segment>"


def _gather_arg(arr, dtype, ctype, what):
    if not (isinstance(arr, np.ndarray) and arr.dtype == dtype and arr.flags.c_contiguous):
        raise make_error(_EINVAL, f"{what}: a C-contiguous {np.dtype(dtype).name} array is needed")
    return _lib.from_buffer(ctype, arr)


class SlotParams:
    """Parameters of slot mapping (bt_slot_params), built once and reused.

    block_size: the unit of the stored ids (0 = the segment's block size; the
    kernel block size for tables of kernel-block ids). cp_world/cp_rank/
    cp_interleave: decode context parallelism; positions that are not this
    rank's map to -1. Checked by libbt at each call (InvalidArgument)."""
    __slots__ = ("c", "block_size", "cp_world", "cp_rank", "cp_interleave")

    def __init__(self, block_size: int = 0, cp_world: int = 1, cp_rank: int = 0,
                 cp_interleave: int = 1) -> None:
        self.c = _lib.new("bt_slot_params *")
        block_size, cp_world, cp_rank, cp_interleave = _lib.ints(
            "SlotParams", ("block_size", block_size, "u32"), ("cp_world", cp_world, "u32"),
            ("cp_rank", cp_rank, "u32"), ("cp_interleave", cp_interleave, "u32"))
        self.c.block_size, self.c.cp_world = block_size, cp_world
        self.c.cp_rank, self.c.cp_interleave = cp_rank, cp_interleave
        self.block_size, self.cp_world = block_size, cp_world
        self.cp_rank, self.cp_interleave = cp_rank, cp_interleave

    def __repr__(self) -> str:
        return (f"SlotParams(block_size={self.block_size}, cp_world={self.cp_world}, "
                f"cp_rank={self.cp_rank}, cp_interleave={self.cp_interleave})")


class Segment:
    """A blocktable segment mapped in this process (bt_seg).

    ``Segment.create(name=None)`` makes an embedded segment on a private
    mapping (no other process can see it); with a name, a POSIX shared-memory
    object "/dev/shm/bt.<name>" that other processes open with
    ``Segment.attach(name)``. The creator removes the name with
    ``Segment.unlink(name)`` (closing never unlinks). libbt owns the shm
    object, not multiprocessing.shared_memory, so Python's resource tracker
    never unlinks it behind our back.

    Zero-copy numpy views of the shared arrays: ``table`` int32
    [num_rows, row_width], ``num_blocks`` int32 [num_rows], ``num_tokens``
    int64 [num_rows]. They are read-only (writes go through a Client, which
    keeps counts, reference counts and the seqlock right) and see every write
    made by any process at once, without a consistency guarantee for a row
    being written: use ``read_row`` for that. The mapping lives as long as the
    Segment or any view made from it, so a view never points at unmapped
    memory; ``close()`` closes the Segment's clients and the handle.

    Thread and process safety: any number of threads and processes may use
    one segment at once. Errors: BtError subclasses (see blocktable.errors);
    a call that raised changed nothing.
    """

    __slots__ = ("_seg", "_base", "name", "info", "config", "table", "num_blocks",
                 "num_tokens", "_clients", "_params", "_outc", "_qslc", "__weakref__")

    def __init__(self, raw: Any, name: str | None) -> None:
        """Private: use create() or attach()."""
        # The mapping is owned by this gc'd pointer; every view made with
        # _lib.buffer keeps it alive, and bt_seg_close runs after the last.
        self._base = _lib.seg_mapping(raw)
        self._seg = raw
        self.name = name
        self.info = SegmentInfo._from_c(_lib.seg_info(raw))
        self.config = self.info.config
        self._clients = weakref.WeakSet()
        self._params = SlotParams()
        self._outc = (_NONE, None, 0)   # slots_row's last `out` and its C view
        self._qslc: tuple[Any, ...] = _QSL_NONE  # slots_qsl's last arrays and their C views
        self.table, self.num_blocks, self.num_tokens = self.views(writable=False)

    # ---- life cycle ---------------------------------------------------------
    @classmethod
    def create(cls, name: str | None = None, config: SegmentConfig | None = None,
               group: bool = False, exclusive: bool = True) -> Segment:
        """Create a segment. name None: embedded (private). config: a
        SegmentConfig (default: SegmentConfig()). group: mode 0660 instead of
        0600. exclusive False: an existing segment of that name is attached
        (and validated) instead of failing with FileExistsError.
        Errors: ConfigError, BadName, FileExistsError, PermissionError."""
        cfg = (config or SegmentConfig()).check()
        flags = (_lib.BT_CREATE_EXCL if exclusive else 0) | (_lib.BT_CREATE_GROUP if group else 0)
        return cls(_lib.seg_create(name, cfg, flags), name)

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Attach to a named segment, validating its header.
        Errors: BadName, FileNotFoundError, PermissionError, BadMagic,
        VersionMismatch, Corrupt."""
        return cls(_lib.seg_attach(name), name)

    @staticmethod
    def unlink(name: str) -> None:
        """Remove a segment's name; mappings stay valid until closed.
        Errors: FileNotFoundError, BadName."""
        _lib.seg_unlink(name)

    def close(self) -> None:
        """Close this segment's clients (releasing what they hold) and the
        handle. Idempotent. The mapping goes when the last view does."""
        if self._seg is None:
            return
        for c in list(self._clients):
            c.close()
        # Unmapped now unless a view made earlier is still alive.
        self._seg = self._base = None
        self._outc = (_NONE, None, 0)
        self._qslc = _QSL_NONE
        self.table, self.num_blocks, self.num_tokens = \
            _Closed("table"), _Closed("num_blocks"), _Closed("num_tokens")  # type: ignore[assignment]

    @property
    def closed(self) -> bool:
        return self._seg is None

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._seg is None else f"{self.info.size} bytes"
        return f"<blocktable.Segment {self.name or '(embedded)'} {state}>"

    def _s(self):
        """The bt_seg * handle (the door's guard: InvalidArgument once closed)."""
        return _seg_handle(self)

    @property
    def address(self) -> int:
        """The address of this process's mapping (pinning, mirror keys)."""
        self._s()
        return _lib.address(self._base)

    def views(self, writable: bool = False) -> tuple[I32Array, I32Array, I64Array]:
        """(table, num_blocks, num_tokens) as numpy views over the mapping.
        writable=True lets you write behind libbt's back: only for code that
        knows it keeps the invariants (e.g. a tensor handed to torch)."""
        self._s()
        i, c = self.info, self.config
        buf = _lib.buffer(self._base, i.size)
        table = np.frombuffer(buf, I32, c.num_rows * c.row_width, i.table_offset)
        nblocks = np.frombuffer(buf, I32, c.num_rows, i.nblocks_offset)
        ntokens = np.frombuffer(buf, I64, c.num_rows, i.ntokens_offset)
        views = (table.reshape(c.num_rows, c.row_width), nblocks, ntokens)
        for v in views:
            v.flags.writeable = writable
        return views

    # ---- clients ------------------------------------------------------------
    def client(self) -> Client:
        """Register this process as a new client (bt_client_open).
        Errors: OutOfClients, Frozen."""
        return Client(self, _lib.client_open(self._s()))

    def reserve_client(self, pid: int, start_time: int = 0) -> int:
        """Reserve a slot for process pid (the daemon's half of registration);
        returns the slot id for adopt_client."""
        return _lib.client_reserve(self._s(), pid, start_time)

    def unreserve_client(self, slot: int, pid: int) -> None:
        """Free a slot reserved for pid that nobody adopted (the daemon's
        undo of reserve_client). Errors: ClientGone (adopted meanwhile, or
        not pid's), OutOfRange."""
        _lib.client_unreserve(self._s(), slot, pid)

    def adopt_client(self, slot: int) -> Client:
        """Take over a slot reserved for this process. Errors: ClientGone
        when the slot is not reserved for it (a slot a live client of this
        process holds is left untouched), OutOfRange."""
        raw = _lib.client_adopt(self._s(), slot,
                                f"not a slot reserved for pid {os.getpid()}; "
                                "a slot a client of this process holds is left untouched")
        return Client(self, raw)

    def client_slot(self, client_id: int) -> ClientSlotInfo:
        """ClientSlotInfo of slot client_id (a racy snapshot)."""
        return from_struct(ClientSlotInfo, _lib.client_slot_get(self._s(), client_id))

    # ---- blocks -------------------------------------------------------------
    def free_blocks(self, pool: int = 0) -> int:
        """Free blocks in `pool` (a racy snapshot while others allocate)."""
        return _lib.pool_free_count(self._s(), pool)

    def free_chunks(self) -> int:
        """Free chunks in the paged rows' chunk pool (snapshot)."""
        return _lib.chunks_free(self._s())

    def block(self, block_id: int) -> BlockInfo:
        """BlockInfo snapshot (reference count, owner stamp) of one block."""
        if type(block_id) is not int:
            block_id = _int(block_id, "block_id")
        ref, owner = _lib.block_get(self._s(), block_id)
        return BlockInfo(block_id, ref, owner)

    def pool_pop(self, pool: int, n: int, stamp: int = 0,
                 out: I32Array | None = None) -> I32Array:
        """Raw pool pop (no client protocol; see bt.h): benchmarks and tests."""
        pool, n, stamp = _int(pool, "pool"), _int(n, "n"), _int(stamp, "stamp")
        seg = self._s()
        if not 0 <= n <= self.info.total_blocks:
            raise make_error(_ERANGE, f"pool_pop(n={n}): n must be in [0, {self.info.total_blocks}]")
        out = out_array(out, n, I32)
        ob = cbuf(out)
        _lib.pool_pop(seg, pool, n, stamp, ob)
        return out[:n]

    def pool_push(self, ids: IntsLike) -> None:
        a = as_array(ids, I32, "ids")
        _lib.pool_push(self._s(), cbuf(a), a.shape[0], f"pool_push(ids={preview(a)})")

    # ---- rows -----------------------------------------------------------------
    def find_row(self, key: int) -> int:
        """The claimed row holding `key` (bt_row_find); FileNotFoundError if none."""
        return _lib.row_find(self._s(), key)

    def gather_rows(self, keys: U64Array, hints: U64Array, out: I32Array,
                    nblocks: I32Array | None = None) -> I32Array:
        """bt_rows_gather: out[i, :] <- the row claimed with keys[i] (zeros past
        its count); returns nblocks (int32, -1 where no row holds the key).
        keys, hints: uint64 arrays of n; hints are read and rewritten (0 =
        unknown); out: a C-contiguous int32 [>= n, width] array."""
        n = len(keys)
        if out.ndim != 2 or out.shape[0] < n:
            raise make_error(_EINVAL, f"out has shape {out.shape}, need ({n}, width)")
        if len(hints) < n:
            raise make_error(_EINVAL, f"{len(hints)} hints for {n} keys")
        nblocks = np.empty(n, I32) if nblocks is None else nblocks
        if len(nblocks) < n:
            raise make_error(_EINVAL, f"nblocks holds {len(nblocks)} entries for {n} keys")
        rc = _lib.rows_gather(self._s(), _gather_arg(keys, U64, "uint64_t[]", "keys"), n,
                              _gather_arg(hints, U64, "uint64_t[]", "hints"),
                              _gather_arg(out, I32, "int32_t[]", "out"), out.shape[1],
                              _gather_arg(nblocks, I32, "int32_t[]", "nblocks"))
        if rc:
            raise _fail(rc, f"gather_rows(n={n})")
        return nblocks[:n]

    def read_row(self, row: int, out: I32Array | None = None) -> tuple[I32Array, RowInfo]:
        """A consistent copy of one row (seqlock): (ids, RowInfo); ids is
        `out[:num_blocks]`. out: an int32 array (InvalidArgument if the row
        holds more than it can take), or None: sized for the row, paged rows
        longer than row_width included (re-read if the row grew meanwhile)."""
        info = _lib.new("bt_row_info *")
        seg = self._s()
        if type(row) is not int:
            row = _int(row, "row")
        for _ in range(8):
            buf = out if out is not None else np.empty(
                max(self.config.row_width, int(self.num_blocks[row]) if 0 <= row < len(self.num_blocks) else 0), I32)
            buf = out_array(buf, 0, I32)
            try:
                rc = _lib.row_read(seg, row, cbuf(buf), buf.shape[0], info)
            except OverflowError as e:
                raise _arg_error("read_row", e, ("row", row, "u32")) from None
            if rc != _EINVAL or out is not None:
                break                   # a caller's buffer: too small is its error
        if rc:
            raise _fail(rc, f"row={row}")
        return buf[:info.num_blocks], from_struct(RowInfo, info)

    def row_info(self, row: int) -> RowInfo:
        info = _lib.new("bt_row_info *")
        if type(row) is not int:
            row = _int(row, "row")
        try:
            rc = _lib.row_read(self._s(), row, _lib.NULL, 0, info)
        except OverflowError as e:
            raise _arg_error("row_info", e, ("row", row, "u32")) from None
        if rc:
            raise _fail(rc, f"row={row}")
        return from_struct(RowInfo, info)

    # ---- slot mapping ---------------------------------------------------------
    def slot_params(self, block_size: int = 0, cp_world: int = 1, cp_rank: int = 0,
                    cp_interleave: int = 1) -> SlotParams:
        return SlotParams(block_size, cp_world, cp_rank, cp_interleave)

    def slots_row(self, row: int, start: int, n: int, out: I64Array | None = None,
                  params: SlotParams | None = None) -> I64Array:
        """Form 1: slots of positions start..start+n-1 of `row` (int64, -1
        where no block backs the position). Returns out[:n]."""
        kept = self._outc               # (array, C view, length): one read, thread-safe
        if out is kept[0] and n == kept[2]:
            try:
                row | start | n         # INTS_ONLY (see _lib)
                rc = _slots_row_c(self._seg, (params or self._params).c, row, start, n, kept[1])
            except (TypeError, OverflowError):
                pass                    # closed, a wrong type, a value C cannot hold: below
            else:
                if rc:
                    raise _fail(rc, f"slots_row(row={row}, start={start}, n={n}, {params or ''})")
                return out  # type: ignore[return-value]
        seg = self._s()
        if type(row) is not int or type(start) is not int or type(n) is not int:
            row, start, n = _int(row, "row"), _int(start, "start"), _int(n, "n")
        if not 0 <= n <= 1 << 31:
            raise make_error(_ERANGE, f"slots_row(n={n}): n must be in [0, {1 << 31}]")
        given = out is not None
        try:
            out, ob = c_out(out, n, I64, "int64_t[]")
            rc = _slots_row_c(seg, (params or self._params).c, row, start, n, ob)
        except OverflowError as e:
            raise _arg_error("slots_row", e, ("row", row, "u32"), ("start", start, "i64"),
                             ("n", n, "u32")) from None
        if given:
            self._outc = (out, ob, len(ob))
        if rc:
            raise _fail(rc, f"slots_row(row={row}, start={start}, n={n}, {params or ''})")
        return out if out.shape[0] == n else out[:n]

    def slots_req(self, rows: IntsLike, positions: IntsLike, out: I64Array | None = None,
                  params: SlotParams | None = None) -> I64Array:
        """Form 2 (vLLM v1): token i is at positions[i] of rows[i].
        Returns out[:len(positions)]. int32 rows and int64 positions as
        numpy arrays pass without a copy."""
        seg = self._seg
        if seg is None:
            self._s()
        rb, n = c_array(rows, I32, "int32_t[]", "rows")
        pb, npos = c_array(positions, I64, "int64_t[]", "positions")
        if n != npos:
            raise make_error(_EINVAL, f"{n} rows for {npos} positions")
        out, ob = c_out(out, n, I64, "int64_t[]")
        rc = _lib.slots_req(seg, (params or self._params).c, rb, pb, n, ob)
        if rc:
            raise _fail(rc, f"slots_req(n={n}, {params or ''})")
        return out if out.shape[0] == n else out[:n]

    def slots_qsl(self, query_start_loc: IntsLike, positions: IntsLike,
                  rows: IntsLike | None = None, out: I64Array | None = None,
                  out_len: int | None = None, params: SlotParams | None = None) -> I64Array:
        """Form 3: request i covers tokens [qsl[i], qsl[i+1]) and lives in
        rows[i] (rows None: row i); entries from qsl[-1] to out_len are -1
        (CUDA-graph padding). Returns out[:out_len] (default qsl[-1]).
        Called again with the same arrays (numpy, right dtype, `out` given),
        it goes straight to C: their C views are kept from the last call, and
        out_len (or qsl[-1]) is checked against what positions and out hold;
        C checks the rest, as on the first call."""
        k = self._qslc                  # one read: thread-safe
        if query_start_loc is k[0] and positions is k[1] and out is k[2] and rows is k[3]:
            try:
                n = k[6][k[4]] if out_len is None else out_len      # qsl[num_reqs]: C view
                if 0 <= n <= k[5]:
                    rc = _slots_qsl_c(self._seg, (params or self._params).c, k[7], k[6], k[4],
                                      k[8], k[9], n)
                    if rc:
                        raise _fail(rc, f"slots_qsl(num_reqs={k[4]}, out_len={n})")
                    return k[11] if n == k[10] else out[:n]
            except (TypeError, OverflowError):
                pass                    # closed, a wrong type or value: the checks below say
        qsl, pos = as_array(query_start_loc, I32, "query_start_loc"), \
            as_array(positions, I64, "positions")
        num_reqs = qsl.shape[0] - 1
        if num_reqs < 0:
            raise make_error(_EINVAL, "query_start_loc is empty (needs num_reqs + 1 entries)")
        end = int(qsl[num_reqs])
        if end > pos.shape[0]:  # C cannot know how long positions is
            raise make_error(_EINVAL, f"query_start_loc ends at {end}, "
                                      f"positions has {pos.shape[0]}")
        out_len = end if out_len is None else _int(out_len, "out_len")
        if not 0 <= out_len <= 1 << 31:
            raise make_error(_ERANGE, f"slots_qsl(out_len={out_len}): out_len must be in "
                                      f"[0, {1 << 31}]")
        given = out
        out = out_array(out, out_len, I64)
        if rows is None:
            rbuf = _lib.NULL
        else:
            r = as_array(rows, I32, "rows")
            if r.shape[0] < num_reqs:
                raise make_error(_EINVAL, f"{r.shape[0]} rows for {num_reqs} requests")
            rbuf = cbuf(r)
        qc, pc, oc = cbuf(qsl), cbuf(pos), cbuf(out)
        try:
            rc = _slots_qsl_c(self._s(), (params or self._params).c, rbuf, qc, num_reqs, pc, oc,
                              out_len)
        except OverflowError as e:
            raise _range_error(e, f"out_len={out_len}") from None
        if rc:
            raise _fail(rc, f"slots_qsl(num_reqs={num_reqs}, out_len={out_len})")
        res = out[:out_len]
        room = min(pos.shape[0], out.shape[0])  # what positions and out both hold
        if given is out and qsl is query_start_loc and pos is positions and \
                (rows is None or r is rows):
            # Kept for the next call: the arrays (so their memory lives) and
            # their C views.
            self._qslc = (qsl, pos, out, rows, num_reqs, room, qc, rbuf, pc, oc, out_len, res)
        return res

    # ---- checking and recovery ----------------------------------------------
    def check(self, repair: bool = False, frozen: bool = False,
              wait_ms: int = 1000) -> CheckReport:
        """bt_seg_check. Default: a read-only scan (racy under load, exact when
        quiet). frozen: exact under load (a short pause, nothing changed).
        repair: freeze, recompute counts and free lists from the rows and the
        live clients, thaw. Returns a CheckReport. Errors: Busy (a live client
        stayed inside a call; the message names it)."""
        flags = (_lib.BT_CHECK_REPAIR if repair else 0) | (_lib.BT_CHECK_FROZEN if frozen else 0)
        rc, rep = _lib.seg_check(self._s(), flags, wait_ms)
        if rc:
            raise _fail(rc, f"check(repair={repair}): stuck client {rep.stuck_client}")
        return from_struct(CheckReport, rep)

    def recover_client(self, client_id: int, wait_ms: int = 1000) -> CheckReport:
        """Declare client `client_id` dead and recover what it held (its
        process must be gone). Returns a CheckReport. Errors: Busy."""
        rc, rep = _lib.seg_recover_client(self._s(), client_id, wait_ms)
        if rc:
            raise _fail(rc, f"recovering client {client_id} "
                            f"(stuck client {rep.stuck_client})")
        return from_struct(CheckReport, rep)

    def set_owner(self, pid: int, start_time: int = 0) -> None:
        _lib.seg_set_owner(self._s(), pid, start_time)

    # ---- cache pools (read side; the writer is a CachePool) --------------------
    def cache_stats(self, pool: int = 0) -> dict[str, int]:
        """A cache pool's statistics as a dict (owner, owner_pid, num_blocks,
        free, cached_free, in_use, keys, key_cap, queries, hits, stored,
        evicted, blocks_evicted, resets): a lock-free consistent snapshot,
        from any process (btd, bt-ctl). Errors: InvalidArgument (not a cache
        pool), OutOfRange, Busy (its writer died mid-call, not yet recovered)."""
        from .cache import cache_stats
        return cache_stats(self._s(), pool)

    def cache_lookup(self, pool: int, key: bytes) -> int | None:
        """The oldest block a cache pool maps `key` (bytes, 1..64) to, or
        None: lock-free, from any process. Counts a query (and a hit)."""
        from .cache import cache_lookup
        return cache_lookup(self._s(), pool, key)


def _ids_method(name: str, fn: Callable[..., int], doc: str) -> Callable[..., None]:
    """A Client method fn(handle, row, ids, n) (append, append_shared,
    set_row): the kept C view of ids (or of the last `out`), the INTS_ONLY
    row test and the bare call; anything unusual goes to _ids_slow."""
    def method(self: Client, row: int, ids: IntsLike) -> None:
        if ids is self._oa:
            buf, n = self._ob, self._olen
        elif ids is self._ia:
            buf, n = self._ib, self._ilen
        else:
            buf, n = self._in(ids)
        try:
            row | 0                     # INTS_ONLY (see _lib)
            rc = fn(self._cl, row, buf, n)
        except (TypeError, OverflowError):
            return self._ids_slow(fn, name, row, ids, buf, n)
        if rc:
            raise _fail(rc, f"{name}(row={row}, n={n}, ids={preview(ids)})")
    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    return method


class Client:
    """One registered user of a segment (bt_client): allocates blocks and
    edits the rows it claims. Open with ``Segment.client()``.

    Closing (or garbage collection) releases everything the client holds:
    its rows and its loose blocks. A forked child cannot use its parent's
    clients (ClientGone); it opens its own.

    Per-call speed: the methods that take or fill an int32 array keep the C
    view of the last array they were given (one for ``out``, one for ids), so
    a loop that reuses its arrays pays no conversion; such an array stays
    referenced by the client until another replaces it (numpy then refuses to
    resize it in place).

    Thread safety: calls may come from any thread, but not from two at once
    (one client per thread; clients are cheap). Errors: BtError subclasses;
    a call that raised changed nothing.
    """

    __slots__ = ("_cl", "_segobj", "_pid", "_gone_why", "id", "_scratch", "_args", "_nmax",
                 "_oa", "_ob", "_olen", "_ia", "_ib", "_ilen", "_u32", "__weakref__")
    _gone_why: str | None

    def __init__(self, seg: Segment, raw: Any) -> None:
        """Private: use Segment.client()."""
        # The destructor's closure holds the mapping, so bt_client_close can
        # never run after bt_seg_close, whatever order the collector picks.
        self._cl = _lib.client_owned(raw, seg._base)
        self._segobj = seg
        self._pid = os.getpid()
        self._gone_why = None
        self.id = _lib.client_id(raw)
        # step() writes here when the caller gives no buffer: cheaper than
        # sizing a new array with numpy's sum (bt_step_ex checks ids_cap).
        c = seg.config
        self._scratch = np.empty(min(c.num_rows * c.row_width, _SCRATCH_MAX), I32)
        self._args = _lib.new("bt_step_args *")
        self._u32 = _lib.new("uint32_t *")   # claim_row's out-parameter (one thread at a time)
        self._nmax = c.blocks_per_pool  # the most blocks one call can take from a pool
        self._oa, self._ob, self._olen = _NONE, None, 0   # the last `out` and its C view
        self._ia, self._ib, self._ilen = _NONE, None, 0   # the last ids array and its C view
        seg._clients.add(self)
        _live_clients.add(self)

    def close(self) -> None:
        """Release the client's rows and blocks and its slot. Idempotent."""
        if self._cl is not None:
            cl, self._cl = self._cl, None
            self._gone_why = "the client is closed"
            _live_clients.discard(self)
            self._forget()
            _lib.client_close(cl)

    def _disown(self, why):
        if self._cl is not None:
            _lib.client_disown(self._cl)
            self._cl = None
            self._gone_why = why
            self._forget()

    def _forget(self):
        self._oa, self._ob, self._ia, self._ib = _NONE, None, _NONE, None

    @property
    def closed(self) -> bool:
        return self._cl is None

    @property
    def segment(self) -> Segment:
        return self._segobj

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<blocktable.Client id={self.id} {'closed' if self._cl is None else 'open'}>"

    def _h(self):
        """The bt_client * handle (the door's guard: ClientGone once closed)."""
        return _lib.client_handle(self)

    def _gone(self):
        self._h()

    def slot(self) -> ClientSlotInfo:
        """ClientSlotInfo of this client (hand count, rows, ops)."""
        return self._segobj.client_slot(self.id)

    # ---- array arguments, kept across calls ---------------------------------------
    def _out(self, out, n):
        """(array, C view) for n int32 results: a new array (out None), or
        the caller's after the checks, then kept for the next call."""
        if out is None:
            if not 0 <= n <= self._nmax:     # before numpy sizes an array of n
                raise _count_error("alloc", n, self._nmax)
            out = np.empty(n, I32)
            return out, _lib.from_buffer("int32_t[]", out)
        if out is self._oa and n <= self._olen:
            return out, self._ob
        out, ob = c_out(out, n, I32, "int32_t[]")
        self._oa, self._ob, self._olen = out, ob, len(ob)
        return out, ob

    def _in(self, ids):
        """(C view, length) of an int32 ids argument: the kept view when ids
        is the last array seen (or the last `out`), else converted (and kept
        when it is an int32 array that needed no copy)."""
        if ids is self._ia:
            return self._ib, self._ilen
        if ids is self._oa:
            return self._ob, self._olen
        buf, n = c_array(ids, I32, "int32_t[]", "ids")
        if type(ids) is np.ndarray and ids.dtype is I32 and ids.ndim == 1 \
                and ids.flags.c_contiguous and self._cl is not None:
            self._ia, self._ib, self._ilen = ids, buf, n
        return buf, n

    # ---- cache pools ------------------------------------------------------------
    def cache_pool(self, pool: int = 0) -> CachePool:
        """Open cache pool `pool` for writing (bt_cache_open): a CachePool,
        vLLM's BlockPool in the segment, reset to its initial state. Errors:
        Busy (a live client owns it), InvalidArgument (not a cache pool)."""
        from .cache import CachePool
        return CachePool(self, pool)

    # ---- blocks ---------------------------------------------------------------
    def alloc(self, n: int, pool: int = 0, out: I32Array | None = None) -> I32Array:
        """Allocate n blocks (reference count 1, held loose by this client).
        Returns out[:n] (int32). All or nothing. Errors: OutOfBlocks,
        HandFull, OutOfRange (pool)."""
        # The fast path: the kept `out`, exactly n long, and integers.
        if out is self._oa and n == self._olen:
            try:
                n | pool                # INTS_ONLY (see _lib)
                rc = _alloc_c(self._cl, pool, n, self._ob)
            except (TypeError, OverflowError):
                pass                    # a closed client, a wrong type, a value C cannot hold
            else:
                if rc:
                    raise _fail(rc, f"alloc(n={n}, pool={pool})")
                return out  # type: ignore[return-value]
        cl = self._h()
        if type(n) is not int:
            n = _int(n, "n")
        pool, = _lib.ints("alloc", ("pool", pool, "u32"))
        if not 0 <= n <= self._nmax:
            raise _count_error("alloc", n, self._nmax)
        out, ob = self._out(out, n)
        rc = _alloc_c(cl, pool, n, ob)
        if rc:
            raise _fail(rc, f"alloc(n={n}, pool={pool})")
        return out if len(ob) == n else out[:n]

    def release(self, ids: IntsLike) -> None:
        """Drop loose references this client holds (freed at zero).
        Errors: NotHeld, OutOfRange; nothing changes then."""
        if ids is self._oa:
            buf, n = self._ob, self._olen
        elif ids is self._ia:
            buf, n = self._ib, self._ilen
        else:
            buf, n = self._in(ids)
        try:
            rc = _release_c(self._cl, buf, n)
        except TypeError:
            self._h()
            raise
        if rc:
            raise _fail(rc, f"release(ids={preview(ids)})")

    def share(self, ids: IntsLike) -> None:
        """Take an extra loose reference on allocated blocks (prefix sharing).
        Errors: NotHeld (a free block), OutOfRange, HandFull."""
        if ids is self._ia:
            buf, n = self._ib, self._ilen
        else:
            buf, n = self._in(ids)
        try:
            rc = _share_c(self._cl, buf, n)
        except TypeError:
            self._h()                   # closed: ClientGone
            raise
        if rc:
            raise _fail(rc, f"share(ids={preview(ids)})")

    # ---- rows -------------------------------------------------------------------
    def claim_row(self, key: int = 0, row: int = -1, raw: bool = False,
                  paged: bool = False) -> int:
        """Claim a free row for request `key` (row -1: any free row) and
        return its index. raw=True: entries are ids you manage yourself
        (BT_ROW_RAW), not references to this segment's blocks. paged=True:
        entries live in chunks of the segment's chunk pool (BT_ROW_PAGED).
        Errors: OutOfRows, RowStateError (that row is taken), OutOfRange."""
        out = self._u32
        flags = ((ROW_RAW if raw else ROW_MANAGED) | (ROW_PAGED if paged else 0)) \
            if raw or paged else ROW_MANAGED
        rc = None
        try:
            key | row                   # INTS_ONLY (see _lib)
            rc = _claim_c(self._cl, key, row, flags, out)
        except (TypeError, OverflowError):
            pass                        # a closed client, a wrong type, a value C cannot hold
        if rc is None:
            key, row = _lib.ints("claim_row", ("key", key, "u64"), ("row", row, "i32"))
            rc = _claim_c(self._h(), key, row, flags, out)
        if rc:
            why = ": row must be -1 (any free row) or a row index" if row < -1 else ""
            raise _fail(rc, f"claim_row(key={key}, row={row}, raw={raw}){why}")
        return out[0]

    def claim_rows(self, keys: IntsLike, raw: bool = False, paged: bool = False,
                   out: U32Array | None = None) -> U32Array:
        """Claim one free row per key in one call (requests arriving in one
        step); returns the rows (uint32, out[:len(keys)]). All or nothing:
        OutOfRows and no row claimed."""
        cl = self._h()
        kb, n = c_array(keys, U64, "uint64_t[]", "keys")
        out = np.empty(n, U32) if out is None else out_array(out, n, U32)
        flags = (ROW_RAW if raw else ROW_MANAGED) | (ROW_PAGED if paged else 0)
        rc = _lib.row_claim_many(cl, kb, n, flags, _lib.from_buffer("uint32_t[]", out))
        if rc:
            raise _fail(rc, f"claim_rows(n={n}, raw={raw}, paged={paged})")
        return out if out.shape[0] == n else out[:n]

    if TYPE_CHECKING:
        # The signatures of the methods made below by _lib.int_method and
        # _ids_method, for type checkers (at run time those carry the same
        # annotations, set where they are made).
        def release_row(self, row: int) -> None: ...
        def append(self, row: int, ids: IntsLike) -> None: ...
        def append_shared(self, row: int, ids: IntsLike) -> None: ...
        def set_row(self, row: int, ids: IntsLike) -> None: ...
        def truncate(self, row: int, keep: int = 0) -> None: ...
        def set_block(self, row: int, index: int, block_id: int) -> None: ...
        def punch(self, row: int, start: int, stop: int) -> None: ...
        def set_tokens(self, row: int, num_tokens: int) -> None: ...
        def move(self, src: int, dst: int) -> None: ...
        def swap(self, a: int, b: int) -> None: ...

    release_row = _lib.int_method("release_row", _release_row_c, [("row", "u32", ...)],
        """Release a claimed row: its blocks are decref'd, entries zeroed.""")

    def _ids_slow(self, fn, what, row, ids, buf, n):
        """append / append_shared / set_row after the fast path declined:
        the guard, row converted and checked by name, then the call."""
        row, = _lib.ints(what, ("row", row, "u32"))
        rc = fn(self._h(), row, buf, n)
        if rc:
            raise _fail(rc, f"{what}(row={row}, n={n}, ids={preview(ids)})")

    append = _ids_method("append", _append_c, """Append ids to a row this client
        claimed. MANAGED rows: each id must be a loose reference of this client
        (it moves into the row). Errors: RowFull, NotHeld, NotOwner,
        RowStateError, OutOfRange.""")

    append_shared = _ids_method("append_shared", _append_shared_c, """Take a new
        reference on allocated blocks and append them (prefix sharing in one
        step; MANAGED rows only).""")

    def alloc_append(self, row: int, n: int, pool: int = 0,
                     out: I32Array | None = None) -> I32Array:
        """Allocate n blocks from `pool` straight into `row`; returns their
        ids (out[:n]). Errors: OutOfBlocks, RowFull, NotOwner."""
        if out is self._oa and n == self._olen:     # as in alloc
            try:
                row | n | pool          # INTS_ONLY (see _lib)
                rc = _alloc_append_c(self._cl, row, pool, n, self._ob)
            except (TypeError, OverflowError):
                pass
            else:
                if rc:
                    raise _fail(rc, f"alloc_append(row={row}, n={n}, pool={pool})")
                return out  # type: ignore[return-value]
        cl = self._h()
        if type(n) is not int:
            n = _int(n, "n")
        row, pool = _lib.ints("alloc_append", ("row", row, "u32"), ("pool", pool, "u32"))
        if not 0 <= n <= self._nmax:
            raise _count_error(f"alloc_append(row={row}, ...)", n, self._nmax)
        out, ob = self._out(out, n)
        rc = _alloc_append_c(cl, row, pool, n, ob)
        if rc:
            raise _fail(rc, f"alloc_append(row={row}, n={n}, pool={pool})")
        return out if len(ob) == n else out[:n]

    set_row = _ids_method("set_row", _set_row_c, """Replace a row's contents
        (vLLM's add_row).""")

    truncate = _lib.int_method("truncate", _truncate_c, [("row", "u32", ...), ("keep", "u32", 0)],
        """Drop the row's entries from index `keep` on (keep 0 clears it).""")

    set_block = _lib.int_method(
        "set_block", _set_block_c,
        [("row", "u32", ...), ("index", "u32", ...), ("block_id", "i32", ...)],
        """Paged rows: set entry `index` (the row grows to index + 1, with
        holes between); block_id 0 makes a hole. MANAGED rows take the id's
        loose reference and drop the old entry's. Errors: OutOfChunks,
        NotHeld, RowStateError (not a paged row), OutOfRange.""")

    punch = _lib.int_method(
        "punch", _punch_c, [("row", "u32", ...), ("start", "u32", ...), ("stop", "u32", ...)],
        """Paged rows: make holes of entries [start, stop) (a sliding
        window's past); their references are dropped, empty chunks returned.""")

    set_tokens = _lib.int_method(
        "set_tokens", _set_tokens_c, [("row", "u32", ...), ("num_tokens", "i64", ...)],
        """Set the row's token count (bookkeeping; slot mapping ignores it).""")

    move = _lib.int_method("move", _move_c, [("src", "u32", ...), ("dst", "u32", ...)],
        """Move src's contents into dst; src ends empty (zeroed) and what
        dst held before is released (vLLM left src stale).""")

    swap = _lib.int_method("swap", _swap_c, [("a", "u32", ...), ("b", "u32", ...)],
        """Swap two claimed rows' contents.""")

    def read_row(self, row: int, out: I32Array | None = None) -> tuple[I32Array, RowInfo]:
        """Same as Segment.read_row."""
        return self._segobj.read_row(row, out)

    # ---- the scheduler step -----------------------------------------------------
    def step_plan(self, max_free: int = 256, max_rows: int = 256, max_arrive: int = 256,
                  max_ids: int | None = None, pool: int = 0) -> StepPlan:
        """Persistent buffers for stepping in a loop: see StepPlan."""
        return StepPlan(self, max_free, max_rows, max_arrive, max_ids, pool)

    @overload
    def step(self, rows: IntsLike, n_new: IntsLike, free_rows: IntsLike = ..., pool: int = ...,
             out: I32Array | None = ..., arrive: None = ..., arrive_n: None = ...,
             arrive_rows: None = ...) -> I32Array: ...
    @overload
    def step(self, rows: IntsLike, n_new: IntsLike, free_rows: IntsLike = ..., pool: int = ...,
             out: I32Array | None = ..., *, arrive: IntsLike, arrive_n: IntsLike,
             arrive_rows: U32Array | None = ...) -> tuple[I32Array, U32Array]: ...

    def step(self, rows: IntsLike, n_new: IntsLike, free_rows: IntsLike = _NO_ROWS, pool: int = 0,
             out: I32Array | None = None, arrive: IntsLike | None = None,
             arrive_n: IntsLike | None = None, arrive_rows: U32Array | None = None
             ) -> I32Array | tuple[I32Array, U32Array]:
        """One scheduler step in one call (bt_step_ex): release `free_rows`
        (ending requests; their blocks serve this step), claim a row for each
        key in `arrive` with arrive_n[i] blocks, and grow rows[i] by n_new[i]
        blocks, every new block popped with one CAS. Returns the new ids,
        growing rows' first, then arrivals' (out[:total], or a new array);
        with arrivals, returns (ids, rows claimed) and writes the rows into
        `arrive_rows` when given. A validation error changes nothing; after
        it the releases stand (those requests ended) and the claims and the
        allocation are all or nothing. uint32/uint64 numpy arguments pass
        without a copy. Errors: OutOfBlocks, OutOfRows, RowFull, NotOwner,
        RowStateError, InvalidArgument (a row listed twice)."""
        cl = self._h()
        a = self._args
        rb, nr = c_array(rows, U32, "uint32_t[]", "rows")
        kb, nk = c_array(n_new, U32, "uint32_t[]", "n_new")
        if nr != nk:
            raise make_error(_EINVAL, f"{nr} rows but {nk} counts")
        fb, nf = (_NO_ROWS_C, 0) if free_rows is _NO_ROWS else \
            c_array(free_rows, U32, "uint32_t[]", "free_rows")
        if type(pool) is not int:
            pool = _int(pool, "pool")
        try:
            a.pool = pool
        except OverflowError as e:
            raise _arg_error("step", e, ("pool", pool, "u32")) from None
        a.n_free, a.free_rows, a.n_rows, a.rows, a.n_new = nf, fb, nr, rb, kb
        na = 0
        if arrive is not None:
            ab, na = c_array(arrive, U64, "uint64_t[]", "arrive")
            nb, nn = c_array(arrive_n, U32, "uint32_t[]", "arrive_n")
            if na != nn:
                raise make_error(_EINVAL, f"{na} arrivals but {nn} counts")
            arrive_rows = np.empty(na, U32) if arrive_rows is None else out_array(arrive_rows, na, U32)
            a.arrive_keys, a.arrive_n = ab, nb
            a.arrive_rows = _lib.from_buffer("uint32_t[]", arrive_rows)
        a.n_arrive = na
        mine = out is None
        out = self._scratch if mine else out_array(out, 0, I32)
        a.ids_out, a.ids_cap = _lib.from_buffer("int32_t[]", out), out.shape[0]
        try:
            rc = _step_c(cl, a)
        except OverflowError as e:
            raise _range_error(e, f"step(pool={pool})") from None
        if rc:
            if rc == _EINVAL and a.ids_total > out.shape[0]:
                if not mine:
                    raise make_error(rc, f"out has {out.shape[0]} entries, the step makes {a.ids_total}")
                self._scratch = np.empty(a.ids_total, I32)  # grow and go again
                return self.step(rows, n_new, free_rows, pool, None, arrive, arrive_n, arrive_rows)  # type: ignore[call-overload, arg-type, misc]
            more = "" if arrive is None else f", arrive={preview(arrive)}"
            raise make_error(rc, f"step(rows={preview(rows)}, n_new={preview(n_new)}, "
                                 f"free_rows={preview(free_rows)}{more}, pool={pool})")
        total = a.ids_total
        ids = out[:total].copy() if mine else out[:total]
        return ids if arrive is None else (ids, arrive_rows)  # type: ignore[return-value]

    # ---- slot mapping (delegated: it needs no client) -----------------------------
    def slots_row(self, row: int, start: int, n: int, out: I64Array | None = None,
                  params: SlotParams | None = None) -> I64Array:
        return self._segobj.slots_row(row, start, n, out, params)

    def slots_req(self, rows: IntsLike, positions: IntsLike, out: I64Array | None = None,
                  params: SlotParams | None = None) -> I64Array:
        return self._segobj.slots_req(rows, positions, out, params)

    def slots_qsl(self, query_start_loc: IntsLike, positions: IntsLike,
                  rows: IntsLike | None = None, out: I64Array | None = None,
                  out_len: int | None = None, params: SlotParams | None = None) -> I64Array:
        return self._segobj.slots_qsl(query_start_loc, positions, rows, out, out_len, params)


class StepPlan:
    """Persistent buffers for Client.step in a scheduler loop.

    Converting arguments costs more than the step itself (hundreds of ns per
    array), so a loop that steps every few milliseconds keeps its arrays, as
    vLLM keeps its persistent input buffers: fill ``free_rows``, ``rows`` /
    ``n_new`` and ``arrive_keys`` / ``arrive_n`` in place, then
    ``run(n_free, n_rows, n_arrive)``. The rows claimed for arrivals land in
    ``arrive_rows``, the new ids in ``ids`` (growing rows first, then
    arrivals; ``run`` returns how many). Semantics and errors are
    Client.step's (bt_step_ex). One plan per client; not thread-safe."""

    __slots__ = ("client", "free_rows", "rows", "n_new", "arrive_keys", "arrive_n",
                 "arrive_rows", "ids", "_args", "_keep", "_caps", "_capc")

    def __init__(self, client: Client, max_free: int = 256, max_rows: int = 256,
                 max_arrive: int = 256, max_ids: int | None = None, pool: int = 0) -> None:
        c = client.segment.config
        max_free, max_rows = _int(max_free, "max_free"), _int(max_rows, "max_rows")
        max_arrive, pool = _int(max_arrive, "max_arrive"), _int(pool, "pool")
        cap = max(256, c.num_rows)       # a step names each row once at most
        for name, v in (("max_free", max_free), ("max_rows", max_rows), ("max_arrive", max_arrive)):
            if not 0 <= v <= cap:
                raise make_error(_EINVAL, f"step_plan({name}={v}): {name} must be in [0, {cap}]")
        if max_ids is None:
            max_ids = min((max_rows + max_arrive) * c.row_width, 1 << 22)
        max_ids = _int(max_ids, "max_ids")
        ids_cap = max(1 << 22, c.num_pools * c.blocks_per_pool)
        if not 0 <= max_ids <= ids_cap:
            raise make_error(_EINVAL, f"step_plan(max_ids={max_ids}): max_ids must be in "
                                      f"[0, {ids_cap}]")
        pool, = _lib.ints("step_plan", ("pool", pool, "u32"))
        self.client = client
        self.free_rows, self.rows = np.zeros(max_free, U32), np.zeros(max_rows, U32)
        self.n_new, self.arrive_n = np.zeros(max_rows, U32), np.zeros(max_arrive, U32)
        self.arrive_keys, self.arrive_rows = np.zeros(max_arrive, U64), np.zeros(max_arrive, U32)
        self.ids = np.zeros(max_ids, I32)
        a = self._args = _lib.new("bt_step_args *")
        fb = _lib.from_buffer
        self._keep = [fb("uint32_t[]", self.free_rows), fb("uint32_t[]", self.rows),
                      fb("uint32_t[]", self.n_new), fb("uint64_t[]", self.arrive_keys),
                      fb("uint32_t[]", self.arrive_n), fb("uint32_t[]", self.arrive_rows),
                      fb("int32_t[]", self.ids)]
        (a.free_rows, a.rows, a.n_new, a.arrive_keys, a.arrive_n, a.arrive_rows, a.ids_out) = self._keep
        a.ids_cap, a.pool = max_ids, pool
        self._caps = (max_free, max_rows, max_arrive)
        self._capc = _lib.new("uint32_t[3]", self._caps)     # bt_step_run checks the counts

    def run(self, n_free: int = 0, n_rows: int = 0, n_arrive: int = 0) -> int:
        """One step over the first n_free / n_rows / n_arrive entries of the
        buffers; returns the number of new ids in ``ids``. One C call
        (bt_step_run checks the counts against the buffers and steps)."""
        try:
            n_free | n_rows | n_arrive  # INTS_ONLY (see _lib)
            r = _step_run_c(self.client._cl, self._args, n_free, n_rows, n_arrive, self._capc)
        except (TypeError, OverflowError):
            r = self._run_checked(n_free, n_rows, n_arrive)
        if r < 0:
            self._raise(r, n_free, n_rows, n_arrive)
        return r

    def _run_checked(self, n_free, n_rows, n_arrive):
        """run's path for what the fast call refused: a closed client, a
        count that is not an int or does not fit."""
        self.client._h()                # closed: ClientGone
        n_free, n_rows = _int(n_free, "n_free"), _int(n_rows, "n_rows")
        n_arrive = _int(n_arrive, "n_arrive")
        mf, mr, ma = self._caps
        if not (0 <= n_free <= mf and 0 <= n_rows <= mr and 0 <= n_arrive <= ma):
            self._raise(_EINVAL, n_free, n_rows, n_arrive)
        return _step_run_c(self.client._h(), self._args, n_free, n_rows, n_arrive, self._capc)

    def _raise(self, rc, n_free, n_rows, n_arrive):
        mf, mr, ma = self._caps
        if rc == _EINVAL and not (0 <= n_free <= mf and 0 <= n_rows <= mr and 0 <= n_arrive <= ma):
            raise make_error(_EINVAL, f"run({n_free}, {n_rows}, {n_arrive}) exceeds the "
                                      f"plan's buffers ({mf}, {mr}, {ma})")
        raise _fail(rc, f"step plan run(n_free={n_free}, n_rows={n_rows}, "
                        f"n_arrive={n_arrive}): {self._args.ids_total} ids needed, "
                        f"{len(self.ids)} room")

    def fill(self, free_rows: IntsLike = (), rows: IntsLike = (), n_new: IntsLike = (),
             arrive_keys: IntsLike = (), arrive_n: IntsLike = ()) -> tuple[int, int, int]:
        """Copy Python sequences (lists of ints, or arrays) into the plan's
        buffers; returns (n_free, n_rows, n_arrive) for ``run``. Lists go
        through array.array (operator.index semantics, a C loop), several
        times cheaper than numpy. Errors: InvalidArgument (too many, lengths
        that differ, not integers), OutOfRange (a value the C type cannot
        hold); nothing is copied then."""
        mf, mr, ma = self._caps
        nf, nr, na = len(free_rows), len(rows), len(arrive_keys)
        if nr != len(n_new) or na != len(arrive_n) or nf > mf or nr > mr or na > ma:
            raise make_error(_EINVAL, f"fill: {nf} free_rows, {nr} rows / {len(n_new)} n_new, "
                                      f"{na} arrive_keys / {len(arrive_n)} arrive_n for a plan "
                                      f"of ({mf}, {mr}, {ma})")
        k = self._keep
        todo = [(k[0], c_array(free_rows, U32, "uint32_t[]", "free_rows")),
                (k[1], c_array(rows, U32, "uint32_t[]", "rows")),
                (k[2], c_array(n_new, U32, "uint32_t[]", "n_new")),
                (k[3], c_array(arrive_keys, U64, "uint64_t[]", "arrive_keys")),
                (k[4], c_array(arrive_n, U32, "uint32_t[]", "arrive_n"))]
        for dst, (src, n) in todo:      # every conversion passed: now copy
            if n:
                _lib.memmove(dst, src, n * (8 if dst is k[3] else 4))
        return nf, nr, na
