"""The door to C (blocktable._lib) and the per-call fast paths (issue 12).

The fast paths take plain integers and the arrays a client saw last time;
everything else must still be refused by name, change nothing, and a closed
client must say so, on the fast path as on the checked one."""
import os
import re
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

import blocktable as bt

from conftest import assert_rejected

NOT_INTS = [Fraction(1, 1), Decimal("1"), np.float32(1), 1.0, "1", None]
PKG = os.path.dirname(bt.__file__)


def test_only_the_door_calls_the_library():
    """No module but _lib (and the loader, the error table and the package's
    public re-export) reaches `lib`, the vLLM plugin included."""
    allowed = {"_lib.py", "_ffi.py", "_errors.py", "__init__.py", "_build.py", "_buildid.py"}
    offenders = []
    for d, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py") or (d == PKG and f in allowed):
                continue
            src = open(os.path.join(d, f)).read()
            if re.search(r"(?<![\w.])(lib|ffi)\.\w|from \.+_ffi import|\._seg\._seg\b", src):
                offenders.append(os.path.relpath(os.path.join(d, f), PKG))
    assert not offenders, f"these call the library without the door: {offenders}"


@pytest.mark.parametrize("bad", NOT_INTS)
def test_fast_paths_refuse_what_is_not_an_integer(seg, client, bad):
    row = client.claim_row(key=1)
    out = np.empty(1, np.int32)
    client.alloc(1, out=out)            # out is now the kept array: the fast path
    client.release(out)
    for fn, args in [(client.alloc, (bad,)), (client.alloc_append, (row, bad)),
                     (client.truncate, (bad, 0)), (client.set_tokens, (row, bad)),
                     (client.swap, (row, bad)), (client.claim_row, (bad,)),
                     (seg.slots_row, (row, bad, 1))]:
        kw = {"out": out} if fn in (client.alloc, client.alloc_append) else {}
        e = assert_rejected(seg, (bt.BtTypeError, bt.InvalidArgument), fn, *args,
                            clients=[client], **kw)
        assert "must be an integer" in str(e) or "must be" in str(e), (fn, e)


def test_numpy_integers_take_the_fast_path(seg, client):
    row = client.claim_row(key=np.uint64(3), row=np.int32(2))
    assert row == 2
    out = np.empty(2, np.int32)
    ids = client.alloc_append(np.int64(row), np.int64(2), pool=np.int8(0), out=out)
    assert ids is out and seg.read_row(row)[0].tolist() == out.tolist()
    client.truncate(np.uint32(row), np.int16(1))
    assert int(seg.num_blocks[row]) == 1


def test_a_closed_client_says_so_on_every_path(seg):
    c = seg.client()
    row = c.claim_row(key=1)
    out = np.empty(1, np.int32)
    c.alloc(1, out=out)
    ids = out.copy()
    c.share(ids)                        # ids is now the kept input array
    c.close()
    for fn, args, kw in [(c.alloc, (1,), {"out": out}), (c.release, (out,), {}),
                         (c.share, (ids,), {}), (c.append, (row, ids), {}),
                         (c.truncate, (row, 0), {}), (c.claim_row, (), {}),
                         (c.alloc_append, (row, 1), {"out": out}), (c.release_row, (row,), {})]:
        with pytest.raises(bt.ClientGone, match="closed"):
            fn(*args, **kw)


def test_kept_arrays_follow_the_caller(seg, client):
    """A new out array replaces the kept one; a shorter n than the kept out
    writes only n entries; ids kept from one call see the caller's new
    contents in the next."""
    a, b = np.full(4, -1, np.int32), np.full(2, -1, np.int32)
    first = client.alloc(4, out=a).copy()
    got = client.alloc(1, out=a)        # n shorter than the kept array
    assert got.shape == (1,) and got.base is a and (a[1:] == first[1:]).all()
    client.release(first[:1])           # the id a[0] held before
    client.alloc(2, out=b)
    assert (b > 0).all()
    client.release(a)                   # a is no longer kept: converted again
    ids = b.copy()
    client.share(ids)
    ids[:] = b[::-1]                    # same array, new contents
    client.release(ids)
    client.release(b)
    assert client.slot().hand_count == 0


def test_lists_go_through_array_array(seg, client):
    ids = client.alloc(3).tolist()
    client.release(ids[:1])
    assert_rejected(seg, bt.InvalidArgument, client.release, [ids[1], Fraction(1, 2)],
                    clients=[client])
    assert_rejected(seg, bt.OutOfRange, client.release, [ids[1], 2**40], clients=[client])
    client.release(tuple(ids[1:]))


def test_step_plan_fill_from_lists(seg, client):
    plan = client.step_plan(max_free=4, max_rows=4, max_arrive=4)
    counts = plan.fill(arrive_keys=[10, 11], arrive_n=[1, 2])
    assert counts == (0, 0, 2)
    assert plan.run(*counts) == 3
    rows = plan.arrive_rows[:2].tolist()
    counts = plan.fill(free_rows=rows[:1], rows=rows[1:], n_new=[1])
    assert counts == (1, 1, 0) and plan.run(*counts) == 1
    assert int(seg.num_blocks[rows[1]]) == 3 and int(seg.num_blocks[rows[0]]) == 0
    before = plan.rows.copy()
    for bad in [dict(rows=[1, 2], n_new=[1]), dict(free_rows=[0] * 5),
                dict(rows=[1.5], n_new=[1]), dict(rows=[Fraction(1)], n_new=[1])]:
        with pytest.raises(bt.InvalidArgument):
            plan.fill(**bad)
    with pytest.raises(bt.OutOfRange):
        plan.fill(rows=[1], n_new=[-1])
    assert (plan.rows == before).all()  # nothing copied
