"""Segments: create / attach / unlink, config and name errors, zero-copy
views, handles guarded against use after close and across fork."""
import multiprocessing as mp

import numpy as np
import pytest

import blocktable as bt

from conftest import SMALL


def test_embedded_segment_reports_its_config(seg):
    i = seg.info
    assert i.config == bt.SegmentConfig(**{**SMALL.__dict__})
    assert i.total_blocks == SMALL.num_pools * SMALL.blocks_per_pool
    assert seg.table.shape == (SMALL.num_rows, SMALL.row_width) and seg.table.dtype == np.int32
    assert seg.num_blocks.shape == (SMALL.num_rows,) and seg.num_tokens.dtype == np.int64
    # Block 0 is the null block: pool 0 has one fewer.
    assert seg.free_blocks(0) == SMALL.blocks_per_pool - 1
    assert seg.free_blocks(1) == SMALL.blocks_per_pool


@pytest.mark.parametrize("field,value", [
    ("block_size", 0), ("kernel_block_size", 3), ("num_pools", 0), ("blocks_per_pool", 1),
    ("num_rows", 0), ("row_width", 0), ("max_clients", 0), ("hand_size", 0),
    ("block_size", -1), ("row_width", 2**32),
])
def test_impossible_config_is_config_error(field, value):
    cfg = bt.SegmentConfig(**{**SMALL.__dict__, field: value})
    with pytest.raises(bt.ConfigError, match=field.split("_")[0]):
        bt.Segment.create(None, cfg)


@pytest.mark.parametrize("name", ["", "a/b", "x" * 49, "sp ace", ".."])
def test_bad_names(name):
    with pytest.raises(bt.BadName):
        bt.Segment.create(name, SMALL)
    with pytest.raises(bt.BadName):
        bt.Segment.attach(name)


def test_create_attach_unlink(shm_name):
    with bt.Segment.create(shm_name, SMALL) as a, bt.Segment.attach(shm_name) as b:
        assert b.info.config == a.info.config and b.name == shm_name
        with pytest.raises(FileExistsError) as info:
            bt.Segment.create(shm_name, SMALL)
        assert isinstance(info.value, bt.BtError) and info.value.filename == shm_name
        with bt.Segment.create(shm_name, SMALL, exclusive=False) as c:
            assert c.info.size == a.info.size
    bt.Segment.unlink(shm_name)
    with pytest.raises(FileNotFoundError):
        bt.Segment.attach(shm_name)
    with pytest.raises(FileNotFoundError):
        bt.Segment.unlink(shm_name)


def test_attach_refuses_what_is_not_a_segment(shm_name):
    import posix_ipc
    shm = posix_ipc.SharedMemory("/bt." + shm_name, posix_ipc.O_CREX, size=8192)
    shm.close_fd()
    with pytest.raises(bt.BadMagic):
        bt.Segment.attach(shm_name)


def test_views_are_zero_copy_and_read_only(seg, client):
    table, nblocks = seg.table, seg.num_blocks
    row = client.claim_row()
    ids = client.alloc_append(row, 3)
    client.set_tokens(row, 40)
    np.testing.assert_array_equal(table[row, :3], ids)
    assert nblocks[row] == 3 and seg.num_tokens[row] == 40
    with pytest.raises(ValueError):
        table[row, 0] = 5


def test_views_outlive_close(seg, client):
    row = client.claim_row()
    client.alloc_append(row, 2)
    view = seg.table
    seg.close()
    assert client.closed  # the segment closed its clients, releasing the row
    assert view[row].sum() == 0  # the mapping is still there to read
    with pytest.raises(bt.InvalidArgument, match="closed"):
        seg.client()


def test_use_after_close_raises(seg):
    c = seg.client()
    c.close()
    c.close()  # idempotent
    with pytest.raises(bt.ClientGone, match="closed"):
        c.alloc(1)


def test_close_releases_what_the_client_held(seg):
    free = seg.free_blocks()
    c = seg.client()
    c.alloc(3)
    c.alloc_append(c.claim_row(), 4)
    assert seg.free_blocks() == free - 7
    c.close()
    assert seg.free_blocks() == free
    assert seg.check().clean


def _child_uses_parents_client(client, row, q):
    try:
        client.alloc(1)
        q.put("alloc worked")
    except bt.ClientGone as e:
        client.close()  # must not release the parent's row
        q.put(f"ClientGone: {e}")


def test_forked_child_cannot_use_or_close_parents_client(shm_name):
    with bt.Segment.create(shm_name, SMALL) as seg, seg.client() as c:
        row = c.claim_row()
        ids = c.alloc_append(row, 2)
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child_uses_parents_client, args=(c, row, q))
        p.start()
        msg = q.get(timeout=30)
        p.join(30)
        assert msg.startswith("ClientGone") and "forked child" in msg
        assert p.exitcode == 0
        np.testing.assert_array_equal(seg.read_row(row)[0], ids)
        c.alloc(1)  # the parent's client still works
