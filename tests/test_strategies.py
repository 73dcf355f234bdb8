"""Allocation strategies: each one's behaviour, seen in its stats."""
import os
import sys

import numpy as np
import pytest

import blocktable as bt
from blocktable.compress import compress_slots
from blocktable.strategies import (BlockAllocationStrategy, ContiguousAllocator,
                                   NumaAwareAllocator, ScatteredAllocator, UnknownRequest,
                                   count_runs, make_allocator, numa_node_of)

S = BlockAllocationStrategy


@pytest.fixture
def client():
    seg = bt.Segment.create(None, bt.SegmentConfig(num_pools=2, blocks_per_pool=1024,
                                                   hand_size=2048, num_rows=8))
    with seg, seg.client() as c:
        yield c


def interleaved_decode(alloc, requests=8, blocks=16):
    """Each request gains one block per step, all requests every step: what
    decode does to a shared free list."""
    rows = {r: [] for r in range(requests)}
    for _ in range(blocks):
        for r in rows:
            rows[r] += alloc.allocate(r, 1).tolist()
    return rows


def test_count_runs():
    assert count_runs([]) == 0 and count_runs([5]) == 1
    assert count_runs([1, 2, 3, 7, 8, 4]) == 3


def test_scattered_interleaves_requests(client):
    a = ScatteredAllocator(client)
    rows = interleaved_decode(a)
    s = a.get_stats()
    assert s["strategy"] == "SCATTERED" and s["shared_pops"] == 8 * 16
    assert s["mean_run_length"] < 1.1               # every block starts a run
    assert all(count_runs(ids) == 16 for ids in rows.values())


def test_contiguous_gives_each_request_runs(client):
    a = ContiguousAllocator(client, batch=256)
    rows = interleaved_decode(a)
    s = a.get_stats()
    assert s["strategy"] == "CONTIGUOUS"
    everything = [b for ids in rows.values() for b in ids]
    assert len(set(everything)) == 8 * 16           # nothing handed out twice
    assert s["mean_run_length"] >= 8                # measured 16: one run per request
    assert max(count_runs(ids) for ids in rows.values()) <= 2
    assert s["shared_pops"] == 1 and s["refills"] == 1
    # ... which is what makes slot mappings compressible:
    slots = np.concatenate([np.repeat(np.array(rows[0]) * 16, 16) + np.tile(np.arange(16), 16)])
    assert compress_slots(slots).num_runs <= 2


def test_contiguous_keeps_freed_blocks_up_to_its_limit(client):
    a = ContiguousAllocator(client, batch=16, cache_limit=20)
    ids = a.allocate("r", 40)
    assert count_runs(ids) == 1
    free = client.segment.free_blocks(0)
    a.free(ids[:10])                                # cached: no shared operation
    assert client.segment.free_blocks(0) == free and a.get_stats()["cached"] == 10
    a.free(ids[10:])                                # beyond the limit: pushed
    assert a.get_stats()["cached"] == 20
    assert client.segment.free_blocks(0) == free + 20
    a.trim()
    assert a.get_stats()["cached"] == 0 and client.segment.free_blocks(0) == 1023


def test_contiguous_under_pressure_refills_exactly_and_fails_cleanly(client):
    a = ContiguousAllocator(client, batch=256)
    hog = client.alloc(1023 - 10)                   # leave 10 free
    assert len(a.allocate("r", 8)) == 8             # a batch won't come: 8 will
    before = (client.segment.free_blocks(0), a.get_stats()["cached"], client.slot().hand_count)
    with pytest.raises(bt.OutOfBlocks, match="magazine holds"):
        a.allocate("r", 11)
    assert (client.segment.free_blocks(0), a.get_stats()["cached"],
            client.slot().hand_count) == before
    client.release(hog)


def test_predictive_through_make_allocator(client):
    a = make_allocator("predictive", client, prediction_horizon=3)
    rows = interleaved_decode(a, requests=4, blocks=8)
    s = a.get_stats()
    # per request: the first call sizes it, then one pop per 1 + 3 blocks
    assert s["strategy"] == "PREDICTIVE" and s["hit_rate"] == pytest.approx(5 / 8)
    assert s["shared_pops"] == 4 * 3
    assert len({b for ids in rows.values() for b in ids}) == 32


# ---- NUMA ----------------------------------------------------------------------
def fake_sys(tmp_path, devices=(), nodes=None):
    for bdf, node in devices:
        d = tmp_path / "bus/pci/devices" / bdf
        d.mkdir(parents=True)
        (d / "numa_node").write_text(f"{node}\n")
    for node, cpus in (nodes or {}).items():
        d = tmp_path / "devices/system/node" / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
    return str(tmp_path)


def test_numa_node_of_a_pci_device(tmp_path):
    root = fake_sys(tmp_path, [("0000:3b:00.0", 1), ("0000:5e:00.0", -1)])
    node, src = numa_node_of("0000:3b:00.0", root)
    assert node == 1 and "0000:3b:00.0/numa_node" in src
    node, src = numa_node_of("0000:5e:00.0", root)
    assert node == 0 and src.startswith("fallback") and "-1" in src
    node, src = numa_node_of("0000:99:00.0", root)
    assert node == 0 and src.startswith("fallback: no ")
    node, src = numa_node_of("tpu:3", root)
    assert node == 0 and "neither cpu" in src


def test_numa_node_of_a_cuda_device_through_the_driver(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)         # no torch: use /proc
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    root = fake_sys(tmp_path / "sys", [("0000:3b:00.0", 0), ("0000:af:00.0", 1)])
    proc = tmp_path / "proc"
    for bdf in ("0000:af:00.0", "0000:3b:00.0"):
        (proc / "driver/nvidia/gpus" / bdf).mkdir(parents=True)
    assert numa_node_of("cuda:1", root, str(proc))[0] == 1  # PCI order
    assert numa_node_of("cuda:0", root, str(proc))[0] == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert numa_node_of("cuda:0", root, str(proc))[0] == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")
    assert numa_node_of("cuda:0", root, str(proc))[1].startswith("fallback")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    node, src = numa_node_of("cuda:0", root, str(tmp_path / "noproc"))
    assert node == 0 and "no NVIDIA driver" in src


def test_numa_node_of_this_cpu(tmp_path):
    first = min(os.sched_getaffinity(0))
    root = fake_sys(tmp_path, nodes={0: "999", 1: f"{first}-{first + 1}"})
    assert numa_node_of(None, root)[0] == 1
    assert numa_node_of("cpu", str(tmp_path / "none"))[1].startswith("fallback")
    node, src = numa_node_of()                      # this machine, whatever it has
    assert isinstance(node, int) and node >= 0 and src


def test_numa_aware_uses_the_nodes_pool_then_spills(client, tmp_path):
    root = fake_sys(tmp_path, [("0000:3b:00.0", 1)])
    a = NumaAwareAllocator(client, device="0000:3b:00.0", sysfs_root=root)
    s = a.get_stats()
    assert s["strategy"] == "NUMA_AWARE" and s["numa_node"] == 1 and s["pool"] == 1
    ids = a.allocate(None, 1000)
    assert (ids // 1024 == 1).all()                 # all from node 1's pool
    ids = a.allocate(None, 30)                      # 24 left there: 6 spill to pool 0
    assert (ids // 1024 == 1).sum() == 24 and a.get_stats()["spilled_blocks"] == 6
    before = [client.segment.free_blocks(p) for p in (0, 1)]
    with pytest.raises(bt.OutOfBlocks):
        a.allocate(None, 2000)
    assert [client.segment.free_blocks(p) for p in (0, 1)] == before


def test_numa_fallback_is_visible(client, tmp_path):
    a = NumaAwareAllocator(client, device="0000:01:00.0", sysfs_root=str(tmp_path))
    s = a.get_stats()
    assert s["pool"] == 0 and s["numa_source"].startswith("fallback")


def test_node_to_pool(client, tmp_path):
    root = fake_sys(tmp_path, [("0000:3b:00.0", 1)])
    a = make_allocator(S.NUMA_AWARE, client, device="0000:3b:00.0", sysfs_root=root,
                       node_to_pool={1: 0})
    assert a.pool == 0


# ---- what every strategy shares --------------------------------------------------
@pytest.mark.parametrize("strategy", list(S))
def test_bad_input_changes_nothing(client, strategy):
    a = make_allocator(strategy, client)
    ids = a.allocate("r", 3).tolist()
    state = lambda: ([client.segment.free_blocks(p) for p in (0, 1)],  # noqa: E731
                     client.slot().hand_count, a.get_stats()["handed_out"])
    before = state()
    for call, exc in [(lambda: a.free([ids[0], ids[0]]), bt.NotHeld),
                      (lambda: a.free([9999]), bt.NotHeld),
                      (lambda: a.end_request("nobody"), UnknownRequest),
                      (lambda: a.allocate("r", -2), bt.OutOfRange),
                      (lambda: a.allocate("r", "3"), bt.InvalidArgument)]:
        with pytest.raises(exc):
            call()
        assert state() == before
    a.free(ids)
    with pytest.raises(bt.NotHeld):
        a.free(ids[:1])                             # double free
    a.end_request("r")
    a.close()


def test_make_allocator_refuses_unknown_strategies(client):
    with pytest.raises(bt.InvalidArgument, match="unknown strategy"):
        make_allocator("fastest", client)
    with pytest.raises(bt.InvalidArgument):
        make_allocator(3, client)
