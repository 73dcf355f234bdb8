"""Exhaustion (issue 6): every block taken, every row claimed, every chunk,
every hand slot, every client slot used, many connections to btd at once.
Each time: the one that asks gets a clear error (the documented class and
a message that says what ran out), nothing changes, the others -- other
clients, other processes, other pools, the daemon's other connections --
keep being served, and everything is usable again once released.

Connections are bounded and local (a Unix socket); the fd-exhaustion case
runs btd under a low RLIMIT_NOFILE instead of opening thousands of sockets.
"""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

import blocktable as bt
from blocktable.connect import DaemonError, connect

from btd.testing import DaemonProcess, child_env, wait_for

from conftest import assert_rejected

CFG = bt.SegmentConfig(num_pools=2, blocks_per_pool=16, num_rows=4, row_width=4,
                       max_clients=3, hand_size=8, chunk_size=2, num_chunks=3, dir_width=4)
SIZES = {"blocks_per_pool": 64, "num_rows": 8, "row_width": 8, "max_clients": 3,
         "hand_size": 16}


@pytest.fixture
def seg():
    with bt.Segment.create(None, CFG) as s:
        yield s


def clean(seg):
    rep = seg.check()
    assert rep.clean, rep
    return rep


def test_all_blocks_taken(seg):
    a, b = seg.client(), seg.client()
    rows = [a.claim_row(key=k) for k in range(3)]
    held = a.alloc(CFG.hand_size - 1).tolist()          # 7 loose
    for r in rows[:2]:
        a.alloc_append(r, CFG.row_width)                # 8 in rows: pool 0 has 15
    assert seg.free_blocks(0) == 0
    e = assert_rejected(seg, bt.OutOfBlocks, a.alloc_append, rows[2], 1, clients=[a, b])
    assert isinstance(e, MemoryError) and "not enough free blocks" in str(e)
    for call in (lambda: b.alloc(1), lambda: b.step([], [], arrive=[9], arrive_n=[1])):
        assert_rejected(seg, bt.OutOfBlocks, call, clients=[a, b])
    assert len(b.alloc(3, pool=1)) == 3                 # another pool is not affected
    clean(seg)
    a.release(held[:2])                                 # released: usable again
    assert len(b.alloc(2)) == 2 and seg.free_blocks(0) == 0
    b.release(b.alloc(0))
    a.release_row(rows[0])
    got = b.step([], [], arrive=[10], arrive_n=[3])
    assert len(got[0]) == 3
    clean(seg)


def test_hand_full(seg):
    a, b = seg.client(), seg.client()
    ids = a.alloc(CFG.hand_size)
    e = assert_rejected(seg, bt.HandFull, a.alloc, 1, clients=[a, b])
    assert "loose" in str(e)
    assert_rejected(seg, bt.HandFull, a.share, ids[:1], clients=[a, b])
    b.share(ids[:4])                                    # another client's hand is its own
    r = a.claim_row()
    a.append(r, ids[:2])                                # into a row: room in the hand again
    assert len(a.alloc(2)) == 2
    clean(seg)


def test_all_rows_claimed(seg):
    a, b = seg.client(), seg.client()
    mine = a.claim_rows(list(range(CFG.num_rows - 1)))
    theirs = b.claim_row(key=99)
    for cls, call in ((bt.OutOfRows, a.claim_row), (bt.OutOfRows, lambda: b.claim_row(paged=True)),
                      (bt.OutOfRows, lambda: b.claim_rows([1])),
                      (bt.RowStateError, lambda: a.claim_row(row=int(theirs)))):
        e = assert_rejected(seg, cls, call, clients=[a, b])
        assert "row" in str(e)
    assert_rejected(seg, bt.OutOfRows, a.claim_rows, [1, 2], clients=[a, b])
    # a step's releases stand even when its arrivals find no row
    a.alloc_append(int(mine[0]), 2)
    with pytest.raises(bt.OutOfRows):
        a.step([], [], free_rows=[int(mine[0])], arrive=[5, 6], arrive_n=[1, 1])
    assert seg.row_info(int(mine[0])).owner == 0 and seg.free_blocks(0) == 15
    clean(seg)
    got, rows = a.step([], [], arrive=[5], arrive_n=[1])   # usable again
    assert rows.tolist() == [int(mine[0])] and len(got) == 1
    b.release_row(theirs)
    assert b.claim_row(key=7) == theirs
    clean(seg)


def test_all_chunks_taken(seg):
    a = seg.client()
    r = a.claim_row(paged=True, raw=True)
    for i in range(CFG.num_chunks):                      # one entry per chunk
        a.set_block(r, i * CFG.chunk_size, 5 + i)
    assert seg.free_chunks() == 0
    r2 = a.claim_row(paged=True, raw=True)
    e = assert_rejected(seg, bt.OutOfChunks, a.append, r2, [1], clients=[a])
    assert isinstance(e, MemoryError) and "chunk" in str(e)
    assert_rejected(seg, bt.OutOfChunks, a.set_block, r, 7, 1, clients=[a])
    a.punch(r, 0, 1)                                     # a chunk of holes goes back
    assert seg.free_chunks() == 1
    a.append(r2, [1, 2])
    clean(seg)


ATTACH_AND_OPEN = """
import sys, json, blocktable as bt
s = bt.Segment.attach(sys.argv[1])
try:
    c = s.client()
    print(json.dumps({"id": c.id}))
except bt.BtError as e:
    print(json.dumps({"error": type(e).__name__, "msg": str(e)}))
"""


def other_process(name):
    r = subprocess.run([sys.executable, "-c", ATTACH_AND_OPEN, name], env=child_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_all_client_slots_used(shm_name):
    with bt.Segment.create(shm_name, CFG) as seg:
        clients = [seg.client() for _ in range(CFG.max_clients)]
        e = assert_rejected(seg, bt.OutOfClients, seg.client, clients=clients)
        assert "client slot" in str(e)
        got = other_process(shm_name)                    # another process: the same answer
        assert got["error"] == "OutOfClients", got
        ids = clients[0].alloc(2)                         # those who have one are served
        clients[1].share(ids)
        clients.pop(2).close()                            # released: usable again
        assert other_process(shm_name) == {"id": 3}      # (and closed again by its exit)
        for c in clients:
            c.close()
        assert clean(seg).blocks_held == 0


# ---- btd --------------------------------------------------------------------------------------
HOLD = """
import sys, time, blocktable as bt
c = bt.connect(sys.argv[2], socket=sys.argv[1])
c.alloc(3)
print(c.id, flush=True)
time.sleep(600)
"""


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProcess(tmp_path, sizes=SIZES).start()
    yield d
    d.cleanup()


def test_all_client_slots_via_the_daemon(daemon):
    holders = []
    try:
        for _ in range(SIZES["max_clients"]):
            p = subprocess.Popen([sys.executable, "-c", HOLD, daemon.socket, daemon.segment],
                                 env=child_env(), stdout=subprocess.PIPE, text=True)
            holders.append((p, int(p.stdout.readline())))
        with pytest.raises(DaemonError) as e:
            connect(daemon.segment, socket=daemon.socket)
        assert e.value.name == "BT_ENOCLIENTS" and "client slot" in e.value.message
        assert daemon.request("status")["pid"] == daemon.pid          # stays up
        free_before = daemon.request("pools")
        p, slot = holders.pop(0)
        p.send_signal(signal.SIGKILL)                                  # a holder dies
        p.wait()
        seg = bt.Segment.attach(daemon.segment)
        try:
            wait_for(lambda: seg.client_slot(slot).state == bt.lib.BT_CLIENT_FREE, 20,
                     f"btd to recover slot {slot}")
            c = connect(daemon.segment, socket=daemon.socket)         # usable again
            assert c.id == slot and len(c.alloc(3)) == 3
            c.close()
            c.segment.close()
        finally:
            seg.close()
        assert free_before != daemon.request("pools")
    finally:
        for p, _ in holders:
            p.kill()
            p.wait()


def request_on(sock):
    sock.sendall(b'{"id":"x","cmd":"status"}\n')
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1 << 16)
        assert chunk, "btd closed a connection it should serve"
        data += chunk
    return json.loads(data)


def test_many_connections_at_once(daemon):
    n = min(256, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
    conns = []
    try:
        for _ in range(n):                               # more than the listen backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(daemon.socket)                     # blocking: waits for the backlog
            s.settimeout(20)
            conns.append(s)
        for s in conns:                                  # every one is answered
            s.sendall(b'{"id":1,"cmd":"status"}\n')
        for s in conns:
            data = b""
            while not data.endswith(b"\n"):
                data += s.recv(1 << 16)
            assert json.loads(data)["status"] == "ok"
        for s in conns[: n // 2]:                        # half stall mid-request
            s.sendall(b'{"id":2,"cmd":"sta')
        c = connect(daemon.segment, socket=daemon.socket)   # others are served meanwhile
        assert len(c.alloc(2)) == 2
        c.close()
        c.segment.close()
    finally:
        for s in conns:
            s.close()
    assert daemon.request("status")["pid"] == daemon.pid


@pytest.fixture
def starved_daemon(tmp_path):
    """btd with 64 file descriptors: a flood of connections runs it out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        d = DaemonProcess(tmp_path, sizes=SIZES).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    yield d
    d.cleanup()


def flood(d, n=150):
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(d.socket)
        except BlockingIOError:
            pass                                         # the backlog is full: fine
        except OSError:
            s.close()
            break
        conns.append(s)
    return conns


def test_fd_exhaustion_keeps_serving_and_recovers(starved_daemon):
    d = starved_daemon
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.settimeout(20)
    first.connect(d.socket)
    assert request_on(first)["status"] == "ok"
    conns = flood(d)
    try:
        wait_for(lambda: len(os.listdir(f"/proc/{d.pid}/fd")) >= 60, 10, "btd to run out of fds")
        r = request_on(first)                            # an accepted peer is still answered:
        assert r["status"] == "ok" or "files open" in r["error"]["message"] \
            or r["error"]["name"] == "EMFILE", r         # ok, or a clear error (status stats
                                                         # the shm object: it needs an fd)
    finally:
        for s in conns:
            s.close()
    first.close()
    c = connect(d.segment, socket=d.socket)              # and new ones once it is over
    assert len(c.alloc(1)) == 1
    c.close()
    c.segment.close()
    assert d.request("status")["pid"] == d.pid


def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])                   # utime + stime


def test_fd_exhaustion_new_peers_get_a_clear_answer(starved_daemon):
    """While a flood holds every descriptor, a new peer gets an answer (an
    error reply is fine) within seconds, and btd does not spin."""
    d = starved_daemon
    conns = flood(d)
    try:
        wait_for(lambda: len(os.listdir(f"/proc/{d.pid}/fd")) >= 63, 10, "btd to run out of fds")
        t0 = cpu_ticks(d.pid)
        try:
            answer = d.request("status", timeout=5)
        except DaemonError as e:
            answer = e                                   # a clear error reply: fine
        except (ConnectionError, OSError) as e:
            answer = None
            why = f"{type(e).__name__}: {e}"
        time.sleep(1.0)
        busy = (cpu_ticks(d.pid) - t0) / os.sysconf("SC_CLK_TCK")
    finally:
        for s in conns:
            s.close()
    assert answer is not None, f"a new peer got no answer: {why}"
    assert busy < 0.5, f"btd used {busy:.2f} s of CPU while out of descriptors"
