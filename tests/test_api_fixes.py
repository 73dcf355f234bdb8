"""Issue 10, "the Python API": a rejected call changes nothing, and a wrong
type is a TypeError naming the argument. Each test failed before its fix."""
import os
import signal
import socket
import subprocess
import sys
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

import blocktable as bt
from blocktable.connect import DaemonNotRunning, connect, request
from blocktable_daemon.testing import DaemonProcess, child_env, wait_for

from conftest import assert_rejected, snapshot, assert_same, gpu_exporter

DSIZES = {"blocks_per_pool": 256, "num_rows": 8, "row_width": 16, "max_clients": 4,
          "hand_size": 64}


# ---- adopt_client on a live slot of this process ----------------------------------
def test_adopt_client_on_a_live_clients_slot_changes_nothing(seg):
    """It raised ClientGone *and* released the client's rows and blocks and
    freed its slot; the stale handle then wiped whoever reused the slot."""
    c = seg.client()
    r = c.claim_row()
    ids = c.alloc_append(r, 3)
    loose = c.alloc(2)
    other = seg.client()                    # a second live client of this process
    for sid in (c.id, other.id):
        e = assert_rejected(seg, bt.ClientGone, seg.adopt_client, sid, clients=(c, other))
        assert f"slot={sid}" in str(e)
    assert seg.row_info(r).owner == c.id and seg.read_row(r)[0].tolist() == ids.tolist()
    assert seg.client_slot(c.id).state == bt.lib.BT_CLIENT_ACTIVE
    # the handles still work, and closing them releases exactly what they hold
    c.release(loose)
    c.close()
    assert seg.row_info(r).owner == 0
    nxt = seg.client()                      # may reuse c's slot: other keeps its own
    r2 = nxt.claim_row()
    nxt.alloc_append(r2, 1)
    other.close()
    assert seg.row_info(r2).owner == nxt.id and seg.num_blocks[r2] == 1
    nxt.close()
    assert seg.check().clean and seg.check().blocks_held == 0


def test_adopt_client_twice_keeps_the_first_adopter(seg):
    sid = seg.reserve_client(os.getpid())
    a = seg.adopt_client(sid)
    r = a.claim_row()
    a.alloc_append(r, 2)
    assert_rejected(seg, bt.ClientGone, seg.adopt_client, sid, clients=(a,))
    assert seg.num_blocks[r] == 2 and seg.row_info(r).owner == a.id
    a.close()


# ---- integers: int and numpy.integer, nothing else ----------------------------------
def test_claim_row_negative_row_and_key(seg, client):
    e = assert_rejected(seg, bt.OutOfRange, client.claim_row, row=-5, clients=(client,))
    assert "row=-5" in str(e)
    e = assert_rejected(seg, bt.OutOfRange, client.claim_row, key=-1, clients=(client,))
    assert "key=-1" in str(e) and "can't convert" not in str(e)
    assert isinstance(e, ValueError) or isinstance(e, IndexError)
    assert client.claim_row(row=-1) >= 0                 # -1 still means "any row"


@pytest.mark.parametrize("bad", [Fraction(1, 2), Decimal("1"), 1.0, "1", np.float32(1),
                                 None, b"1"])
def test_non_integers_are_a_type_error_naming_the_argument(seg, client, bad):
    r = client.claim_row()
    client.alloc_append(r, 3)
    cs = (client,)
    calls = [
        ("keep", lambda: client.truncate(r, bad)),
        ("row", lambda: client.truncate(bad, 0)),
        ("n", lambda: client.alloc(bad)),
        ("pool", lambda: client.alloc(1, pool=bad)),
        ("key", lambda: client.claim_row(key=bad)),
        ("row", lambda: client.claim_row(row=bad)),
        ("pid", lambda: seg.reserve_client(bad)),
        ("index", lambda: client.set_block(r, bad, 0)),
        ("num_tokens", lambda: client.set_tokens(r, bad)),
        ("row", lambda: client.release_row(bad)),
        ("n", lambda: client.alloc_append(r, bad)),
        ("pool", lambda: client.step([r], [1], pool=bad)),
        ("slot", lambda: seg.adopt_client(bad)),
        ("pool", lambda: seg.free_blocks(bad)),
        ("block_id", lambda: seg.block(bad)),
        ("row", lambda: seg.row_info(bad)),
        ("n", lambda: seg.slots_row(r, 0, bad)),
        ("max_free", lambda: client.step_plan(max_free=bad)),
    ]
    for name, call in calls:
        e = assert_rejected(seg, TypeError, call, clients=cs)
        assert isinstance(e, bt.BtError) and name in str(e), (name, str(e))


def test_numpy_integers_are_accepted(seg, client):
    r = client.claim_row(key=np.uint64(7), row=np.int32(2))
    assert r == 2 and seg.row_info(2).key == 7
    ids = client.alloc_append(np.int64(r), np.uint8(2), pool=np.int16(1))
    client.truncate(np.uint32(r), np.int64(1))
    assert seg.read_row(r)[0].tolist() == ids[:1].tolist()
    assert seg.free_blocks(np.int8(1)) == seg.free_blocks(1)


def test_alloc_bounds_and_types(seg, client):
    e = assert_rejected(seg, bt.OutOfBlocks, client.alloc, 10**12, clients=(client,))
    assert "n=1000000000000" in str(e) and not type(e) is MemoryError
    assert_rejected(seg, TypeError, client.alloc, "3", clients=(client,))
    e = assert_rejected(seg, bt.OutOfRange, client.alloc, -1, clients=(client,))
    assert "n=-1" in str(e)
    r = client.claim_row()
    assert_rejected(seg, bt.OutOfBlocks, client.alloc_append, r, 10**12, clients=(client,))


def test_step_plan_negative_sizes(client):
    for name in ("max_free", "max_rows", "max_arrive", "max_ids"):
        with pytest.raises(ValueError, match=name):
            client.step_plan(**{name: -1})
    with pytest.raises(bt.InvalidArgument, match="max_rows"):
        client.step_plan(max_rows=10**12)


def test_closed_segment_says_so(seg):
    seg.close()
    calls = [lambda: seg.read_row(0), lambda: seg.row_info(0), lambda: seg.free_blocks(),
             lambda: seg.client(), lambda: seg.block(1), lambda: seg.slots_row(0, 0, 4),
             lambda: seg.table[0], lambda: seg.num_blocks[0], lambda: seg.num_tokens.sum(),
             lambda: seg.check(), lambda: seg.views(), lambda: seg.free_chunks(),
             lambda: seg.slots_req([0], [0]), lambda: seg.client_slot(1)]
    for call in calls:
        with pytest.raises(bt.BtError, match="closed"):
            call()


# ---- CpuGpuBuffer, SparseBlockTable, seed BlockTable ----------------------------------
def test_cpugpubuffer_from_the_top_level():
    from blocktable import CpuGpuBuffer
    from blocktable.gpu.buffer import CpuGpuBuffer as G
    assert CpuGpuBuffer is bt.CpuGpuBuffer is G and "CpuGpuBuffer" in bt.__all__
    b = CpuGpuBuffer(4, 3, dtype=np.int32, pin_memory=False)   # vLLM's signature
    assert b.np.shape == (4, 3)
    b = CpuGpuBuffer((2, 5), np.int64)                          # the seed's
    assert b.np.shape == (2, 5) and b.np.dtype == np.int64


def test_sparse_position_means_the_token_position_everywhere():
    from blocktable.table import BlockTableConfig
    with bt.SparseBlockTable(BlockTableConfig(block_size=16, max_num_reqs=2,
                                              max_num_blocks_per_req=8)) as t:
        for pos, b in ((0, 3), (16, 4), (40, 5)):
            t.set_block(0, pos, b)
        assert t.get_row(0).tolist() == [3, 4, 5]
        for pos in range(48):
            assert t.get_block(0, pos) == [3, 4, 5][pos // 16]
            assert t.get_slot(0, pos) == [3, 4, 5][pos // 16] * 16 + pos % 16


def test_seed_block_table_stores_kernel_block_ids():
    from blocktable.table import BlockTable, BlockTableConfig
    t = BlockTable(BlockTableConfig(block_size=32, kernel_block_size=16, max_num_reqs=2,
                                    max_num_blocks_per_req=4))
    t.append_row(0, [0, 1, 2])
    assert t.get_row(0).tolist() == [0, 1, 2, 3, 4, 5]
    t.close()


# ---- connect() ---------------------------------------------------------------------
def test_connect_to_a_stopped_daemon_names_the_socket_and_its_slot_is_reclaimed(tmp_path):
    d = DaemonProcess(tmp_path, sizes=DSIZES, args=["--tick-ms", "50"])
    d.start(extra_env={"BT_RESERVE_TIMEOUT_S": "1"})
    try:
        os.kill(d.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError) as e:
                connect(d.segment, socket=d.socket, timeout=0.5)
            assert d.socket in str(e.value)
        finally:
            os.kill(d.pid, signal.SIGCONT)
        # A registration whose caller never adopts (what a connect that gave
        # up leaves, if btd served it late): the slot is freed within the bound.
        slot = request("register", {"segment": d.segment}, socket=d.socket)["slot"]
        seg = bt.Segment.attach(d.segment)
        try:
            assert seg.client_slot(slot).state == 3 and seg.client_slot(slot).pid == os.getpid()

            def all_free():
                return all(seg.client_slot(s).state == bt.lib.BT_CLIENT_FREE
                           for s in range(1, seg.config.max_clients + 1))
            wait_for(all_free, 15, "btd to free the slots nobody adopted")
            assert "did not adopt it" in d.log()
            # a prompt connect still works and keeps its slot past the bound
            c = connect(d.segment, socket=d.socket)
            r = c.claim_row()
            import time
            time.sleep(1.5)                 # longer than the bound: an adopted slot stays
            assert seg.client_slot(c.id).state == bt.lib.BT_CLIENT_ACTIVE
            assert seg.row_info(r).owner == c.id
            c.close()
        finally:
            seg.close()
    finally:
        d.cleanup()


def test_unreserve_races_adopt_one_wins(seg):
    sid = seg.reserve_client(os.getpid())
    c = seg.adopt_client(sid)
    with pytest.raises(bt.ClientGone):
        seg.unreserve_client(sid, os.getpid())      # adopted: stays
    assert seg.client_slot(sid).state == bt.lib.BT_CLIENT_ACTIVE
    c.close()
    sid = seg.reserve_client(os.getpid())
    seg.unreserve_client(sid, os.getpid())
    assert seg.client_slot(sid).state == bt.lib.BT_CLIENT_FREE
    with pytest.raises(bt.ClientGone):
        seg.adopt_client(sid)


def test_connect_without_daemon_names_the_socket(tmp_path):
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(DaemonNotRunning, match="nobody.sock"):
        connect("x", socket=path)


def test_permission_denied_names_the_socket_and_the_group(tmp_path):
    """As another uid (root bypasses the mode): the path and the hint."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    top = tmp_path / "d"
    top.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(top, 0o755)
    path = str(top / "btd.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)
    os.chmod(path, 0o660)
    try:
        code = ("import os, sys\nfrom blocktable.connect import connect\n"
                "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
                "try:\n    connect('x', socket=sys.argv[1], timeout=2)\n"
                "except PermissionError as e:\n    print('PE', e)\n")
        r = subprocess.run([sys.executable, "-c", code, path], env=child_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.startswith("PE"), (r.stdout, r.stderr)
        assert path in r.stdout and "join the socket's group" in r.stdout
    finally:
        s.close()


# ---- GPU: Mirror.reopen(wait) outwaits a dead exporter's descriptor --------------------
_PUBLISH = """
import sys, time
import blocktable as bt
from blocktable import ffi, lib
seg = bt.Segment.attach(sys.argv[1])
i = ffi.new("uint32_t *")
assert lib.bt_mirror_claim(seg._seg, i) == 0
d = ffi.new("bt_mirror_desc *")
d.alloc_size, d.table_off, d.counts_off = 1 << 20, 0, 1 << 16
assert lib.bt_mirror_publish(seg._seg, i[0], d) == 0
print(i[0], flush=True)
sys.stdin.read()                    # stay alive (a live exporter) until told
"""


def _publisher(name):
    """A process that publishes a mirror descriptor (no CUDA: the state
    machine only) and lives until its stdin closes."""
    p = subprocess.Popen([sys.executable, "-c", _PUBLISH, name], env=child_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    idx = int(p.stdout.readline())
    return p, idx


def test_reopen_waits_out_a_dead_exporters_descriptor(shm_name):
    """_await_live over real descriptors: a dead exporter's, still
    published, is waited out until a live one publishes; with no wait it is
    MirrorGone at once (what reopen(wait=30) did before, whatever the wait)."""
    import threading
    import time
    from blocktable.gpu import MirrorGone, MirrorNotFound
    from blocktable.gpu.mirror import _await_live, _find_in
    cfg = bt.SegmentConfig(num_pools=1, blocks_per_pool=2, num_rows=4, row_width=4,
                           max_clients=2, hand_size=1, max_mirrors=4)
    with bt.Segment.create(shm_name, cfg) as seg:
        find = lambda: _find_in(seg, None, 0, True, lambda d: 0)   # noqa: E731
        with pytest.raises(MirrorNotFound):
            _await_live(find, 0)
        dead, dead_idx = _publisher(shm_name)
        dead.stdin.close()
        dead.wait(30)                                     # published, then died
        with pytest.raises(MirrorGone, match=f"pid {dead.pid}"):
            _await_live(find, 0)
        t0 = time.monotonic()
        with pytest.raises(MirrorGone, match="within 0.3 s"):
            _await_live(find, 0.3)
        assert time.monotonic() - t0 >= 0.3
        got, live = {}, []

        def waiter():
            try:
                got["r"] = _await_live(find, 30)
            except Exception as e:        # reported below
                got["e"] = e
        th = threading.Thread(target=waiter)
        th.start()
        time.sleep(0.3)                   # the waiter is polling the dead descriptor
        assert th.is_alive()
        p, idx = _publisher(shm_name)
        live.append(p)
        try:
            th.join(30)
            assert not th.is_alive() and "e" not in got, got
            i, d, dev, watch = got["r"]
            assert i == idx != dead_idx and d.exporter_pid == p.pid and watch.alive()
        finally:
            p.stdin.close()
            p.wait(30)


def test_gpu_mirror_reopen_waits_for_the_new_exporter(shm_name):
    from blocktable import gpu
    ok, why = gpu.gpu_available()
    if not ok:
        pytest.skip(f"needs a CUDA GPU and cupy: {why}")
    import multiprocessing as mp
    import threading
    import time
    cfg = bt.SegmentConfig(block_size=16, num_pools=1, blocks_per_pool=2, num_rows=8,
                           row_width=8, max_clients=4, hand_size=1, max_mirrors=4)
    c = mp.get_context("spawn")
    with bt.Segment.create(shm_name, cfg) as seg:
        ready, stop = c.Queue(), c.Event()
        p = c.Process(target=gpu_exporter, args=(shm_name, ready, stop))
        p.start()
        _, gen, pid = ready.get(timeout=60)
        m = gpu.Mirror.open(seg, wait=5)
        os.kill(pid, signal.SIGKILL)
        p.join(30)
        stop2 = c.Event()
        p2 = c.Process(target=gpu_exporter, args=(shm_name, ready, stop2))
        threading.Timer(1.0, p2.start).start()   # publishes a moment after reopen starts
        try:
            m.reopen(wait=30)                    # raised MirrorGone at once before
            assert m.exporter_pid != pid and m.generation != gen
        finally:
            stop2.set()
            p2.join(60)
