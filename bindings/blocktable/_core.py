"""Layer 3: Segment and Client, the classes over libbt's handles.

Hot methods call `lib` directly and build an error message only when the
result is nonzero: the per-call cost of Python is what the benchmarks
measure. Array arguments go to C through ffi.from_buffer without a copy when
they already are contiguous arrays of the C type (see _types.as_array).
"""
import os
import weakref
from operator import index as _index

import numpy as np

from ._errors import BtError, make_error
from ._ffi import ffi, lib
from ._types import (I32, I64, U32, U64, BlockInfo, CheckReport, ClientSlotInfo,
                     RowInfo, SegmentConfig, SegmentInfo, as_array, c_array, c_out, cbuf,
                     from_struct, out_array, preview)

__all__ = ["Segment", "Client", "StepPlan", "SlotParams", "ROW_MANAGED", "ROW_RAW", "ROW_PAGED"]

ROW_MANAGED = lib.BT_ROW_MANAGED
ROW_RAW = lib.BT_ROW_RAW
ROW_PAGED = lib.BT_ROW_PAGED
_EINVAL, _ERANGE, _ECLIENT = lib.BT_EINVAL, lib.BT_ERANGE, lib.BT_ECLIENT
_NO_ROWS = np.empty(0, U32)
_NO_ROWS_C = ffi.from_buffer("uint32_t[]", _NO_ROWS)
_SCRATCH_MAX = 1 << 16  # entries of a client's step buffer (grown on demand)

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


def _range_error(e, detail):
    """cffi's OverflowError (a negative row, a count >= 2^32) as OutOfRange."""
    return make_error(_ERANGE, f"{detail}: {e}")


class BtTypeError(BtError, TypeError):
    """An argument of the wrong type (not an int or numpy.integer where an
    index, count, pool, pid or key is taken); the message names it."""
    code = _EINVAL
    __module__ = "blocktable"


def _int(v, name):
    """v as an int: int, bool and numpy.integer (operator.index), nothing
    else. cffi alone would take anything with __int__ (Fraction(1, 2) as 0,
    Decimal, numpy.float32): the hot paths call this only when
    ``type(v) is not int``, so a plain int costs one type test."""
    try:
        return _index(v)
    except TypeError:
        raise BtTypeError(f"{name} must be an integer (int or numpy.integer), "
                          f"got {type(v).__name__} {v!r}") from None


_BOUNDS = {"u32": (0, 2**32 - 1), "i32": (-2**31, 2**31 - 1),
           "u64": (0, 2**64 - 1), "i64": (-2**63, 2**63 - 1)}


def _arg_error(call, e, *args):
    """The cold path after cffi refused an argument (OverflowError): OutOfRange
    naming the first (name, value, C type) that does not fit."""
    for name, v, kind in args:
        lo, hi = _BOUNDS[kind]
        if not lo <= v <= hi:
            return make_error(_ERANGE, f"{call}: {name}={v} is out of range "
                                       f"({name} must be in [{lo}, {hi}])")
    return make_error(_ERANGE, f"{call}: {e}")


def _count_error(call, n, most):
    """A block count no pool can serve, refused before numpy sizes an array
    of n: OutOfRange below 0, OutOfBlocks above a pool's size."""
    if n < 0:
        return make_error(_ERANGE, f"{call}: n={n} is negative")
    return make_error(lib.BT_ENOBLOCKS, f"{call}: n={n} blocks, a pool holds at most {most}")


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
    return ffi.from_buffer(ctype, arr)



class SlotParams:
    """Parameters of slot mapping (bt_slot_params), built once and reused.

    block_size: the unit of the stored ids (0 = the segment's block size; the
    kernel block size for tables of kernel-block ids). cp_world/cp_rank/
    cp_interleave: decode context parallelism; positions that are not this
    rank's map to -1. Checked by libbt at each call (InvalidArgument)."""
    __slots__ = ("c", "block_size", "cp_world", "cp_rank", "cp_interleave")

    def __init__(self, block_size=0, cp_world=1, cp_rank=0, cp_interleave=1):
        self.c = ffi.new("bt_slot_params *")
        block_size, cp_world = _int(block_size, "block_size"), _int(cp_world, "cp_world")
        cp_rank, cp_interleave = _int(cp_rank, "cp_rank"), _int(cp_interleave, "cp_interleave")
        try:
            self.c.block_size, self.c.cp_world = block_size, cp_world
            self.c.cp_rank, self.c.cp_interleave = cp_rank, cp_interleave
        except OverflowError as e:
            raise _arg_error("SlotParams", e, ("block_size", block_size, "u32"),
                             ("cp_world", cp_world, "u32"), ("cp_rank", cp_rank, "u32"),
                             ("cp_interleave", cp_interleave, "u32")) from None
        self.block_size, self.cp_world = block_size, cp_world
        self.cp_rank, self.cp_interleave = cp_rank, cp_interleave

    def __repr__(self):
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
                 "num_tokens", "_clients", "_params", "__weakref__")

    def __init__(self, raw, name):
        """Private: use create() or attach()."""
        # The mapping is owned by this gc'd pointer; every view made with
        # ffi.buffer keeps it alive, and bt_seg_close runs after the last.
        self._base = ffi.gc(ffi.cast("char *", lib.bt_seg_base(raw)),
                            lambda _p, s=raw: lib.bt_seg_close(s))
        self._seg = raw
        self.name = name
        info = ffi.new("bt_seg_info *")
        _check(lib.bt_seg_info_get(raw, info), "bt_seg_info_get")
        self.info = SegmentInfo._from_c(info)
        self.config = self.info.config
        self._clients = weakref.WeakSet()
        self._params = SlotParams()
        self.table, self.num_blocks, self.num_tokens = self.views(writable=False)

    # ---- life cycle ---------------------------------------------------------
    @classmethod
    def create(cls, name=None, config=None, group=False, exclusive=True):
        """Create a segment. name None: embedded (private). config: a
        SegmentConfig (default: SegmentConfig()). group: mode 0660 instead of
        0600. exclusive False: an existing segment of that name is attached
        (and validated) instead of failing with FileExistsError.
        Errors: ConfigError, BadName, FileExistsError, PermissionError."""
        cfg = (config or SegmentConfig()).check()
        flags = (lib.BT_CREATE_EXCL if exclusive else 0) | (lib.BT_CREATE_GROUP if group else 0)
        out = ffi.new("bt_seg **")
        rc = lib.bt_seg_create(_cname(name), cfg, flags, out)
        if rc:
            raise make_error(rc, f"creating segment {name!r}", filename=name)
        return cls(out[0], name)

    @classmethod
    def attach(cls, name):
        """Attach to a named segment, validating its header.
        Errors: BadName, FileNotFoundError, PermissionError, BadMagic,
        VersionMismatch, Corrupt."""
        out = ffi.new("bt_seg **")
        rc = lib.bt_seg_attach(_cname(name), out)
        if rc:
            raise make_error(rc, f"attaching segment {name!r}", filename=name)
        return cls(out[0], name)

    @staticmethod
    def unlink(name):
        """Remove a segment's name; mappings stay valid until closed.
        Errors: FileNotFoundError, BadName."""
        rc = lib.bt_seg_unlink(_cname(name))
        if rc:
            raise make_error(rc, f"unlinking segment {name!r}", filename=name)

    def close(self):
        """Close this segment's clients (releasing what they hold) and the
        handle. Idempotent. The mapping goes when the last view does."""
        if self._seg is None:
            return
        for c in list(self._clients):
            c.close()
        # Unmapped now unless a view made earlier is still alive.
        self._seg = self._base = None
        self.table, self.num_blocks, self.num_tokens = \
            _Closed("table"), _Closed("num_blocks"), _Closed("num_tokens")

    @property
    def closed(self):
        return self._seg is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._seg is None else f"{self.info.size} bytes"
        return f"<blocktable.Segment {self.name or '(embedded)'} {state}>"

    def _s(self):
        if self._seg is None:
            raise make_error(_EINVAL, "the segment is closed")
        return self._seg

    def views(self, writable=False):
        """(table, num_blocks, num_tokens) as numpy views over the mapping.
        writable=True lets you write behind libbt's back: only for code that
        knows it keeps the invariants (e.g. a tensor handed to torch)."""
        self._s()
        i, c = self.info, self.config
        buf = ffi.buffer(self._base, i.size)
        table = np.frombuffer(buf, I32, c.num_rows * c.row_width, i.table_offset)
        nblocks = np.frombuffer(buf, I32, c.num_rows, i.nblocks_offset)
        ntokens = np.frombuffer(buf, I64, c.num_rows, i.ntokens_offset)
        views = (table.reshape(c.num_rows, c.row_width), nblocks, ntokens)
        for v in views:
            v.flags.writeable = writable
        return views

    # ---- clients ------------------------------------------------------------
    def client(self):
        """Register this process as a new client (bt_client_open).
        Errors: OutOfClients, Frozen."""
        out = ffi.new("bt_client **")
        rc = lib.bt_client_open(self._s(), out)
        if rc:
            raise make_error(rc, "opening a client")
        return Client(self, out[0])

    def reserve_client(self, pid, start_time=0):
        """Reserve a slot for process pid (the daemon's half of registration);
        returns the slot id for adopt_client."""
        pid, start_time = _int(pid, "pid"), _int(start_time, "start_time")
        out = ffi.new("uint32_t *")
        try:
            rc = lib.bt_client_reserve(self._s(), pid, start_time, out)
        except OverflowError as e:
            raise _arg_error("reserve_client", e, ("pid", pid, "i32"),
                             ("start_time", start_time, "u64")) from None
        _check(rc, f"reserving a client slot for pid={pid}")
        return out[0]

    def unreserve_client(self, slot, pid):
        """Free a slot reserved for pid that nobody adopted (the daemon's
        undo of reserve_client). Errors: ClientGone (adopted meanwhile, or
        not pid's), OutOfRange."""
        slot, pid = _int(slot, "slot"), _int(pid, "pid")
        try:
            rc = lib.bt_client_unreserve(self._s(), slot, pid)
        except OverflowError as e:
            raise _arg_error("unreserve_client", e, ("slot", slot, "u32"),
                             ("pid", pid, "i32")) from None
        _check(rc, f"unreserve_client(slot={slot}, pid={pid})")

    def adopt_client(self, slot):
        """Take over a slot reserved for this process. Errors: ClientGone
        when the slot is not reserved for it (a slot a live client of this
        process holds is left untouched), OutOfRange."""
        slot = _int(slot, "slot")
        out = ffi.new("bt_client **")
        try:
            rc = lib.bt_client_adopt(self._s(), slot, out)
        except OverflowError as e:
            raise _arg_error("adopt_client", e, ("slot", slot, "u32")) from None
        _check(rc, f"adopt_client(slot={slot}): not a slot reserved for pid {os.getpid()}; "
                   "a slot a client of this process holds is left untouched")
        return Client(self, out[0])

    def client_slot(self, client_id):
        client_id = _int(client_id, "client_id")
        out = ffi.new("bt_client_slot_info *")
        try:
            rc = lib.bt_client_slot_get(self._s(), client_id, out)
        except OverflowError as e:
            raise _arg_error("client_slot", e, ("client_id", client_id, "u32")) from None
        _check(rc, f"client slot client_id={client_id}")
        return from_struct(ClientSlotInfo, out)

    # ---- blocks -------------------------------------------------------------
    def free_blocks(self, pool=0):
        """Free blocks in `pool` (a racy snapshot while others allocate)."""
        pool = _int(pool, "pool")
        out = ffi.new("uint32_t *")
        try:
            rc = lib.bt_pool_free_count(self._s(), pool, out)
        except OverflowError as e:
            raise _arg_error("free_blocks", e, ("pool", pool, "u32")) from None
        _check(rc, f"free_blocks(pool={pool})")
        return out[0]

    def free_chunks(self):
        """Free chunks in the paged rows' chunk pool (snapshot)."""
        out = ffi.new("uint32_t *")
        _check(lib.bt_chunks_free(self._s(), out), "chunks")
        return out[0]

    def block(self, block_id):
        """BlockInfo snapshot (reference count, owner stamp) of one block."""
        block_id = _int(block_id, "block_id")
        ref, owner = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        try:
            rc = lib.bt_block_get(self._s(), block_id, ref, owner)
        except OverflowError as e:
            raise _arg_error("block", e, ("block_id", block_id, "i32")) from None
        _check(rc, f"block(block_id={block_id})")
        return BlockInfo(block_id, ref[0], owner[0])

    def pool_pop(self, pool, n, stamp=0, out=None):
        """Raw pool pop (no client protocol; see bt.h): benchmarks and tests."""
        pool, n, stamp = _int(pool, "pool"), _int(n, "n"), _int(stamp, "stamp")
        seg = self._s()
        if not 0 <= n <= self.info.total_blocks:
            raise make_error(_ERANGE, f"pool_pop(n={n}): n must be in [0, {self.info.total_blocks}]")
        out = out_array(out, n, I32)
        try:
            rc = lib.bt_pool_pop(seg, pool, n, stamp, cbuf(out))
        except OverflowError as e:
            raise _arg_error("pool_pop", e, ("pool", pool, "u32"), ("stamp", stamp, "u32")) from None
        if rc:
            raise make_error(rc, f"pool_pop(pool={pool}, n={n})")
        return out[:n]

    def pool_push(self, ids):
        a = as_array(ids, I32, "ids")
        rc = lib.bt_pool_push(self._s(), cbuf(a), a.shape[0])
        if rc:
            raise make_error(rc, f"pool_push(ids={preview(a)})")

    # ---- rows -----------------------------------------------------------------
    def find_row(self, key):
        """The claimed row holding `key` (bt_row_find); FileNotFoundError if none."""
        out = ffi.new("uint32_t *")
        rc = lib.bt_row_find(self._s(), _index(key), out)
        if rc:
            raise make_error(rc, f"find_row(key={key:#x})")
        return out[0]

    def gather_rows(self, keys, hints, out, nblocks=None):
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
        rc = lib.bt_rows_gather(self._s(), _gather_arg(keys, U64, "uint64_t[]", "keys"), n,
                                _gather_arg(hints, U64, "uint64_t[]", "hints"),
                                _gather_arg(out, I32, "int32_t[]", "out"), out.shape[1],
                                _gather_arg(nblocks, I32, "int32_t[]", "nblocks"))
        if rc:
            raise make_error(rc, f"gather_rows(n={n})")
        return nblocks[:n]

    def read_row(self, row, out=None):
        """A consistent copy of one row (seqlock): (ids, RowInfo); ids is
        `out[:num_blocks]`. out: an int32 array (InvalidArgument if the row
        holds more than it can take), or None: sized for the row, paged rows
        longer than row_width included (re-read if the row grew meanwhile)."""
        info = ffi.new("bt_row_info *")
        seg = self._s()
        if type(row) is not int:
            row = _int(row, "row")
        for _ in range(8):
            buf = out if out is not None else np.empty(
                max(self.config.row_width, int(self.num_blocks[row]) if 0 <= row < len(self.num_blocks) else 0), I32)
            buf = out_array(buf, 0, I32)
            try:
                rc = lib.bt_row_read(seg, row, cbuf(buf), buf.shape[0], info)
            except OverflowError as e:
                raise _arg_error("read_row", e, ("row", row, "u32")) from None
            if rc != _EINVAL or out is not None:
                break                   # a caller's buffer: too small is its error
        if rc:
            raise make_error(rc, f"row={row}")
        return buf[:info.num_blocks], from_struct(RowInfo, info)

    def row_info(self, row):
        info = ffi.new("bt_row_info *")
        if type(row) is not int:
            row = _int(row, "row")
        try:
            rc = lib.bt_row_read(self._s(), row, ffi.NULL, 0, info)
        except OverflowError as e:
            raise _arg_error("row_info", e, ("row", row, "u32")) from None
        if rc:
            raise make_error(rc, f"row={row}")
        return from_struct(RowInfo, info)

    # ---- slot mapping ---------------------------------------------------------
    def slot_params(self, block_size=0, cp_world=1, cp_rank=0, cp_interleave=1):
        return SlotParams(block_size, cp_world, cp_rank, cp_interleave)

    def slots_row(self, row, start, n, out=None, params=None):
        """Form 1: slots of positions start..start+n-1 of `row` (int64, -1
        where no block backs the position). Returns out[:n]."""
        seg = self._seg
        if seg is None:
            self._s()
        if type(row) is not int or type(start) is not int or type(n) is not int:
            row, start, n = _int(row, "row"), _int(start, "start"), _int(n, "n")
        if not 0 <= n <= 1 << 31:
            raise make_error(_ERANGE, f"slots_row(n={n}): n must be in [0, {1 << 31}]")
        try:
            out, ob = c_out(out, n, I64, "int64_t[]")
            rc = lib.bt_slots_row(seg, (params or self._params).c, row, start, n, ob)
        except OverflowError as e:
            raise _arg_error("slots_row", e, ("row", row, "u32"), ("start", start, "i64"),
                             ("n", n, "u32")) from None
        if rc:
            raise make_error(rc, f"slots_row(row={row}, start={start}, n={n}, {params or ''})")
        return out if out.shape[0] == n else out[:n]

    def slots_req(self, rows, positions, out=None, params=None):
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
        rc = lib.bt_slots_req(seg, (params or self._params).c, rb, pb, n, ob)
        if rc:
            raise make_error(rc, f"slots_req(n={n}, {params or ''})")
        return out if out.shape[0] == n else out[:n]

    def slots_qsl(self, query_start_loc, positions, rows=None, out=None, out_len=None,
                  params=None):
        """Form 3: request i covers tokens [qsl[i], qsl[i+1]) and lives in
        rows[i] (rows None: row i); entries from qsl[-1] to out_len are -1
        (CUDA-graph padding). Returns out[:out_len] (default qsl[-1])."""
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
        out = out_array(out, out_len, I64)
        if rows is None:
            rbuf = ffi.NULL
        else:
            r = as_array(rows, I32, "rows")
            if r.shape[0] < num_reqs:
                raise make_error(_EINVAL, f"{r.shape[0]} rows for {num_reqs} requests")
            rbuf = cbuf(r)
        try:
            rc = lib.bt_slots_qsl(self._s(), (params or self._params).c, rbuf, cbuf(qsl),
                                  num_reqs, cbuf(pos), cbuf(out), out_len)
        except OverflowError as e:
            raise _range_error(e, f"out_len={out_len}") from None
        if rc:
            raise make_error(rc, f"slots_qsl(num_reqs={num_reqs}, out_len={out_len})")
        return out[:out_len]

    # ---- checking and recovery ----------------------------------------------
    def check(self, repair=False, frozen=False, wait_ms=1000):
        """bt_seg_check. Default: a read-only scan (racy under load, exact when
        quiet). frozen: exact under load (a short pause, nothing changed).
        repair: freeze, recompute counts and free lists from the rows and the
        live clients, thaw. Returns a CheckReport. Errors: Busy (a live client
        stayed inside a call; the message names it)."""
        rep = ffi.new("bt_check_report *")
        wait_ms = _int(wait_ms, "wait_ms")
        flags = (lib.BT_CHECK_REPAIR if repair else 0) | (lib.BT_CHECK_FROZEN if frozen else 0)
        try:
            rc = lib.bt_seg_check(self._s(), flags, wait_ms, rep)
        except OverflowError as e:
            raise _arg_error("check", e, ("wait_ms", wait_ms, "u32")) from None
        if rc:
            raise make_error(rc, f"check(repair={repair}): stuck client {rep.stuck_client}")
        return from_struct(CheckReport, rep)

    def recover_client(self, client_id, wait_ms=1000):
        """Declare client `client_id` dead and recover what it held (its
        process must be gone). Returns a CheckReport. Errors: Busy."""
        rep = ffi.new("bt_check_report *")
        client_id, wait_ms = _int(client_id, "client_id"), _int(wait_ms, "wait_ms")
        try:
            rc = lib.bt_seg_recover_client(self._s(), client_id, wait_ms, rep)
        except OverflowError as e:
            raise _arg_error("recover_client", e, ("client_id", client_id, "u32"),
                             ("wait_ms", wait_ms, "u32")) from None
        if rc:
            raise make_error(rc, f"recovering client {client_id} "
                                 f"(stuck client {rep.stuck_client})")
        return from_struct(CheckReport, rep)

    def set_owner(self, pid, start_time=0):
        pid, start_time = _int(pid, "pid"), _int(start_time, "start_time")
        try:
            rc = lib.bt_seg_set_owner(self._s(), pid, start_time)
        except OverflowError as e:
            raise _arg_error("set_owner", e, ("pid", pid, "i32"),
                             ("start_time", start_time, "u64")) from None
        _check(rc, f"set_owner(pid={pid})")

    # ---- cache pools (read side; the writer is a CachePool) --------------------
    def cache_stats(self, pool=0):
        """A cache pool's statistics as a dict (owner, owner_pid, num_blocks,
        free, cached_free, in_use, keys, key_cap, queries, hits, stored,
        evicted, blocks_evicted, resets): a lock-free consistent snapshot,
        from any process (btd, bt-ctl). Errors: InvalidArgument (not a cache
        pool), OutOfRange, Busy (its writer died mid-call, not yet recovered)."""
        from .cache import cache_stats
        return cache_stats(self._s(), pool)

    def cache_lookup(self, pool, key):
        """The oldest block a cache pool maps `key` (bytes, 1..64) to, or
        None: lock-free, from any process. Counts a query (and a hit)."""
        from .cache import cache_lookup
        return cache_lookup(self._s(), pool, key)


class Client:
    """One registered user of a segment (bt_client): allocates blocks and
    edits the rows it claims. Open with ``Segment.client()``.

    Closing (or garbage collection) releases everything the client holds:
    its rows and its loose blocks. A forked child cannot use its parent's
    clients (ClientGone); it opens its own.

    Thread safety: calls may come from any thread, but not from two at once
    (one client per thread; clients are cheap). Errors: BtError subclasses;
    a call that raised changed nothing.
    """

    __slots__ = ("_cl", "_segobj", "_pid", "_gone_why", "id", "_scratch", "_args", "_nmax",
                 "__weakref__")

    def __init__(self, seg, raw):
        """Private: use Segment.client()."""
        # The destructor's closure holds the mapping, so bt_client_close can
        # never run after bt_seg_close, whatever order the collector picks.
        self._cl = ffi.gc(raw, lambda p, keep=seg._base: lib.bt_client_close(p))
        self._segobj = seg
        self._pid = os.getpid()
        self._gone_why = None
        self.id = lib.bt_client_id(raw)
        # step() writes here when the caller gives no buffer: cheaper than
        # sizing a new array with numpy's sum (bt_step_ex checks ids_cap).
        c = seg.config
        self._scratch = np.empty(min(c.num_rows * c.row_width, _SCRATCH_MAX), I32)
        self._args = ffi.new("bt_step_args *")
        self._nmax = c.blocks_per_pool  # the most blocks one call can take from a pool
        seg._clients.add(self)
        _live_clients.add(self)

    def close(self):
        """Release the client's rows and blocks and its slot. Idempotent."""
        if self._cl is not None:
            cl, self._cl = self._cl, None
            self._gone_why = "the client is closed"
            _live_clients.discard(self)
            ffi.release(cl)

    def _disown(self, why):
        if self._cl is not None:
            ffi.gc(self._cl, None)
            self._cl = None
            self._gone_why = why

    @property
    def closed(self):
        return self._cl is None

    @property
    def segment(self):
        return self._segobj

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<blocktable.Client id={self.id} {'closed' if self._cl is None else 'open'}>"

    def _gone(self):
        raise make_error(_ECLIENT, f"client {self.id}: {self._gone_why}")

    def slot(self):
        """ClientSlotInfo of this client (hand count, rows, ops)."""
        return self._segobj.client_slot(self.id)

    # ---- cache pools ------------------------------------------------------------
    def cache_pool(self, pool=0):
        """Open cache pool `pool` for writing (bt_cache_open): a CachePool,
        vLLM's BlockPool in the segment, reset to its initial state. Errors:
        Busy (a live client owns it), InvalidArgument (not a cache pool)."""
        from .cache import CachePool
        return CachePool(self, pool)

    # ---- blocks ---------------------------------------------------------------
    def alloc(self, n, pool=0, out=None):
        """Allocate n blocks (reference count 1, held loose by this client).
        Returns out[:n] (int32). All or nothing. Errors: OutOfBlocks,
        HandFull, OutOfRange (pool)."""
        cl = self._cl
        if cl is None:
            self._gone()
        if type(n) is not int or type(pool) is not int:
            n, pool = _int(n, "n"), _int(pool, "pool")
        if not 0 <= n <= self._nmax:     # before numpy sizes an array of n
            raise _count_error("alloc", n, self._nmax)
        try:
            out, ob = c_out(out, n, I32, "int32_t[]")
            rc = lib.bt_blocks_alloc(cl, pool, n, ob)
        except OverflowError as e:
            raise _arg_error("alloc", e, ("pool", pool, "u32")) from None
        if rc:
            raise make_error(rc, f"alloc(n={n}, pool={pool})")
        return out if out.shape[0] == n else out[:n]

    def release(self, ids):
        """Drop loose references this client holds (freed at zero).
        Errors: NotHeld, OutOfRange; nothing changes then."""
        cl = self._cl
        if cl is None:
            self._gone()
        buf, n = c_array(ids, I32, "int32_t[]", "ids")
        rc = lib.bt_blocks_release(cl, buf, n)
        if rc:
            raise make_error(rc, f"release(ids={preview(ids)})")

    def share(self, ids):
        """Take an extra loose reference on allocated blocks (prefix sharing).
        Errors: NotHeld (a free block), OutOfRange, HandFull."""
        cl = self._cl
        if cl is None:
            self._gone()
        buf, n = c_array(ids, I32, "int32_t[]", "ids")
        rc = lib.bt_blocks_share(cl, buf, n)
        if rc:
            raise make_error(rc, f"share(ids={preview(ids)})")

    # ---- rows -------------------------------------------------------------------
    def claim_row(self, key=0, row=-1, raw=False, paged=False):
        """Claim a free row for request `key` (row -1: any free row) and
        return its index. raw=True: entries are ids you manage yourself
        (BT_ROW_RAW), not references to this segment's blocks. paged=True:
        entries live in chunks of the segment's chunk pool (BT_ROW_PAGED).
        Errors: OutOfRows, RowStateError (that row is taken), OutOfRange."""
        cl = self._cl
        if cl is None:
            self._gone()
        if type(key) is not int or type(row) is not int:
            key, row = _int(key, "key"), _int(row, "row")
        out = ffi.new("uint32_t *")
        flags = (ROW_RAW if raw else ROW_MANAGED) | (ROW_PAGED if paged else 0)
        try:
            rc = lib.bt_row_claim(cl, key, row, flags, out)
        except OverflowError as e:
            raise _arg_error("claim_row", e, ("key", key, "u64"), ("row", row, "i32")) from None
        if rc:
            why = ": row must be -1 (any free row) or a row index" if row < -1 else ""
            raise make_error(rc, f"claim_row(key={key}, row={row}, raw={raw}){why}")
        return out[0]

    def claim_rows(self, keys, raw=False, paged=False, out=None):
        """Claim one free row per key in one call (requests arriving in one
        step); returns the rows (uint32, out[:len(keys)]). All or nothing:
        OutOfRows and no row claimed."""
        cl = self._cl
        if cl is None:
            self._gone()
        kb, n = c_array(keys, U64, "uint64_t[]", "keys")
        out = np.empty(n, U32) if out is None else out_array(out, n, U32)
        flags = (ROW_RAW if raw else ROW_MANAGED) | (ROW_PAGED if paged else 0)
        rc = lib.bt_row_claim_many(cl, kb, n, flags, ffi.from_buffer("uint32_t[]", out))
        if rc:
            raise make_error(rc, f"claim_rows(n={n}, raw={raw}, paged={paged})")
        return out if out.shape[0] == n else out[:n]

    def release_row(self, row):
        """Release a claimed row: its blocks are decref'd, entries zeroed."""
        cl = self._cl
        if cl is None:
            self._gone()
        if type(row) is not int:
            row = _int(row, "row")
        try:
            rc = lib.bt_row_release(cl, row)
        except OverflowError as e:
            raise _arg_error("release_row", e, ("row", row, "u32")) from None
        if rc:
            raise make_error(rc, f"release_row(row={row})")

    def append(self, row, ids):
        """Append ids to a row this client claimed. MANAGED rows: each id
        must be a loose reference of this client (it moves into the row).
        Errors: RowFull, NotHeld, NotOwner, RowStateError, OutOfRange."""
        cl = self._cl
        if cl is None:
            self._gone()
        if type(row) is not int:
            row = _int(row, "row")
        buf, n = c_array(ids, I32, "int32_t[]", "ids")
        try:
            rc = lib.bt_row_append(cl, row, buf, n)
        except OverflowError as e:
            raise _arg_error("append", e, ("row", row, "u32")) from None
        if rc:
            raise make_error(rc, f"append(row={row}, n={n}, ids={preview(ids)})")

    def append_shared(self, row, ids):
        """Take a new reference on allocated blocks and append them (prefix
        sharing in one step; MANAGED rows only)."""
        cl = self._cl
        if cl is None:
            self._gone()
        if type(row) is not int:
            row = _int(row, "row")
        buf, n = c_array(ids, I32, "int32_t[]", "ids")
        try:
            rc = lib.bt_row_append_shared(cl, row, buf, n)
        except OverflowError as e:
            raise _arg_error("append_shared", e, ("row", row, "u32")) from None
        if rc:
            raise make_error(rc, f"append_shared(row={row}, ids={preview(ids)})")

    def alloc_append(self, row, n, pool=0, out=None):
        """Allocate n blocks from `pool` straight into `row`; returns their
        ids (out[:n]). Errors: OutOfBlocks, RowFull, NotOwner."""
        cl = self._cl
        if cl is None:
            self._gone()
        if type(row) is not int or type(n) is not int or type(pool) is not int:
            row, n, pool = _int(row, "row"), _int(n, "n"), _int(pool, "pool")
        if not 0 <= n <= self._nmax:     # before numpy sizes an array of n
            raise _count_error(f"alloc_append(row={row}, ...)", n, self._nmax)
        try:
            out, ob = c_out(out, n, I32, "int32_t[]")
            rc = lib.bt_row_alloc_append(cl, row, pool, n, ob)
        except OverflowError as e:
            raise _arg_error("alloc_append", e, ("row", row, "u32"), ("pool", pool, "u32")) from None
        if rc:
            raise make_error(rc, f"alloc_append(row={row}, n={n}, pool={pool})")
        return out if out.shape[0] == n else out[:n]

    def set_row(self, row, ids):
        """Replace a row's contents (vLLM's add_row)."""
        cl = self._cl
        if cl is None:
            self._gone()
        if type(row) is not int:
            row = _int(row, "row")
        buf, n = c_array(ids, I32, "int32_t[]", "ids")
        try:
            rc = lib.bt_row_set(cl, row, buf, n)
        except OverflowError as e:
            raise _arg_error("set_row", e, ("row", row, "u32")) from None
        if rc:
            raise make_error(rc, f"set_row(row={row}, n={n}, ids={preview(ids)})")

    def truncate(self, row, keep=0):
        """Drop the row's entries from index `keep` on (keep 0 clears it)."""
        cl = self._cl
        if cl is None:
            self._gone()
        if type(row) is not int or type(keep) is not int:
            row, keep = _int(row, "row"), _int(keep, "keep")
        try:
            rc = lib.bt_row_truncate(cl, row, keep)
        except OverflowError as e:
            raise _arg_error("truncate", e, ("row", row, "u32"), ("keep", keep, "u32")) from None
        if rc:
            raise make_error(rc, f"truncate(row={row}, keep={keep})")

    def set_block(self, row, index, block_id):
        """Paged rows: set entry `index` (the row grows to index + 1, with
        holes between); block_id 0 makes a hole. MANAGED rows take the id's
        loose reference and drop the old entry's. Errors: OutOfChunks,
        NotHeld, RowStateError (not a paged row), OutOfRange."""
        cl = self._cl
        if cl is None:
            self._gone()
        if type(row) is not int or type(index) is not int or type(block_id) is not int:
            row, index = _int(row, "row"), _int(index, "index")
            block_id = _int(block_id, "block_id")
        try:
            rc = lib.bt_row_set_block(cl, row, index, block_id)
        except OverflowError as e:
            raise _arg_error("set_block", e, ("row", row, "u32"), ("index", index, "u32"),
                             ("block_id", block_id, "i32")) from None
        if rc:
            raise make_error(rc, f"set_block(row={row}, index={index}, block_id={block_id})")

    def punch(self, row, start, stop):
        """Paged rows: make holes of entries [start, stop) (a sliding
        window's past); their references are dropped, empty chunks returned."""
        cl = self._cl
        if cl is None:
            self._gone()
        if type(row) is not int or type(start) is not int or type(stop) is not int:
            row, start, stop = _int(row, "row"), _int(start, "start"), _int(stop, "stop")
        try:
            rc = lib.bt_row_punch(cl, row, start, stop)
        except OverflowError as e:
            raise _arg_error("punch", e, ("row", row, "u32"), ("start", start, "u32"),
                             ("stop", stop, "u32")) from None
        if rc:
            raise make_error(rc, f"punch(row={row}, start={start}, stop={stop})")

    def set_tokens(self, row, num_tokens):
        """Set the row's token count (bookkeeping; slot mapping ignores it)."""
        cl = self._cl
        if cl is None:
            self._gone()
        if type(row) is not int or type(num_tokens) is not int:
            row, num_tokens = _int(row, "row"), _int(num_tokens, "num_tokens")
        try:
            rc = lib.bt_row_set_tokens(cl, row, num_tokens)
        except OverflowError as e:
            raise _arg_error("set_tokens", e, ("row", row, "u32"),
                             ("num_tokens", num_tokens, "i64")) from None
        if rc:
            raise make_error(rc, f"set_tokens(row={row}, num_tokens={num_tokens})")

    def move(self, src, dst):
        """Move src's contents into dst; src ends empty (zeroed) and what
        dst held before is released (vLLM left src stale)."""
        self._pair(lib.bt_row_move, "move", src, dst)

    def swap(self, a, b):
        """Swap two claimed rows' contents."""
        self._pair(lib.bt_row_swap, "swap", a, b)

    def _pair(self, fn, what, a, b):
        cl = self._cl
        if cl is None:
            self._gone()
        if type(a) is not int or type(b) is not int:
            a, b = _int(a, "src" if what == "move" else "a"), _int(b, "dst" if what == "move" else "b")
        try:
            rc = fn(cl, a, b)
        except OverflowError as e:
            n1, n2 = ("src", "dst") if what == "move" else ("a", "b")
            raise _arg_error(what, e, (n1, a, "u32"), (n2, b, "u32")) from None
        if rc:
            raise make_error(rc, f"{what}({a}, {b})")

    def read_row(self, row, out=None):
        """Same as Segment.read_row."""
        return self._segobj.read_row(row, out)

    # ---- the scheduler step -----------------------------------------------------
    def step_plan(self, max_free=256, max_rows=256, max_arrive=256, max_ids=None, pool=0):
        """Persistent buffers for stepping in a loop: see StepPlan."""
        return StepPlan(self, max_free, max_rows, max_arrive, max_ids, pool)

    def step(self, rows, n_new, free_rows=_NO_ROWS, pool=0, out=None,
             arrive=None, arrive_n=None, arrive_rows=None):
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
        cl = self._cl
        if cl is None:
            self._gone()
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
            a.arrive_rows = ffi.from_buffer("uint32_t[]", arrive_rows)
        a.n_arrive = na
        mine = out is None
        out = self._scratch if mine else out_array(out, 0, I32)
        a.ids_out, a.ids_cap = ffi.from_buffer("int32_t[]", out), out.shape[0]
        try:
            rc = lib.bt_step_ex(cl, a)
        except OverflowError as e:
            raise _range_error(e, f"step(pool={pool})") from None
        if rc:
            if rc == _EINVAL and a.ids_total > out.shape[0]:
                if not mine:
                    raise make_error(rc, f"out has {out.shape[0]} entries, the step makes {a.ids_total}")
                self._scratch = np.empty(a.ids_total, I32)  # grow and go again
                return self.step(rows, n_new, free_rows, pool, None, arrive, arrive_n, arrive_rows)
            more = "" if arrive is None else f", arrive={preview(arrive)}"
            raise make_error(rc, f"step(rows={preview(rows)}, n_new={preview(n_new)}, "
                                 f"free_rows={preview(free_rows)}{more}, pool={pool})")
        total = a.ids_total
        ids = out[:total].copy() if mine else out[:total]
        return ids if arrive is None else (ids, arrive_rows)

    # ---- slot mapping (delegated: it needs no client) -----------------------------
    def slots_row(self, row, start, n, out=None, params=None):
        return self._segobj.slots_row(row, start, n, out, params)

    def slots_req(self, rows, positions, out=None, params=None):
        return self._segobj.slots_req(rows, positions, out, params)

    def slots_qsl(self, query_start_loc, positions, rows=None, out=None, out_len=None,
                  params=None):
        return self._segobj.slots_qsl(query_start_loc, positions, rows, out, out_len, params)


def _cname(name):
    """A segment name for C: None (embedded) or bytes."""
    if name is None:
        return ffi.NULL
    if not isinstance(name, str):
        raise make_error(lib.BT_ENAME, f"name must be a str, got {type(name).__name__}")
    b = name.encode()
    if b"\0" in b:
        raise make_error(lib.BT_ENAME, f"{name!r} holds a NUL")
    return b


def _check(rc, detail):
    if rc:
        raise make_error(rc, detail)


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
                 "arrive_rows", "ids", "_args", "_keep")

    def __init__(self, client, max_free=256, max_rows=256, max_arrive=256, max_ids=None, pool=0):
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
        self.client = client
        self.free_rows, self.rows = np.zeros(max_free, U32), np.zeros(max_rows, U32)
        self.n_new, self.arrive_n = np.zeros(max_rows, U32), np.zeros(max_arrive, U32)
        self.arrive_keys, self.arrive_rows = np.zeros(max_arrive, U64), np.zeros(max_arrive, U32)
        self.ids = np.zeros(max_ids, I32)
        a = self._args = ffi.new("bt_step_args *")
        self._keep = [ffi.from_buffer("uint32_t[]", self.free_rows), ffi.from_buffer("uint32_t[]", self.rows),
                      ffi.from_buffer("uint32_t[]", self.n_new), ffi.from_buffer("uint64_t[]", self.arrive_keys),
                      ffi.from_buffer("uint32_t[]", self.arrive_n), ffi.from_buffer("uint32_t[]", self.arrive_rows),
                      ffi.from_buffer("int32_t[]", self.ids)]
        (a.free_rows, a.rows, a.n_new, a.arrive_keys, a.arrive_n, a.arrive_rows, a.ids_out) = self._keep
        try:
            a.ids_cap, a.pool = max_ids, pool
        except OverflowError as e:
            raise _arg_error("step_plan", e, ("pool", pool, "u32")) from None

    def run(self, n_free=0, n_rows=0, n_arrive=0):
        """One step over the first n_free / n_rows / n_arrive entries of the
        buffers; returns the number of new ids in ``ids``."""
        cl = self.client._cl
        if cl is None:
            self.client._gone()
        if type(n_free) is not int or type(n_rows) is not int or type(n_arrive) is not int:
            n_free, n_rows = _int(n_free, "n_free"), _int(n_rows, "n_rows")
            n_arrive = _int(n_arrive, "n_arrive")
        if not (0 <= n_free <= len(self.free_rows) and 0 <= n_rows <= len(self.rows)
                and 0 <= n_arrive <= len(self.arrive_keys)):
            raise make_error(_EINVAL, f"run({n_free}, {n_rows}, {n_arrive}) exceeds the plan's "
                                      f"buffers ({len(self.free_rows)}, {len(self.rows)}, "
                                      f"{len(self.arrive_keys)})")
        a = self._args
        a.n_free, a.n_rows, a.n_arrive = n_free, n_rows, n_arrive
        rc = lib.bt_step_ex(cl, a)
        if rc:
            raise make_error(rc, f"step plan run(n_free={n_free}, n_rows={n_rows}, "
                                 f"n_arrive={n_arrive}): {a.ids_total} ids needed, "
                                 f"{len(self.ids)} room")
        return a.ids_total
