"""Layer 2: the one door to libbt. No other module of the bindings calls `lib`.

What is written once here:

- the guard: ``seg_handle(seg)`` / ``client_handle(client)`` turn a closed
  Segment or Client into InvalidArgument / ClientGone before C sees NULL;
- argument conversion: ``as_int`` (int, bool, numpy.integer; anything else
  BtTypeError naming the argument) and ``call`` (the checked path: guard,
  ints converted and range-checked by name, the C call, its result code as a
  BtError naming the call and its arguments);
- result codes: ``fail(rc, what)`` builds the BtError, only on the error path.

The per-call functions of bt.h (alloc, release, rows, the step) are
re-exported bare (``blocks_alloc`` is ``lib.bt_blocks_alloc``): the
per-call methods of Client and StepPlan call them on a fast path after
``type(x) is int`` tests and with C buffers they keep, and go through
``call`` whenever anything is unusual (a numpy integer, a closed client, a
value cffi refuses). C checks every index and count it is given and a
rejected call changes nothing, so the fast path checks only what C cannot:
that a count fits the buffer it writes. The other bt.h calls have a function
each below that raises BtError itself.

Thread and process safety: what libbt says for each call (bt.h); nothing here
keeps state except the constants.
"""
from __future__ import annotations

from operator import index as _index
from typing import TYPE_CHECKING, Any, Callable

from ._errors import BtError, make_error
from ._ffi import ffi, lib

# ---- constants: every BT_* of bt.h, as module attributes ------------------------
globals().update({k: getattr(lib, k) for k in dir(lib)
                  if k.startswith("BT_") and isinstance(getattr(lib, k), int)})
EINVAL, ERANGE, ECLIENT, EBUSY = lib.BT_EINVAL, lib.BT_ERANGE, lib.BT_ECLIENT, lib.BT_EBUSY
NULL = ffi.NULL

if TYPE_CHECKING:
    # The BT_* constants above are set from bt.h at import: to a type checker,
    # any attribute this module does not define is one of them (or a cffi
    # object): Any.
    def __getattr__(name: str) -> Any: ...

# ---- the per-call functions, bare (see the module docstring) ----------------------
blocks_alloc = lib.bt_blocks_alloc
blocks_release = lib.bt_blocks_release
blocks_share = lib.bt_blocks_share
row_claim = lib.bt_row_claim
row_claim_many = lib.bt_row_claim_many
row_release = lib.bt_row_release
row_append = lib.bt_row_append
row_append_shared = lib.bt_row_append_shared
row_alloc_append = lib.bt_row_alloc_append
row_set = lib.bt_row_set
row_truncate = lib.bt_row_truncate
row_set_block = lib.bt_row_set_block
row_punch = lib.bt_row_punch
row_set_tokens = lib.bt_row_set_tokens
row_move = lib.bt_row_move
row_swap = lib.bt_row_swap
row_read = lib.bt_row_read
step_ex = lib.bt_step_ex
step_run = lib.bt_step_run
slots_row = lib.bt_slots_row
slots_req = lib.bt_slots_req
slots_qsl = lib.bt_slots_qsl
rows_gather = lib.bt_rows_gather
cache_alloc = lib.bt_cache_alloc
cache_touch = lib.bt_cache_touch
cache_free = lib.bt_cache_free
cache_unpin = lib.bt_cache_unpin
cache_insert = lib.bt_cache_insert
cache_insert_many = lib.bt_cache_insert_many
cache_remove = lib.bt_cache_remove
cache_lookup = lib.bt_cache_lookup
cache_lookup_many = lib.bt_cache_lookup_many
cache_block_key = lib.bt_cache_block_key
cache_queue = lib.bt_cache_queue


# ---- errors -------------------------------------------------------------------------
class BtTypeError(BtError, TypeError):
    """An argument of the wrong type (not an int or numpy.integer where an
    index, count, pool, pid or key is taken); the message names it."""
    code = EINVAL
    __module__ = "blocktable"


def fail(rc, detail="", filename=None):
    """The BtError for result rc (the error path only: never on success)."""
    return make_error(rc, detail, filename)


def check(rc, detail=""):
    if rc:
        raise make_error(rc, detail)


def as_int(v, name):
    """v as an int: int, bool and numpy.integer (operator.index), nothing
    else. cffi alone would take anything with __int__ (Fraction(1, 2) as 0,
    Decimal, numpy.float32), so callers test ``type(v) is int`` first and
    come here otherwise."""
    try:
        return _index(v)
    except TypeError:
        raise BtTypeError(f"{name} must be an integer (int or numpy.integer), "
                          f"got {type(v).__name__} {v!r}") from None


def index_arg(v, what):
    """v as a Python int for the seed-API tables (numpy ints too); floats and
    bools are refused with InvalidArgument naming `what`."""
    if isinstance(v, bool):
        raise make_error(EINVAL, f"{what} must be an int, got {v!r}")
    try:
        return _index(v)
    except TypeError:
        raise make_error(EINVAL, f"{what} must be an int, got {v!r}") from None


def count(v, what):
    """v as a non-negative Python int (OutOfRange below 0)."""
    v = index_arg(v, what)
    if v < 0:
        raise make_error(ERANGE, f"{what} {v} < 0")
    return v


ID_LIMIT = 2**31    # block ids are int32 in [0, 2^31): the bound of every table's entries

BOUNDS = {"u32": (0, 2**32 - 1), "i32": (-2**31, 2**31 - 1),
          "u64": (0, 2**64 - 1), "i64": (-2**63, 2**63 - 1)}


def arg_error(what, e, *args):
    """OutOfRange naming the first (name, value, C type) that does not fit
    (after cffi refused one with OverflowError: e)."""
    for name, v, kind in args:
        lo, hi = BOUNDS[kind]
        if not lo <= v <= hi:
            return make_error(ERANGE, f"{what}: {name}={v} is out of range "
                                      f"({name} must be in [{lo}, {hi}])")
    return make_error(ERANGE, f"{what}: {e}")


def range_error(e, detail):
    return make_error(ERANGE, f"{detail}: {e}")


def count_error(what, n, most):
    """A block count no pool can serve, refused before numpy sizes an array
    of n: OutOfRange below 0, OutOfBlocks above a pool's size."""
    if n < 0:
        return make_error(ERANGE, f"{what}: n={n} is negative")
    return make_error(lib.BT_ENOBLOCKS, f"{what}: n={n} blocks, a pool holds at most {most}")


# ---- the guard ------------------------------------------------------------------------
def seg_handle(seg):
    """The bt_seg * of an open Segment; InvalidArgument once it is closed."""
    h = seg._seg
    if h is None:
        raise make_error(EINVAL, "the segment is closed")
    return h


def client_handle(client):
    """The bt_client * of an open Client; ClientGone once closed (or in a
    forked child)."""
    h = client._cl
    if h is None:
        raise make_error(ECLIENT, f"client {client.id}: {client._gone_why}")
    return h


def ints(what, *args):
    """Each (name, value, C type) as a checked int: BtTypeError for a wrong
    type, OutOfRange for a value the C type cannot hold (named)."""
    out = [v if type(v) is int else as_int(v, name) for name, v, _ in args]  # types first
    for (name, _, kind), v in zip(args, out):
        lo, hi = BOUNDS[kind]
        if not lo <= v <= hi:
            raise make_error(ERANGE, f"{what}: {name}={v} is out of range "
                                     f"({name} must be in [{lo}, {hi}])")
    return out


def call(h, what, fn, *args, detail=None):
    """The checked path of a per-call function: fn(h, ints...) with each
    (name, value, C type) converted and range-checked by name, and a nonzero
    result raised as a BtError naming the call and its arguments."""
    vals = ints(what, *args)
    rc = fn(h, *vals)
    if rc:
        if detail is None:
            detail = f"{what}(" + ", ".join(f"{a[0]}={v}" for a, v in zip(args, vals)) + ")"
        raise make_error(rc, detail)


# INTS_ONLY: ``a | b | c`` is the fast paths' type test. Only integers (int,
# bool, numpy integers) take ``|``; a float, Fraction, Decimal, numpy float,
# str or None raises TypeError, which sends the call to the checked path.
# cffi alone would take anything with __int__ (Fraction(1, 2) as 0), and
# three ``type(x) is int`` tests cost twice as much.


def int_method(name: str, fn: Callable[..., int], params: list[tuple[str, str, Any]],
               doc: str) -> Callable[..., None]:
    """A Client method calling fn(client handle, ints...) and returning
    nothing: params are (name, C type, default or ...) in call order. The
    fast path is the INTS_ONLY test and the C call; a closed client, a
    wrong type or a value cffi refuses goes to ``call``, which names the
    culprit; a nonzero result is raised naming the call."""
    sig = ", ".join(p if d is ... else f"{p}={d!r}" for p, _, d in params)
    names = [p for p, _, _ in params]
    args = ", ".join(names)
    shown = ", ".join(f"{p}={{{p}}}" for p in names)
    specs = ", ".join(f"({p!r}, {p}, {k!r})" for p, k, _ in params)
    src = (f"def {name}(self, {sig}):\n"
           f"    try:\n"
           f"        {' | '.join(names if len(names) > 1 else names + ['0'])}    # INTS_ONLY\n"
           f"        rc = _fn(self._cl, {args})\n"
           f"    except (TypeError, OverflowError):\n"
           f"        pass    # a closed client, a wrong type, a value C cannot hold: call() says which\n"
           f"    else:\n"
           f"        if rc:\n"
           f"            raise _fail(rc, f\"{name}({shown})\")\n"
           f"        return\n"
           f"    _call(_handle(self), {name!r}, _fn, {specs})\n")
    ns: dict[str, Any] = {"_fn": fn, "_fail": fail, "_call": call, "_handle": client_handle}
    exec(src, ns)
    f = ns[name]
    f.__doc__ = doc
    f.__annotations__ = {**{p: "int" for p in names}, "return": "None"}
    return f


# ---- segments -----------------------------------------------------------------------
def cname(name):
    """A segment name for C: None (embedded) or bytes."""
    if name is None:
        return ffi.NULL
    if not isinstance(name, str):
        raise make_error(lib.BT_ENAME, f"name must be a str, got {type(name).__name__}")
    b = name.encode()
    if b"\0" in b:
        raise make_error(lib.BT_ENAME, f"{name!r} holds a NUL")
    return b


def seg_create(name, cfg, flags):
    out = ffi.new("bt_seg **")
    rc = lib.bt_seg_create(cname(name), cfg, flags, out)
    if rc:
        raise make_error(rc, f"creating segment {name!r}", filename=name)
    return out[0]


def seg_attach(name):
    out = ffi.new("bt_seg **")
    rc = lib.bt_seg_attach(cname(name), out)
    if rc:
        raise make_error(rc, f"attaching segment {name!r}", filename=name)
    return out[0]


def seg_unlink(name):
    rc = lib.bt_seg_unlink(cname(name))
    if rc:
        raise make_error(rc, f"unlinking segment {name!r}", filename=name)


def seg_mapping(h):
    """The mapping's base as a char * that closes the segment (bt_seg_close)
    when the last reference to it goes (views made with ffi.buffer hold one)."""
    return ffi.gc(ffi.cast("char *", lib.bt_seg_base(h)), lambda _p, s=h: lib.bt_seg_close(s))


def address(base):
    """The integer address of a mapping's base pointer."""
    return int(ffi.cast("uintptr_t", base))


def mapping_buffer(base, size):
    return ffi.buffer(base, size)


def seg_info(h):
    info = ffi.new("bt_seg_info *")
    check(lib.bt_seg_info_get(h, info), "bt_seg_info_get")
    return info


def seg_check(h, flags, wait_ms):
    """bt_seg_check: (rc, report); the caller decides what Busy means."""
    rep = ffi.new("bt_check_report *")
    wait_ms, = ints("check", ("wait_ms", wait_ms, "u32"))
    return lib.bt_seg_check(h, flags, wait_ms, rep), rep


def seg_recover_client(h, client_id, wait_ms):
    """bt_seg_recover_client: (rc, report)."""
    rep = ffi.new("bt_check_report *")
    client_id, wait_ms = ints("recover_client", ("client_id", client_id, "u32"),
                              ("wait_ms", wait_ms, "u32"))
    return lib.bt_seg_recover_client(h, client_id, wait_ms, rep), rep


def seg_set_owner(h, pid, start_time):
    call(h, "set_owner", lib.bt_seg_set_owner, ("pid", pid, "i32"),
         ("start_time", start_time, "u64"))


def _u32_out(fn, h, *args, detail):
    """fn(h, *args, uint32_t *out): out, or the BtError naming `detail`."""
    out = ffi.new("uint32_t *")
    check(fn(h, *args, out), detail)
    return out[0]


def pool_free_count(h, pool):
    pool, = ints("free_blocks", ("pool", pool, "u32"))
    return _u32_out(lib.bt_pool_free_count, h, pool, detail=f"free_blocks(pool={pool})")


def chunks_free(h):
    return _u32_out(lib.bt_chunks_free, h, detail="free_chunks")


def block_get(h, block_id):
    """(reference count, owner stamp) of one block."""
    block_id, = ints("block", ("block_id", block_id, "i32"))
    ref, owner = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    check(lib.bt_block_get(h, block_id, ref, owner), f"block(block_id={block_id})")
    return ref[0], owner[0]


def pool_pop(h, pool, n, stamp, out_c):
    call(h, "pool_pop", lambda h, p, k, s: lib.bt_pool_pop(h, p, k, s, out_c),
         ("pool", pool, "u32"), ("n", n, "u32"), ("stamp", stamp, "u32"),
         detail=f"pool_pop(pool={pool}, n={n})")


def pool_push(h, ids_c, n, detail):
    check(lib.bt_pool_push(h, ids_c, n), detail)


def row_find(h, key):
    key, = ints("find_row", ("key", key, "u64"))
    return _u32_out(lib.bt_row_find, h, key, detail=f"find_row(key={key:#x})")


# ---- clients ------------------------------------------------------------------------
def client_open(h):
    out = ffi.new("bt_client **")
    check(lib.bt_client_open(h, out), "opening a client")
    return out[0]


def client_owned(raw, keep):
    """raw as a handle that closes the client (bt_client_close) when the last
    reference goes; its closure holds `keep` (the mapping), so the client
    never closes after its segment."""
    return ffi.gc(raw, lambda p, keep=keep: lib.bt_client_close(p))


def client_disown(cl):
    """Forget cl's destructor (a forked child must not close its parent's)."""
    ffi.gc(cl, None)


def client_close(cl):
    ffi.release(cl)


client_id = lib.bt_client_id


def client_reserve(h, pid, start_time):
    pid, start_time = ints("reserve_client", ("pid", pid, "i32"), ("start_time", start_time, "u64"))
    return _u32_out(lib.bt_client_reserve, h, pid, start_time,
                    detail=f"reserving a client slot for pid={pid}")


def client_unreserve(h, slot, pid):
    call(h, "unreserve_client", lib.bt_client_unreserve, ("slot", slot, "u32"),
         ("pid", pid, "i32"))


def client_adopt(h, slot, why):
    slot, = ints("adopt_client", ("slot", slot, "u32"))
    out = ffi.new("bt_client **")
    check(lib.bt_client_adopt(h, slot, out), f"adopt_client(slot={slot}): {why}")
    return out[0]


def client_slot_get(h, client_id):
    """bt_client_slot_get: the bt_client_slot_info struct."""
    client_id, = ints("client_slot", ("client_id", client_id, "u32"))
    out = ffi.new("bt_client_slot_info *")
    check(lib.bt_client_slot_get(h, client_id, out), f"client slot client_id={client_id}")
    return out


# ---- config -------------------------------------------------------------------------
def config_new():
    return ffi.new("bt_config *")


def config_default():
    c = ffi.new("bt_config *")
    lib.bt_config_default(c)
    return c


def config_explain(c):
    """'' if the config is possible, else why not."""
    buf = ffi.new("char[256]")
    if lib.bt_config_explain(c, buf, 256):
        return ffi.string(buf).decode()
    return ""


config_size = lib.bt_config_size


def struct_fields(ctype):
    """The public field names of a bt.h struct."""
    return [n for n, _ in ffi.typeof(ctype).fields if not n.startswith("_")]


def new(ctype, init=None):
    """A C object of a bt.h type (for out-parameters kept across calls)."""
    return ffi.new(ctype, init)


from_buffer = ffi.from_buffer    # (ctype, array, require_writable=False): a C view, no copy
memmove = ffi.memmove
string = ffi.string
buffer = ffi.buffer
cast = ffi.cast


# ---- GPU mirrors --------------------------------------------------------------------
def mirror_get(h, index, d=None):
    """The mirror descriptor `index` (into d, or a new one)."""
    d = ffi.new("bt_mirror_desc *") if d is None else d
    rc = lib.bt_mirror_get(h, index, d)
    if rc:
        raise make_error(rc, f"bt_mirror_get({index})")
    return d


def mirror_rc(h, index, d):
    """bt_mirror_get's result code alone (0: d filled)."""
    return lib.bt_mirror_get(h, index, d)


def mirror_claim(h):
    return _u32_out(lib.bt_mirror_claim, h, detail="no free mirror slot (max_mirrors)")


def mirror_publish(h, index, d):
    """Publish d in slot index; the slot is retired again if that fails."""
    rc = lib.bt_mirror_publish(h, index, d)
    if rc:
        lib.bt_mirror_retire(h, index)
        raise make_error(rc, f"bt_mirror_publish({index})")


def mirror_retire(h, index):
    lib.bt_mirror_retire(h, index)


def mirror_invalidate(h, index):
    lib.bt_mirror_invalidate(h, index)


def mirror_unlock(h, index):
    lib.bt_mirror_unlock(h, index)


# bt_mirror_sync_begin, bare: Syncer's hot path calls it with C buffers it keeps
# and turns its result code into an error itself (mirror_begin_failed).
mirror_sync_begin = lib.bt_mirror_sync_begin


def mirror_begin_failed(rc, index, num_rows):
    """The BtError of a bt_mirror_sync_begin result code other than 0 / EBUSY."""
    return make_error(rc, f"bt_mirror_sync_begin(mirror {index}, num_rows={num_rows})")


def mirror_sync_done(h, index, rec):
    check(lib.bt_mirror_sync_done(h, index, rec), f"bt_mirror_sync_done(mirror {index})")


def mirror_sync_get(h, index, rec):
    """bt_mirror_sync_get into rec: False when the record cannot be read."""
    return lib.bt_mirror_sync_get(h, index, rec) == 0


# ---- cache pools (the cold calls; the per-call ones are above) ----------------------
def cache_open(cl, pool):
    check(lib.bt_cache_open(cl, pool), f"opening cache pool {pool}")


def cache_close(cl, pool):
    rc = lib.bt_cache_close(cl, pool)
    if rc and rc != lib.BT_ENOTOWNER:
        raise make_error(rc, f"closing cache pool {pool}")


cache_nfree_ptr = lib.bt_cache_nfree_ptr
cache_set_ref = lib.bt_cache_set_ref
cache_reset = lib.bt_cache_reset
cache_stats_get = lib.bt_cache_stats_get


def block_ref(h, block):
    """(rc, reference count) of one block."""
    ref = ffi.new("uint32_t *")
    rc = lib.bt_block_get(h, block, ref, ffi.NULL)
    return rc, ref[0]


def proc_start_time(pid):
    """The start time of process pid (field 22 of /proc/pid/stat, clock ticks
    since boot; never 0), from libbt's bt_proc_start_time, so that it equals
    what libbt stores in slots, segment headers and mirrors. 0 if the process
    is gone or a zombie (exited, not yet reaped: dead, as libbt counts it), or
    cannot be read. Never raises (any int is accepted); thread-safe; releases
    the GIL while it reads /proc."""
    pid = int(pid)
    if not 0 < pid < 2 ** 31:
        return 0
    out = ffi.new("uint64_t *")
    return out[0] if lib.bt_proc_start_time(pid, out) == 0 else 0


def errname(rc):
    return ffi.string(lib.bt_errname(rc)).decode()
