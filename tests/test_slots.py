"""Slot mapping in its three forms against a plain numpy reference, with
kernel block sizes and decode context parallelism, -1 where nothing backs a
position."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import blocktable as bt


def ref_slot(table, nblocks, row, pos, bs, world=1, rank=0, il=1):
    """One token's slot, the way vLLM computes it, with -1 where the row has
    no block (vLLM read a stale or null entry there)."""
    vbs = bs * world
    if pos < 0 or pos // vbs >= nblocks[row]:
        return -1
    v = pos % vbs
    if world > 1 and (v // il) % world != rank:
        return -1
    off = v // (world * il) * il + v % il
    return int(table[row, pos // vbs]) * bs + off


@pytest.fixture
def filled(seg, client):
    rng = np.random.default_rng(1)
    for r in range(seg.config.num_rows):
        row = client.claim_row(row=r)
        client.alloc_append(row, int(rng.integers(0, seg.config.row_width + 1)), pool=r % 2)
    return seg


def test_row_form_with_minus_one_tail(filled):
    seg = filled
    for row in range(seg.config.num_rows):
        n = int(seg.num_blocks[row]) * 16 + 20
        got = seg.slots_row(row, -3, n)
        want = [ref_slot(seg.table, seg.num_blocks, row, p, 16) for p in range(-3, n - 3)]
        np.testing.assert_array_equal(got, want)
        assert got[-1] == -1


def test_req_form_into_callers_buffer(filled):
    seg = filled
    rng = np.random.default_rng(2)
    rows = rng.integers(0, seg.config.num_rows, 500).astype(np.int32)
    pos = rng.integers(0, 16 * 17, 500)
    out = np.zeros(600, np.int64)
    got = seg.slots_req(rows, pos, out=out)
    assert got.base is out or got is out
    want = [ref_slot(seg.table, seg.num_blocks, r, p, 16) for r, p in zip(rows, pos)]
    np.testing.assert_array_equal(got, want)


def test_qsl_form_pads_with_minus_one(filled):
    seg = filled
    qsl = np.array([0, 3, 3, 10], np.int32)
    rows = np.array([5, 0, 2], np.int32)
    pos = np.arange(10, dtype=np.int64) * 7
    got = seg.slots_qsl(qsl, pos, rows=rows, out_len=16)
    want = [ref_slot(seg.table, seg.num_blocks, rows[i], pos[t], 16)
            for i in range(3) for t in range(qsl[i], qsl[i + 1])] + [-1] * 6
    np.testing.assert_array_equal(got, want)
    # rows None: request i lives in row i
    got = seg.slots_qsl(qsl, pos)
    want = [ref_slot(seg.table, seg.num_blocks, i, pos[t], 16)
            for i in range(3) for t in range(qsl[i], qsl[i + 1])]
    np.testing.assert_array_equal(got, want)


def test_qsl_form_called_again_with_the_same_arrays(filled):
    """The second call with the same arrays goes straight to C (Segment keeps
    their C views): it must see their new contents, return out[:qsl[-1]]
    (or out_len), refuse what does not fit out, and fail
    cleanly once the segment is closed."""
    seg = filled
    R = seg.config.num_rows
    qsl = np.arange(R + 1, dtype=np.int32)
    pos = np.zeros(R, np.int64)
    out = np.full(R + 4, 7, np.int64)

    def want(q, rows=None):
        return [ref_slot(seg.table, seg.num_blocks, i if rows is None else rows[i], pos[t], 16)
                for i in range(len(q) - 1) for t in range(q[i], q[i + 1])]
    for k in range(4):
        pos[:] = np.arange(R) * (k + 3)
        got = seg.slots_qsl(qsl, pos, out=out)
        assert got.base is out or got is out
        np.testing.assert_array_equal(got, want(qsl))
    qsl[R] = R - 2                      # the last requests end early: shorter result
    qsl[R - 1] = R - 2
    got = seg.slots_qsl(qsl, pos, out=out)
    assert len(got) == R - 2
    np.testing.assert_array_equal(got, want(qsl))
    got = seg.slots_qsl(qsl, pos, out=out, out_len=R)   # padding up to out_len
    np.testing.assert_array_equal(got, want(qsl) + [-1, -1])
    got = seg.slots_qsl(qsl, pos, out=out, out_len=R + 4)   # padding past positions' end
    np.testing.assert_array_equal(got, want(qsl) + [-1] * 6)
    with pytest.raises(bt.InvalidArgument):              # past out: refused
        seg.slots_qsl(qsl, pos, out=out, out_len=R + 5)
    qsl[R] = R + 1                      # ending past positions: refused either way
    for n in (None, R, R + 2):
        with pytest.raises(bt.InvalidArgument):
            seg.slots_qsl(qsl, pos, out=out, out_len=n)
    qsl[R] = R - 2
    qsl[1] = 5                          # going back: C refuses, out untouched
    out[:] = 9
    with pytest.raises(bt.InvalidArgument):
        seg.slots_qsl(qsl, pos, out=out, out_len=R)
    assert (out == 9).all()
    qsl[1] = 1
    rows = np.arange(R, dtype=np.int32)[::-1].copy()
    for _ in range(2):
        np.testing.assert_array_equal(seg.slots_qsl(qsl, pos, rows=rows, out=out, out_len=R),
                                      want(qsl, rows) + [-1, -1])
    rows[0] = R                         # a bad row seen on the fast path too
    with pytest.raises(bt.OutOfRange):
        seg.slots_qsl(qsl, pos, rows=rows, out=out, out_len=R)
    seg.close()
    with pytest.raises(bt.BtError):
        seg.slots_qsl(qsl, pos, rows=rows, out=out, out_len=R)


def test_slot_argument_errors(filled):
    seg = filled
    with pytest.raises(bt.OutOfRange):
        seg.slots_row(seg.config.num_rows, 0, 4)
    with pytest.raises(bt.OutOfRange):
        seg.slots_req([0, -1], [0, 0])
    with pytest.raises(bt.InvalidArgument):
        seg.slots_req([0, 1], [0])
    with pytest.raises(bt.InvalidArgument, match="positions has 2"):
        seg.slots_qsl([0, 5], [0, 1])
    with pytest.raises(bt.InvalidArgument):  # not monotonic
        seg.slots_qsl([0, 5, 2], np.zeros(5, np.int64), out_len=8)
    with pytest.raises(bt.InvalidArgument):  # rank >= world
        seg.slots_row(0, 0, 4, params=seg.slot_params(cp_world=2, cp_rank=2))


@settings(max_examples=60, deadline=None)
@given(world=st.sampled_from([1, 2, 4]), il=st.sampled_from([1, 2, 4, 16]),
       kernel=st.sampled_from([16, 8, 4]), data=st.data())
def test_dcp_and_kernel_block_size_match_reference(world, il, kernel, data):
    if il > kernel or kernel % il:
        return
    rank = data.draw(st.integers(0, world - 1))
    cfg = bt.SegmentConfig(block_size=16, kernel_block_size=kernel, blocks_per_pool=64,
                           num_rows=4, row_width=16, max_clients=2, hand_size=4)
    with bt.Segment.create(None, cfg) as seg, seg.client() as c:
        for r in range(4):
            c.claim_row(row=r, raw=True)
            n = data.draw(st.integers(0, 16))
            c.append(r, data.draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n)))
        p = seg.slot_params(block_size=kernel, cp_world=world, cp_rank=rank, cp_interleave=il)
        rows = np.array(data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=64)), np.int32)
        pos = np.array(data.draw(st.lists(st.integers(-2, kernel * world * 17),
                                          min_size=len(rows), max_size=len(rows))), np.int64)
        got = seg.slots_req(rows, pos, params=p)
        want = [ref_slot(seg.table, seg.num_blocks, r, q, kernel, world, rank, il)
                for r, q in zip(rows, pos)]
        np.testing.assert_array_equal(got, want)
