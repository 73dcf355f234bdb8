"""blocktable.gather: worker-side gathers of rows by request key (bt.h
section 11), in one process and across processes."""
import multiprocessing as mp

import numpy as np
import pytest

import blocktable as bt
from blocktable.gather import RowGather

CFG = bt.SegmentConfig(blocks_per_pool=64, num_pools=1, num_rows=8, row_width=6,
                       max_clients=8, hand_size=64)


def test_gather_batch_order_and_missing(seg, client):
    r1 = client.claim_row(key=11, raw=True)
    r2 = client.claim_row(key=22, raw=True)
    client.append(r1, [5, 6, 7])
    client.append(r2, [9])
    assert seg.find_row(22) == r2
    with pytest.raises(FileNotFoundError):
        seg.find_row(33)
    g = RowGather(seg, 4)
    for i, k in enumerate([22, 33, 11]):
        g.set_key(i, k)
    out = np.full((4, seg.config.row_width), 99, np.int32)
    nb = g.gather(3, out[:3])
    assert nb.tolist() == [1, -1, 3]
    assert out[0, :2].tolist() == [9, 0] and not out[1].any()
    assert out[2, :4].tolist() == [5, 6, 7, 0]
    assert (out[3] == 99).all()                 # past n: untouched
    hints = g.hints[:3].copy()
    client.append(r1, [8])                      # a row that grows is re-read through its hint
    nb = g.gather(3, out[:3])
    assert nb[2] == 4 and out[2, 3] == 8 and (g.hints[:3] == hints).all()


def test_released_and_reclaimed_rows_are_not_trusted(seg, client):
    r = client.claim_row(key=5, raw=True)
    client.append(r, [1, 2])
    keys = np.array([5], np.uint64)
    hints = np.zeros(1, np.uint64)
    out = np.zeros((1, 4), np.int32)
    assert seg.gather_rows(keys, hints, out).tolist() == [2]
    old = int(hints[0])
    client.release_row(r)
    assert seg.gather_rows(keys, hints, out).tolist() == [-1] and hints[0] == 0
    r2 = client.claim_row(key=5, row=r, raw=True)
    client.append(r2, [3])
    hints[0] = old                              # a stale hint: same row, old generation
    assert seg.gather_rows(keys, hints, out).tolist() == [1]
    assert out[0].tolist() == [3, 0, 0, 0] and int(hints[0]) != old


def test_bad_arguments(seg):
    keys = np.zeros(2, np.uint64)
    with pytest.raises(bt.InvalidArgument):
        seg.gather_rows(keys, np.zeros(1, np.uint64), np.zeros((2, 4), np.int32))
    with pytest.raises(bt.InvalidArgument):
        seg.gather_rows(keys, np.zeros(2, np.uint64), np.zeros((2, 4), np.int64))


def _writer(name, q):
    seg = bt.Segment.attach(name)
    cl = seg.client()
    for k in (1, 2, 3):
        r = cl.claim_row(key=k, raw=True)
        cl.append(r, [k * 10 + i for i in range(k)])
    q.put("written")
    q.get()                                      # hold the rows until the reader is done
    cl.close()


def test_across_processes(shm_name):
    seg = bt.Segment.create(shm_name, CFG)
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_writer, args=(shm_name, q_out))
    p.start()
    try:
        assert q_out.get(timeout=60) == "written"
        g = RowGather(seg, 3)
        for i, k in enumerate([3, 1, 2]):
            g.set_key(i, k)
        out = np.zeros((3, CFG.row_width), np.int32)
        assert g.gather(3, out).tolist() == [3, 1, 2]
        assert out[:, :3].tolist() == [[30, 31, 32], [10, 0, 0], [20, 21, 0]]
    finally:
        q_out.put("done")
        p.join(60)
        seg.close()
    assert p.exitcode == 0


def test_row_gather_refuses_an_out_it_would_overrun():
    """RowGather.gather writes n rows into `out`: an out with fewer rows, of
    another dtype or not contiguous, or n past its slots, is InvalidArgument
    before anything is written."""
    seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=64, num_rows=4, row_width=4))
    g = bt.RowGather(seg, 4)
    for n, out in ((3, np.zeros((2, 4), np.int32)), (2, np.zeros((2, 4), np.int64)),
                   (2, np.zeros((4, 8), np.int32)[:, ::2]), (5, np.zeros((8, 4), np.int32))):
        with pytest.raises(bt.InvalidArgument):
            g.gather(n, out)
    assert g.gather(2, np.zeros((2, 4), np.int32)).tolist() == [-1, -1]
    seg.close()
