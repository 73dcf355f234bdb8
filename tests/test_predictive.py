"""PredictiveBlockAllocator: reservations ahead of need, reclaimed under pressure."""
import multiprocessing as mp
import os
import random
import signal

import numpy as np
import pytest

import blocktable as bt
from blocktable.predictive import PredictiveBlockAllocator, UnknownRequest

FORK = mp.get_context("fork")


def test_decode_pays_one_pop_per_horizon_plus_one():
    with PredictiveBlockAllocator(1000, prediction_horizon=4) as a:
        got = [int(a.allocate("r", 1)[0]) for _ in range(21)]
        s = a.get_stats()
        assert len(set(got)) == 21
        # the first call sizes the request; then one pop per 1 + 4 blocks
        assert s["shared_pops"] == 1 + 4
        assert s["hits"] == 16 and s["hit_rate"] == pytest.approx(16 / 21)
        assert s["reserved"] == 0


def test_the_first_call_is_a_size_not_a_rate():
    """A prompt of 63 blocks then a block per call: reserve for the
    decode's rate, not 4 x 63."""
    with PredictiveBlockAllocator(1000, prediction_horizon=4) as a:
        a.allocate("r", 63)
        assert a.predicted_rate("r") is None and a.reserved_for("r") == 0
        a.allocate("r", 1)
        assert a.predicted_rate("r") == 1.0 and a.reserved_for("r") == 4


def test_without_prediction_every_block_is_a_pop():
    with PredictiveBlockAllocator(1000, prediction_horizon=4) as a:
        for _ in range(20):
            a.allocate("r", 1, predict_future=False)
        s = a.get_stats()
        assert s["shared_pops"] == 20 and s["hits"] == 0 and s["reserved"] == 0


def test_rate_is_an_ewma_of_blocks_per_call():
    with PredictiveBlockAllocator(1000, prediction_horizon=2, alpha=0.5) as a:
        a.allocate("r", 1)
        a.allocate("r", 4)
        assert a.predicted_rate("r") == 4.0 and a.reserved_for("r") == 8
        a.allocate("r", 0)
        a.allocate("r", 0)
        assert a.predicted_rate("r") == 1.0         # 4 -> 2 -> 1
        assert a.get_stats()["shared_pops"] == 2    # calls needing nothing cost nothing


def test_reservations_are_loose_references_invisible_to_rows():
    seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=64, num_rows=4,
                                                   row_width=16, hand_size=64))
    with seg, seg.client() as c:
        row = c.claim_row()
        a = PredictiveBlockAllocator(client=c, prediction_horizon=4)
        ids = np.concatenate([a.allocate("r", 1), a.allocate("r", 2)])
        c.append(row, ids)
        a.detach(ids)
        assert a.reserved_for("r") == 8
        assert c.slot().hand_count == 8             # the reservation, in the hand
        assert seg.num_blocks[row] == 3 and not seg.table[row, 3:].any()   # zero tail
        assert seg.free_blocks() == 63 - 11
        a.end_request("r")
        assert c.slot().hand_count == 0 and seg.free_blocks() == 63 - 3


def test_end_request_gives_everything_back_in_one_operation():
    with PredictiveBlockAllocator(100, prediction_horizon=4) as a:
        ids = np.concatenate([a.allocate("r", 1), a.allocate("r", 3)])
        assert a.get_num_free() == 100 - 16
        a.end_request("r", ids)
        s = a.get_stats()
        assert a.get_num_free() == 100 and s["shared_pushes"] == 1
        assert s["reserved"] == 0 and s["active_requests"] == 0
        with pytest.raises(UnknownRequest):
            a.reserved_for("r")


def grow(a, rid, *calls):
    return [b for n in calls for b in a.allocate(rid, n).tolist()]


def test_pressure_reclaims_other_requests_reservations():
    with PredictiveBlockAllocator(22, prediction_horizon=4) as a:
        grow(a, "a", 1, 2)                          # 3 + 8 reserved
        grow(a, "b", 1, 1)                          # 2 + 4 reserved
        assert a.get_num_free() == 5 and a.get_num_reserved() == 12
        ids = a.allocate("c", 10)                   # 5 free + 5 reclaimed
        assert len(set(ids.tolist())) == 10
        s = a.get_stats()
        assert s["reclaims"] == 1 and s["reclaimed_blocks"] == 5
        assert a.get_num_free() == 0 and a.get_num_reserved() == 7
        assert a.reserved_for("a") == 3 and a.reserved_for("b") == 4   # largest first


def test_failure_only_when_free_plus_reserved_fall_short_and_changes_nothing():
    with PredictiveBlockAllocator(22, prediction_horizon=4) as a:
        grow(a, "a", 1, 2)
        grow(a, "b", 1, 1)
        before = (a.get_num_free(), a.reserved_for("a"), a.reserved_for("b"),
                  a.client.slot().hand_count)
        with pytest.raises(bt.OutOfBlocks, match="pool has 5 free and other requests reserve 12"):
            a.allocate("c", 18)
        assert (a.get_num_free(), a.reserved_for("a"), a.reserved_for("b"),
                a.client.slot().hand_count) == before
        with pytest.raises(UnknownRequest):
            a.reserved_for("c")                     # the failed call left no trace
        assert len(a.allocate("c", 17)) == 17       # exactly free + reserved


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_traffic_never_fails_while_free_plus_reserved_suffice(seed):
    rng = random.Random(seed)
    with PredictiveBlockAllocator(64, prediction_horizon=rng.randint(1, 6)) as a:
        held = {}
        for _ in range(600):
            rid = rng.randrange(8)
            if rid in held and rng.random() < 0.1:
                a.end_request(rid, held.pop(rid))
                continue
            n = rng.choice([0, 1, 1, 1, 2, 5])
            avail = a.get_num_free() + a.get_num_reserved()
            try:
                ids = a.allocate(rid, n)
            except bt.OutOfBlocks:
                assert n > avail, (n, avail)
                continue
            held.setdefault(rid, []).extend(ids.tolist())
        everything = [b for ids in held.values() for b in ids]
        assert len(everything) == len(set(everything))     # nothing handed out twice
        assert a.client.slot().hand_count == len(everything) + a.get_num_reserved()
        for rid in list(held):
            a.end_request(rid, held.pop(rid))
        a.release_reservations()
        assert a.get_num_free() == 64 and a.client.slot().hand_count == 0


def test_hand_too_small_for_the_prediction_still_allocates():
    seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=64, hand_size=4))
    with seg, seg.client() as c:
        a = PredictiveBlockAllocator(client=c, prediction_horizon=8)
        assert len(grow(a, "r", 1, 2)) == 3         # 2 + 16 would not fit the hand
        assert a.get_num_reserved() == 0 and a.get_stats()["failed_pops"] == 1


def test_max_reserve_caps_one_request():
    with PredictiveBlockAllocator(100, prediction_horizon=8, max_reserve=3) as a:
        grow(a, "r", 1, 4)
        assert a.reserved_for("r") == 3


@pytest.mark.parametrize("call, exc", [
    (lambda a, ids: a.free([ids[0], ids[0]]), bt.NotHeld),          # listed twice
    (lambda a, ids: a.free([50]), bt.NotHeld),                      # never handed out
    (lambda a, ids: a.free([-1]), bt.NotHeld),
    (lambda a, ids: a.free([1.5]), bt.InvalidArgument),
    (lambda a, ids: a.end_request("nobody"), UnknownRequest),
    (lambda a, ids: a.end_request("r", [77]), bt.NotHeld),
    (lambda a, ids: a.allocate("r", -1), bt.OutOfRange),
    (lambda a, ids: a.allocate("r", 2.0), bt.InvalidArgument),
    (lambda a, ids: a.allocate(None, 1), bt.InvalidArgument),
    (lambda a, ids: a.predicted_rate("nobody"), KeyError),
])
def test_bad_input_changes_nothing(call, exc):
    with PredictiveBlockAllocator(100) as a:
        ids = a.allocate("r", 2).tolist()
        before = (a.get_num_free(), a.get_num_reserved(), a.client.slot().hand_count,
                  a.predicted_rate("r"))
        with pytest.raises(exc):
            call(a, ids)
        assert (a.get_num_free(), a.get_num_reserved(), a.client.slot().hand_count,
                a.predicted_rate("r")) == before
        a.free(ids)
        with pytest.raises(bt.NotHeld, match="already freed"):
            a.free(ids)                             # double free


def test_unknown_request_is_a_key_error_and_an_invalid_argument():
    e = UnknownRequest("x")
    assert isinstance(e, KeyError) and isinstance(e, bt.InvalidArgument) and str(e) == "x"


def test_config_errors():
    with pytest.raises(bt.ConfigError):
        PredictiveBlockAllocator(0)
    with pytest.raises(bt.ConfigError):
        PredictiveBlockAllocator(10, alpha=0)
    seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=64))
    with seg, seg.client() as c, pytest.raises(bt.ConfigError, match="has 63 blocks"):
        PredictiveBlockAllocator(100, client=c)


def _reserve_and_wait(name, conn):
    seg = bt.Segment.attach(name)
    c = seg.client()
    a = PredictiveBlockAllocator(client=c, prediction_horizon=4)
    grow(a, "r", 1, 2)
    conn.send((c.id, a.get_num_reserved()))
    conn.recv()                                     # killed before this returns


def test_a_dead_process_reservations_are_recovered(shm_name):
    with bt.Segment.create(shm_name, bt.SegmentConfig(blocks_per_pool=256)) as seg:
        free = seg.free_blocks()
        parent, child = FORK.Pipe()
        p = FORK.Process(target=_reserve_and_wait, args=(shm_name, child))
        p.start()
        assert parent.poll(30), "child did not report"
        cid, reserved = parent.recv()
        assert reserved == 8 and seg.free_blocks() == free - 11
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        seg.recover_client(cid)
        assert seg.free_blocks() == free
        assert seg.check().clean


def test_ids_are_int32_arrays():
    with PredictiveBlockAllocator(10) as a:
        ids = a.allocate("r", 3)
        assert isinstance(ids, np.ndarray) and ids.dtype == np.int32
        assert a.allocate("r", 0).shape == (0,)
