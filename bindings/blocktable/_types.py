"""Plain value types copied out of libbt's structs (snapshots, not live views),
and the array-argument helpers every wrapper uses."""
from __future__ import annotations

from array import array
from dataclasses import dataclass, fields, make_dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import numpy.typing as npt

from ._errors import make_error
from . import _lib
from ._lib import from_buffer as _from_buffer

__all__ = ["SegmentConfig", "SegmentInfo", "RowInfo", "CheckReport",
           "ClientSlotInfo", "BlockInfo"]

I32 = np.dtype(np.int32)
I64 = np.dtype(np.int64)
U32 = np.dtype(np.uint32)
U64 = np.dtype(np.uint64)
_CTYPE = {I32: "int32_t[]", I64: "int64_t[]", U32: "uint32_t[]", U64: "uint64_t[]"}
# array.array typecodes of the same widths: a list converts through them in a
# C loop with operator.index's rules (no float, Fraction or Decimal; a value
# that does not fit raises), several times cheaper than numpy.
_ACODE = {d: c for d, c in ((I32, "i"), (U32, "I"), (I64, "q"), (U64, "Q"))
          if array(c).itemsize == d.itemsize}

_D = _lib.config_default()

# The array types of the public signatures. What C fills comes back as numpy
# arrays of the C type; what it reads may be a list/tuple of ints or any
# integer array (converted and range-checked, see as_array).
I32Array = npt.NDArray[np.int32]      #: block ids, row counts (int32)
I64Array = npt.NDArray[np.int64]      #: slots, positions, token counts (int64)
U32Array = npt.NDArray[np.uint32]     #: row indices, counts (uint32)
U64Array = npt.NDArray[np.uint64]     #: request keys, row hints (uint64)
IntArray = npt.NDArray[np.integer[Any]]
#: an integer sequence argument: a list or tuple of ints, or an integer array
IntsLike = Union[Sequence[int], IntArray]


def from_struct(cls, cdata):
    """A dataclass instance from a C struct with the same field names."""
    return cls(**{f.name: getattr(cdata, f.name) for f in fields(cls)})


class _ConfigMethods:
    def to_c(self: Any) -> Any:
        c = _lib.config_new()
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**32:
                raise make_error(_lib.BT_ECONFIG, f"{f.name}={v!r} is not a uint32")
            setattr(c, f.name, v)
        return c

    def check(self) -> Any:
        """The C struct, or ConfigError naming the first impossible field."""
        c = self.to_c()
        why = _lib.config_explain(c)
        if why:
            raise make_error(_lib.BT_ECONFIG, f"{why}: {self}")
        return c

    @property
    def size(self) -> int:
        """Bytes a segment of this config maps."""
        return _lib.config_size(self.check())


def _config_class():
    """SegmentConfig's fields are bt_config's (so a field added to bt.h
    appears here without an edit), with bt_config_default()'s values."""
    names = _lib.struct_fields("bt_config")
    cls = make_dataclass("SegmentConfig", [(n, int, getattr(_D, n)) for n in names],
                         bases=(_ConfigMethods,), frozen=True)
    cls.__module__ = "blocktable"
    cls.__doc__ = (
        "The size of a segment, fixed at creation (bt_config): "
        + ", ".join(f"{n}={getattr(_D, n)}" for n in names) + ".\n\n"
        "Defaults come from bt_config_default(); kernel_block_size 0 means the "
        "block size. check() raises ConfigError naming the impossible field.")
    return cls


if TYPE_CHECKING:
    # What a type checker sees of the classes made from bt.h's structs at import.
    # SegmentConfig's fields are spelled out (a misspelt field is an error where a
    # config is written; tests/test_typing.py checks they are bt_config's); the
    # defaults are bt_config_default()'s, not the placeholder below. The snapshots
    # (RowInfo, ...) are only read: any field is an int.
    _DEFAULT = 0

    @dataclass(frozen=True)
    class SegmentConfig(_ConfigMethods):
        block_size: int = _DEFAULT
        kernel_block_size: int = _DEFAULT
        num_pools: int = _DEFAULT
        blocks_per_pool: int = _DEFAULT
        num_rows: int = _DEFAULT
        row_width: int = _DEFAULT
        max_clients: int = _DEFAULT
        hand_size: int = _DEFAULT
        max_mirrors: int = _DEFAULT
        chunk_size: int = _DEFAULT
        num_chunks: int = _DEFAULT
        dir_width: int = _DEFAULT
        cache_pools: int = _DEFAULT
        cache_keys: int = _DEFAULT

    @dataclass(frozen=True)
    class _Struct:
        def __init__(self, **fields: int) -> None: ...
        def __getattr__(self, name: str) -> int: ...

    class RowInfo(_Struct): ...
    class ClientSlotInfo(_Struct): ...

    class CheckReport(_Struct):
        @property
        def clean(self) -> bool: ...
else:
    SegmentConfig = _config_class()


@dataclass(frozen=True)
class SegmentInfo:
    """bt_seg_info: the segment's config, size and where its arrays lie."""
    config: SegmentConfig
    size: int
    generation: int
    total_blocks: int
    owner_pid: int
    format: int
    abi: int
    table_offset: int
    nblocks_offset: int
    ntokens_offset: int
    owner_start_time: int

    @classmethod
    def _from_c(cls, c: Any) -> SegmentInfo:
        vals = {f.name: getattr(c, f.name) for f in fields(cls) if f.name != "config"}
        return cls(config=from_struct(SegmentConfig, c.config), **vals)


def _struct_class(name, ctype, doc, namespace=None):
    """A frozen dataclass with the public fields of C struct `ctype` (a field
    added to bt.h shows up without an edit here)."""
    names = _lib.struct_fields(ctype)
    cls = make_dataclass(name, [(n, int) for n in names], frozen=True,
                         namespace=namespace or {})
    cls.__module__, cls.__doc__ = "blocktable", doc
    return cls


if not TYPE_CHECKING:   # (the type checker's view: the stubs above)
    RowInfo = _struct_class("RowInfo", "bt_row_info", """bt_row_info: a consistent
        snapshot of one row's metadata (owner client id, flags, key, num_blocks,
        generation, num_tokens, and the seqlock values it was read at).""")

    ClientSlotInfo = _struct_class("ClientSlotInfo", "bt_client_slot_info", """bt_client_slot_info:
        a racy snapshot of one client slot (state, pid, hand_count, rows, ops...).""")


def _clean(self: Any) -> bool:
    """No leak, no double free, nothing fixed, nothing out of range."""
    bad = ("leaked", "double_free", "refcnt_fixed", "rows_fixed", "bad_entries",
           "chunks_leaked", "cache_bad")
    return not any(getattr(self, f, 0) for f in bad)


if not TYPE_CHECKING:
    CheckReport = _struct_class("CheckReport", "bt_check_report", """bt_check_report: what
        bt_seg_check / bt_seg_recover_client found (blocks_free, blocks_held,
        leaked, double_free, ...); ``clean`` says all is well.""",
                                {"clean": property(_clean)})


@dataclass
class BlockInfo:
    """Information about one KV block (the seed's BlockInfo).

    A plain value: ``Segment.block(id)`` returns a snapshot of the block's
    reference count and owner stamp; changing the fields here changes nothing
    in the segment (share/release through a Client do that).

    Where the seed differs: ``decrement_ref`` below zero raised nothing there
    and left a negative count; here it raises NotHeld and changes nothing.
    ``can_free`` is False for block 0, the null block, which is never freed.
    """
    block_id: int
    ref_count: int = 0
    owner: int = 0

    def increment_ref(self) -> int:
        self.ref_count += 1
        return self.ref_count

    def decrement_ref(self) -> int:
        if self.ref_count <= 0:
            raise make_error(_lib.BT_ENOTHELD,
                             f"block {self.block_id}: reference count is already 0")
        self.ref_count -= 1
        return self.ref_count

    def can_free(self) -> bool:
        return self.ref_count == 0 and self.block_id > 0


# ---- array arguments ------------------------------------------------------
def as_array(values, dtype, what):
    """`values` as a 1-d C-contiguous array of `dtype`, without a copy when it
    already is one. Lists and other dtypes are converted, refusing floats and
    values that do not fit (no silent wrap-around: a wrapped id is a valid
    id of someone else)."""
    if type(values) is np.ndarray and values.dtype == dtype and values.ndim == 1 \
            and values.flags.c_contiguous:
        return values
    a = np.asarray(values)
    if a.dtype.kind == "f" and type(values) in (list, tuple) and dtype.kind == "u":
        # numpy makes float64 of a list mixing ints below and above 2^63:
        # build from the Python ints instead (they are exact).
        try:
            a = np.array(values, dtype=object)
            if all(type(v) is int for v in values):
                lo, hi = min(values), max(values)
                info = np.iinfo(dtype)
                if lo < info.min or hi > info.max:
                    raise make_error(_lib.BT_ERANGE, f"{what} holds {lo if lo < info.min else hi}, "
                                                    f"which does not fit {dtype}")
                return np.array(values, dtype=dtype)
        except (TypeError, ValueError):
            pass
        a = np.asarray(values)
    if a.ndim != 1:
        raise make_error(_lib.BT_EINVAL, f"{what} must be 1-d, got shape {a.shape}")
    if a.size == 0:
        return np.empty(0, dtype)
    if a.dtype.kind not in "iu":
        raise make_error(_lib.BT_EINVAL, f"{what} must be integers, got dtype {a.dtype}")
    if a.dtype != dtype:
        info = np.iinfo(dtype)
        lo, hi = int(a.min()), int(a.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise make_error(_lib.BT_ERANGE, f"{what} holds {bad}, which does not fit {dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


def c_array(values, dtype, ctype, what):
    """(C view, length) of an input array. The hot path: a 1-d array of the
    C type goes through without a copy or a flags lookup (from_buffer
    itself refuses a non-contiguous one, which is then copied)."""
    if type(values) is np.ndarray and values.dtype is dtype and values.ndim == 1:
        try:
            buf = _from_buffer(ctype, values)
            return buf, len(buf)
        except ValueError:  # not C-contiguous
            pass
    elif type(values) is list or type(values) is tuple:
        try:
            buf = _from_buffer(ctype, array(_ACODE[dtype], values))
            return buf, len(buf)
        except (TypeError, OverflowError, KeyError):
            pass                        # as_array names the problem
    buf = _from_buffer(ctype, as_array(values, dtype, what))
    return buf, len(buf)


def out_array(out, n, dtype, what="out"):
    """A caller's output buffer checked (dtype, contiguous, writable, >= n),
    or a new one of n entries."""
    if n < 0:
        raise make_error(_lib.BT_ERANGE, f"a count of {n} tokens or blocks is negative")
    if out is None:
        return np.empty(n, dtype)
    if type(out) is not np.ndarray or out.dtype != dtype or not out.flags.c_contiguous \
            or not out.flags.writeable or out.ndim != 1:
        raise make_error(_lib.BT_EINVAL,
                         f"{what} must be a writable 1-d C-contiguous {dtype} numpy array")
    if out.shape[0] < n:
        raise make_error(_lib.BT_EINVAL, f"{what} has {out.shape[0]} entries, {n} needed")
    return out


def c_out(out, n, dtype, ctype, what="out"):
    """(array, C view) of an output buffer of at least n entries: a new one,
    or the caller's after the checks (dtype, 1-d, contiguous, writable)."""
    if out is None:
        if n < 0:
            raise make_error(_lib.BT_ERANGE, f"a count of {n} is negative")
        out = np.empty(n, dtype)
        return out, _from_buffer(ctype, out)
    if type(out) is np.ndarray and out.dtype is dtype and out.ndim == 1 and out.shape[0] >= n:
        try:
            return out, _from_buffer(ctype, out, require_writable=True)
        except ValueError:  # not contiguous, or read-only: out_array says which
            pass
    out = out_array(out, n, dtype, what)
    return out, _from_buffer(ctype, out, require_writable=True)


def cbuf(a):
    """The C view of a checked array (no copy)."""
    return _from_buffer(_CTYPE[a.dtype], a)


def preview(a, limit=8):
    """A short rendering of an id list for error messages."""
    a = list(np.asarray(a).ravel()[:limit + 1])
    s = ", ".join(str(int(x)) for x in a[:limit])
    return f"[{s}{', ...' if len(a) > limit else ''}]"
