"""Clients: the allocator, rows and the scheduler step, through Python.
Every rejected call is checked to change nothing (snapshot before/after)."""
import numpy as np
import pytest

import blocktable as bt

from conftest import assert_rejected


def test_alloc_release_round_trip(seg, client):
    free = seg.free_blocks()
    ids = client.alloc(5)
    assert ids.dtype == np.int32 and len(set(ids.tolist())) == 5 and 0 not in ids
    assert seg.free_blocks() == free - 5 and client.slot().hand_count == 5
    for b in ids:
        info = seg.block(int(b))
        assert info.ref_count == 1 and info.owner == client.id
    client.release(ids[:2])
    client.release(ids[2:].tolist())  # a list is converted
    assert seg.free_blocks() == free and client.slot().hand_count == 0


def test_alloc_into_callers_buffer(client):
    out = np.full(8, -7, np.int32)
    ids = client.alloc(3, out=out)
    assert ids.base is out or ids is out
    assert (out[:3] == ids).all() and (out[3:] == -7).all()
    with pytest.raises(bt.InvalidArgument, match="int32"):
        client.alloc(2, out=np.empty(8, np.int64))
    with pytest.raises(bt.InvalidArgument, match="entries"):
        client.alloc(9, out=out)


def test_out_of_blocks_is_all_or_nothing(seg, client):
    with pytest.raises(MemoryError):  # OutOfBlocks is a MemoryError
        client.alloc(seg.free_blocks() + 1)
    assert_rejected(seg, bt.OutOfBlocks, client.alloc, seg.free_blocks() + 1, clients=[client])


def test_release_errors_change_nothing(seg, client):
    other = seg.client()
    mine, theirs = client.alloc(2), other.alloc(1)
    free_id = 40  # never allocated
    assert seg.block(free_id).ref_count == 0
    assert_rejected(seg, bt.NotHeld, client.release, [int(mine[0]), free_id], clients=[client, other])
    assert_rejected(seg, bt.NotHeld, client.release, theirs, clients=[client, other])
    assert_rejected(seg, bt.OutOfRange, client.release, [int(mine[0]), 10**6], clients=[client])
    assert_rejected(seg, bt.OutOfRange, client.release, np.array([2**40], np.int64))
    assert_rejected(seg, bt.InvalidArgument, client.release, [1.5])
    client.release(mine)  # still held after all of that
    with pytest.raises(bt.NotHeld):
        client.release(mine)  # a double free is refused


def test_share_counts_references(seg, client):
    ids = client.alloc(2)
    client.share(ids)
    assert seg.block(int(ids[0])).ref_count == 2
    client.release(ids)
    assert seg.block(int(ids[0])).ref_count == 1
    client.release(ids)
    assert seg.block(int(ids[0])).ref_count == 0
    assert_rejected(seg, bt.NotHeld, client.share, ids, clients=[client])


def test_rows_claim_append_read(seg, client):
    row = client.claim_row(key=42)
    ids = client.alloc(3)
    client.append(row, ids)
    assert client.slot().hand_count == 0  # the references moved into the row
    more = client.alloc_append(row, 2, pool=1)
    got, info = seg.read_row(row)
    np.testing.assert_array_equal(got, np.concatenate([ids, more]))
    assert info.key == 42 and info.owner == client.id and info.num_blocks == 5
    assert (seg.table[row, 5:] == 0).all()
    client.truncate(row, 1)
    assert seg.num_blocks[row] == 1 and (seg.table[row, 1:] == 0).all()
    assert seg.block(int(ids[1])).ref_count == 0  # cut blocks were freed


def test_claim_errors(seg, client):
    row = client.claim_row(row=3)
    assert row == 3
    assert_rejected(seg, bt.RowStateError, client.claim_row, row=3)
    assert_rejected(seg, bt.OutOfRange, client.claim_row, row=seg.config.num_rows)
    for _ in range(seg.config.num_rows - 1):
        client.claim_row()
    assert_rejected(seg, bt.OutOfRows, client.claim_row)


def test_row_full_changes_nothing(seg, client):
    row = client.claim_row()
    client.alloc_append(row, seg.config.row_width - 1)
    loose = client.alloc(2)
    assert_rejected(seg, bt.RowFull, client.append, row, loose, clients=[client])
    assert_rejected(seg, bt.RowFull, client.alloc_append, row, 2, clients=[client])
    assert_rejected(seg, bt.RowFull, client.set_row, row,
                    np.arange(1, seg.config.row_width + 2, dtype=np.int32))
    client.append(row, loose[:1])  # exactly full is fine
    assert seg.num_blocks[row] == seg.config.row_width


def test_other_clients_rows_are_refused(seg, client):
    other = seg.client()
    row = other.claim_row()
    other.alloc_append(row, 2)
    mine = client.alloc(1)
    cl = [client, other]
    assert_rejected(seg, bt.NotOwner, client.append, row, mine, clients=cl)
    assert_rejected(seg, bt.NotOwner, client.truncate, row, 0, clients=cl)
    assert_rejected(seg, bt.NotOwner, client.release_row, row, clients=cl)
    unclaimed = next(r for r in range(seg.config.num_rows) if seg.row_info(r).owner == 0)
    assert_rejected(seg, bt.RowStateError, client.append, unclaimed, mine, clients=cl)


def test_append_needs_held_blocks(seg, client):
    row = client.claim_row()
    assert_rejected(seg, bt.NotHeld, client.append, row, [5], clients=[client])


def test_append_shared_and_release_row(seg, client):
    free = seg.free_blocks()
    a, b = client.claim_row(), client.claim_row()
    ids = client.alloc_append(a, 3)
    client.append_shared(b, ids[:2])  # prefix sharing
    assert [seg.block(int(i)).ref_count for i in ids] == [2, 2, 1]
    client.release_row(a)
    assert [seg.block(int(i)).ref_count for i in ids] == [1, 1, 0]
    client.release_row(b)
    assert seg.free_blocks() == free and seg.row_info(a).owner == 0


def test_set_move_swap(seg, client):
    a, b, c = (client.claim_row() for _ in range(3))
    ia = client.alloc_append(a, 2)
    ib = client.alloc_append(b, 3)
    client.swap(a, b)
    np.testing.assert_array_equal(seg.read_row(a)[0], ib)
    np.testing.assert_array_equal(seg.read_row(b)[0], ia)
    client.move(a, c)
    np.testing.assert_array_equal(seg.read_row(c)[0], ib)
    assert seg.num_blocks[a] == 0 and (seg.table[a] == 0).all()
    new = client.alloc(1)
    client.set_row(c, new)
    np.testing.assert_array_equal(seg.read_row(c)[0], new)
    assert all(seg.block(int(i)).ref_count == 0 for i in ib)
    assert seg.check().clean


def test_step_allocates_and_frees_in_one_call(seg, client):
    free = seg.free_blocks()
    rows = [client.claim_row() for _ in range(3)]
    ids = client.step(rows, [1, 2, 0])
    assert len(ids) == 3 and list(seg.num_blocks[rows]) == [1, 2, 0]
    np.testing.assert_array_equal(seg.table[rows[1], :2], ids[1:3])
    ids2 = client.step(rows[1:], [1, 1], free_rows=[rows[0]])
    assert len(ids2) == 2 and seg.row_info(rows[0]).owner == 0
    assert seg.free_blocks() == free - 4


def test_step_is_all_or_nothing(seg, client):
    rows = [client.claim_row() for _ in range(2)]
    client.alloc_append(rows[1], seg.config.row_width - 1)
    # the second row has room for 1: neither row changes, the free row stays
    assert_rejected(seg, bt.RowFull, client.step, rows, [1, 2], clients=[client])
    # 5 rows x 13 blocks > the whole pool, even after freeing rows[1]: no
    # growing row gets a block; the ending row is released all the same
    # (it ended: bt.h's contract for the allocation part)
    more = [client.claim_row() for _ in range(4)]
    assert 5 * 13 > seg.free_blocks() + seg.num_blocks[rows[1]]
    assert_rejected(seg, bt.OutOfBlocks, client.step, [rows[0], *more], [13] * 5,
                    clients=[client])
    growing = [rows[0], *more]
    before = seg.num_blocks[growing].copy()
    with pytest.raises(bt.OutOfBlocks):
        client.step(growing, [13] * 5, free_rows=[rows[1]])
    np.testing.assert_array_equal(seg.num_blocks[growing], before)
    assert seg.row_info(rows[1]).owner == 0 and seg.check().clean
    assert_rejected(seg, bt.InvalidArgument, client.step, rows, [1])


def test_step_reuses_the_blocks_of_the_rows_it_frees(seg, client):
    """A scheduler frees finished requests and reuses their blocks in the
    same step (vLLM does); bt.h documents that order."""
    ending, growing = client.claim_row(), client.claim_row()
    rest = seg.free_blocks() - 1
    hold = client.alloc(rest)                 # all but one block are taken
    client.alloc_append(ending, 1)            # the last one
    assert seg.free_blocks(0) == 0
    ids = client.step([growing], [1], free_rows=[ending])
    assert len(ids) == 1 and seg.row_info(ending).owner == 0
    client.release(hold)


def test_claim_rows_in_one_call(seg, client):
    rows = client.claim_rows([11, 12, 13])
    assert rows.dtype == np.uint32 and len(set(rows.tolist())) == 3
    assert [seg.row_info(int(r)).key for r in rows] == [11, 12, 13]
    owners = [seg.row_info(r).owner for r in range(seg.config.num_rows)]
    with pytest.raises(bt.OutOfRows):  # all or nothing
        client.claim_rows(list(range(seg.config.num_rows)))
    assert [seg.row_info(r).owner for r in range(seg.config.num_rows)] == owners
    assert client.slot().rows == 3 and seg.check().clean
    assert_rejected(seg, bt.OutOfRange, client.claim_rows, [-1])


def test_failed_claim_rows_leaves_generations_alone(seg, client):
    client.claim_rows([1, 2, 3])
    assert_rejected(seg, bt.OutOfRows, client.claim_rows, list(range(seg.config.num_rows)))


PAGED = bt.SegmentConfig(blocks_per_pool=64, num_rows=4, row_width=16, max_clients=2,
                         hand_size=16, chunk_size=4, num_chunks=3, dir_width=8)


def test_paged_rows_hold_holes_and_give_chunks_back():
    with bt.Segment.create(None, PAGED) as seg, seg.client() as c:
        row = c.claim_row(paged=True)
        a, b, x = c.alloc(3)
        c.set_block(row, 0, a)
        c.set_block(row, 9, b)      # entries 1..8 are holes; chunks 0 and 2 taken
        assert seg.free_chunks() == 1
        ids, info = seg.read_row(row)
        assert info.num_blocks == 10 and ids.tolist() == [a] + [0] * 8 + [b]
        slots = seg.slots_row(row, 0, 16 * 11)
        assert (slots[:16] == a * 16 + np.arange(16)).all()
        assert (slots[16:16 * 9] == -1).all() and slots[16 * 9] == b * 16
        assert_rejected(seg, bt.NotHeld, c.set_block, row, 1, 50, clients=[c])
        c.punch(row, 0, 5)          # the window moved past block a
        assert seg.block(int(a)).ref_count == 0 and seg.free_chunks() == 2
        c.set_block(row, 4, x)
        c.release_row(row)
        assert seg.free_chunks() == 3 and seg.check().clean
        assert seg.free_blocks() == 63


def test_out_of_chunks_changes_nothing():
    with bt.Segment.create(None, PAGED) as seg, seg.client() as c:
        row = c.claim_row(paged=True)
        ids = c.alloc(4)
        for k in range(3):
            c.set_block(row, 4 * k, ids[k])
        assert seg.free_chunks() == 0
        assert_rejected(seg, bt.OutOfChunks, c.set_block, row, 12, ids[3], clients=[c])
        assert issubclass(bt.OutOfChunks, MemoryError)


def test_step_with_arrivals_is_one_scheduler_step(seg, client):
    """Ending, growing and arriving requests in one call: the ending rows'
    blocks serve the step, each arrival gets a fresh row (new generation)
    holding its blocks, and the accounting stays exact."""
    running = client.claim_rows([1, 2])
    client.alloc_append(running[0], 2)
    ending = client.claim_row(key=3)
    client.alloc_append(ending, 3)
    free_before = seg.free_blocks()
    ids, new_rows = client.step([running[0]], [1], free_rows=[ending],
                                arrive=[10, 11], arrive_n=[2, 0])
    assert len(ids) == 3 and len(new_rows) == 2
    assert [seg.row_info(int(r)).key for r in new_rows] == [10, 11]
    np.testing.assert_array_equal(seg.table[new_rows[0], :2], ids[1:])
    assert seg.num_blocks[new_rows[1]] == 0 and seg.num_blocks[running[0]] == 3
    assert seg.free_blocks() == free_before + 3 - 3
    assert seg.check().clean


def test_step_arrivals_are_all_or_nothing(seg, client):
    rows_before = [seg.row_info(r).owner for r in range(seg.config.num_rows)]
    w = seg.config.row_width
    k = min(seg.config.num_rows, seg.free_blocks() // w + 1)   # k rows' worth > free
    assert k * w > seg.free_blocks()
    with pytest.raises(bt.OutOfBlocks):
        client.step([], [], arrive=list(range(k)), arrive_n=[w] * k)
    assert [seg.row_info(r).owner for r in range(seg.config.num_rows)] == rows_before
    with pytest.raises(bt.OutOfRows):
        client.step([], [], arrive=list(range(seg.config.num_rows + 1)),
                    arrive_n=[0] * (seg.config.num_rows + 1))
    assert [seg.row_info(r).owner for r in range(seg.config.num_rows)] == rows_before
    assert seg.check().clean


def test_step_plan_runs_steps_from_persistent_buffers(seg, client):
    """A scheduler loop: the plan's buffers are filled in place and run()
    does what Client.step does, without converting arguments."""
    plan = client.step_plan(max_free=8, max_rows=8, max_arrive=8)
    plan.arrive_keys[:3] = [7, 8, 9]
    plan.arrive_n[:3] = [1, 2, 0]
    assert plan.run(n_arrive=3) == 3
    arrived = plan.arrive_rows[:3].copy()
    assert [seg.row_info(int(r)).key for r in arrived] == [7, 8, 9]
    np.testing.assert_array_equal(seg.num_blocks[arrived], [1, 2, 0])
    plan.free_rows[:1] = arrived[:1]          # request 7 ends
    plan.rows[:1], plan.n_new[:1] = arrived[2], 1
    assert plan.run(n_free=1, n_rows=1) == 1
    assert seg.row_info(int(arrived[0])).owner == 0 and seg.num_blocks[arrived[2]] == 1
    with pytest.raises(bt.InvalidArgument):
        plan.run(n_free=9)
    assert seg.check().clean
