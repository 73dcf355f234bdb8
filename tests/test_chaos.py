"""Chaos: client processes allocate, append, share and free as fast as they
can while one of them is killed with SIGKILL, again and again; btd recovers
each one, and after every recovery the invariant is checked:

- bt_seg_check(BT_CHECK_FROZEN) -- an exact check under load -- finds every
  block free exactly once or held with a count equal to its holders
  (refcnt_fixed == leaked == double_free == rows_fixed == 0);
- nothing the dead client held remains held: its slot is free, no row is
  owned by it;
- the survivors' rows are intact: each survivor compares its rows with its
  private record, and its hand with its loose blocks;
- no block is ever handed out twice: each worker stamps the blocks it holds
  in a side array (DPDK's mempool stress test does the same), and a fresh
  allocation that another live worker still stamps is counted as an error.

The pool is big enough for clients' magazines (free blocks cached in a
client's slot, bt.h section 4): clients die with blocks in them, and in the
middle of a refill or a flush; the checks above count them as free.

KILLS (env) sets the number of client kills (make chaos KILLS=10000).
Also: btd itself killed under load and restarted (the new one adopts), and a
client stopped inside a call while another dies (recovery must not wedge).
"""
import faulthandler
import os
import random
import signal
import sys
import time
import traceback

import numpy as np
import pytest

from blocktable import Segment, ffi, lib
from blocktable import errors as E
from blocktable.connect import connect

from blocktable_daemon.testing import DaemonProcess, stack_of, wait_for

KILLS = int(os.environ.get("KILLS", "200"))
WORKERS = int(os.environ.get("CHAOS_WORKERS", "4"))
SIZES = {"blocks_per_pool": 4096, "num_rows": 48, "row_width": 24, "max_clients": 16,
         "hand_size": 64}
MAX_ROWS, MAX_LOOSE = 4, 16
PROBLEMS = ("refcnt_fixed", "leaked", "double_free", "rows_fixed", "bad_entries")
# Errors that a racing but correct worker meets: nothing changed, go on.
# Busy: reading a row that a dead client left mid-write, before its repair.
EXPECTED = (E.OutOfBlocks, E.RowFull, E.HandFull, E.OutOfRows, E.NotHeld, E.OutOfRange,
            E.Busy)


# ---- the side array: what each worker believes it holds -------------------------------------
class Side:
    """Shared with the workers through an mmap'd file.
    holds[w, b]: references worker w holds on block b (its writer is w only);
    ctl[w]: slot, pid, verify request, verify ack, verify errors, ops,
    dead flag, double-holder detections; stop[0]: ask every worker to finish,
    stop[1]: double-holder detections of all incarnations (never reset)."""
    SLOT, PID, REQ, ACK, VERR, OPS, DEAD, DOUBLE = range(8)

    def __init__(self, path, workers, total, create=False):
        n_holds = workers * total * 2
        size = n_holds + workers * 8 * 8 + 16
        if create:
            with open(path, "wb") as f:
                f.truncate(size)
        raw = np.memmap(path, np.uint8, "r+", shape=(size,))
        self.holds = raw[:n_holds].view(np.int16).reshape(workers, total)
        self.ctl = raw[n_holds:n_holds + workers * 64].view(np.int64).reshape(workers, 8)
        self.stop = raw[n_holds + workers * 64:].view(np.int64)


def worker(w, seg_name, sock, side, seed, via_daemon, parent_seg):
    """Run until side.stop: random operations, each checked against a private
    record. Runs in a forked child; never returns."""
    rc = 0
    try:
        faulthandler.enable()
        rng = random.Random(seed)
        if via_daemon:
            cl = connect(seg_name, socket=sock)
            seg = cl.segment
        else:
            seg = parent_seg
            cl = seg.client()
        global _SEG, _HOLDS
        _SEG, _HOLDS = seg, side.holds[w]
        ctl, holds = side.ctl[w], side.holds[w]
        ctl[Side.SLOT], ctl[Side.PID] = cl.id, os.getpid()
        num_rows = seg.config.num_rows
        rows, loose = {}, []
        while not side.stop[0]:
            if ctl[Side.REQ] != ctl[Side.ACK]:
                ctl[Side.VERR] += verify(cl, seg, rows, loose)
                ctl[Side.ACK] = ctl[Side.REQ]
            try:
                one_op(rng, cl, seg, side, w, rows, loose, num_rows)
            except E.Frozen:
                time.sleep(0.001)        # a sweeper died mid-repair; btd will thaw it
            ctl[Side.OPS] += 1
        cl.close()
    except BaseException:
        traceback.print_exc()
        rc = 1
    finally:
        sys.stderr.flush()
        os._exit(rc)


def one_op(rng, cl, seg, side, w, rows, loose, num_rows):
    holds = side.holds[w]
    x = rng.random()
    try:
        if x < 0.10 and len(rows) < MAX_ROWS:
            rows[cl.claim_row(key=rng.getrandbits(40))] = []
        elif x < 0.30 and rows:                              # fresh blocks into a row
            r = rng.choice(list(rows))
            ids = cl.alloc_append(r, rng.randint(1, 3))
            np.add.at(holds, ids, 1)
            rows[r] += ids.tolist()
        elif x < 0.45 and len(loose) < MAX_LOOSE:            # fresh loose blocks: stamp check
            ids = cl.alloc(rng.randint(1, 3))
            check_exclusive(side, w, ids)
            np.add.at(holds, ids, 1)
            if rows and rng.random() < 0.5:
                r = rng.choice(list(rows))
                try:
                    cl.append(r, ids)
                    rows[r] += ids.tolist()
                    return
                except E.RowFull:
                    pass
            loose += ids.tolist()
        elif x < 0.55 and loose:                              # drop loose references
            k = rng.randint(1, len(loose))
            ids = np.array(loose[-k:], np.int32)
            np.subtract.at(holds, ids, 1)                    # unstamp before the release
            try:
                cl.release(ids)
            except BaseException:
                np.add.at(holds, ids, 1)
                raise
            del loose[-k:]
        elif x < 0.68 and rows:                               # share someone's prefix
            other = rng.randrange(num_rows)
            ids, info = seg.read_row(other)
            ids = ids[:rng.randint(1, 4)].copy()
            if info.owner == 0 or len(ids) == 0:
                return
            # Sharing is by id: between our read and our incref the block may
            # have been freed and handed to someone else, and we would hold a
            # reference on their fresh block (legal, but not a prefix). A
            # prefix cache checks it still is one; so do we, before stamping.
            if rng.random() < 0.5:
                r = rng.choice(list(rows))
                cl.append_shared(r, ids)
                if not still_prefix(seg, other, info, ids):
                    cl.truncate(r, len(rows[r]))
                    return
                rows[r] += ids.tolist()
            elif len(loose) < MAX_LOOSE:
                cl.share(ids)
                if not still_prefix(seg, other, info, ids):
                    cl.release(ids)
                    return
                loose += ids.tolist()
            else:
                return
            np.add.at(holds, ids, 1)
        elif x < 0.80 and rows:                               # truncate
            r = rng.choice(list(rows))
            keep = rng.randint(0, len(rows[r]))
            ids = np.array(rows[r][keep:], np.int32)
            np.subtract.at(holds, ids, 1)
            try:
                cl.truncate(r, keep)
            except BaseException:
                np.add.at(holds, ids, 1)
                raise
            del rows[r][keep:]
        elif x < 0.90 and rows:                               # end a request
            r = rng.choice(list(rows))
            ids = np.array(rows[r], np.int32)
            np.subtract.at(holds, ids, 1)
            try:
                cl.release_row(r)
            except BaseException:
                np.add.at(holds, ids, 1)
                raise
            del rows[r]
        elif rows:
            r = rng.choice(list(rows))
            cl.set_tokens(r, len(rows[r]) * 16)
    except EXPECTED:
        pass


def still_prefix(seg, row, info, ids):
    try:
        now, info2 = seg.read_row(row)
    except E.Busy:                      # its writer died mid-write: not a prefix to trust
        return False
    return (info2.owner == info.owner and info2.generation == info.generation
            and now[:len(ids)].tolist() == ids.tolist())


def check_exclusive(side, w, ids):
    """A block fresh from the allocator must be stamped by no live worker.
    The dead flags are read before the stamps: the harness zeroes a dead
    worker's stamps before it clears its flag."""
    dead = side.ctl[:, Side.DEAD] != 0
    others = side.holds[:, ids].copy()
    others[w] = 0
    others[dead] = 0
    if others.any():
        side.ctl[w, Side.DOUBLE] += 1
        side.stop[1] += 1
        bad = [(int(b), np.nonzero(others[:, i])[0].tolist(), _block(b)) for i, b in enumerate(ids)
               if others[:, i].any()]
        slots = [(k, *(getattr(_SEG.client_slot(k), f) for f in ("state", "pid", "start_time")))
                 for k in side.ctl[:, Side.SLOT].tolist() if k]
        print(f"worker {w} at {time.time():.6f}: fresh blocks also held by live workers: {bad}; "
              f"workers' (slot, state, pid, start): {slots}; pids {side.ctl[:, Side.PID].tolist()}",
              file=sys.stderr)


_SEG = _HOLDS = None


def _block(b):
    info = _SEG.block(int(b)) if _SEG is not None else None
    return (info.ref_count, info.owner) if info else None


def verify(cl, seg, rows, loose):
    """Mismatches between the segment and this worker's private record."""
    bad = 0
    for r, want in rows.items():
        ids, info = seg.read_row(r)
        if info.owner != cl.id or ids.tolist() != want:
            print(f"row {r}: owner {info.owner} (me {cl.id}), {ids.tolist()} != {want}",
                  file=sys.stderr)
            bad += 1
    mine = np.bincount(np.array([b for ids in rows.values() for b in ids] + loose, np.int64),
                       minlength=len(_HOLDS))
    if (mine != _HOLDS).any():
        diff = np.nonzero(mine != _HOLDS)[0]
        print(f"stamps disagree with the record at {diff[:8].tolist()}: "
              f"{_HOLDS[diff[:8]].tolist()} != {mine[diff[:8]].tolist()}", file=sys.stderr)
        bad += 1
    slot = cl.slot()
    if slot.hand_count != len(loose) or slot.rows != len(rows):
        print(f"slot: hand {slot.hand_count} != {len(loose)} or rows {slot.rows} != "
              f"{len(rows)}", file=sys.stderr)
        bad += 1
    return bad


# ---- the harness -------------------------------------------------------------------------------
class Chaos:
    def __init__(self, tmp_path, workers=WORKERS, seed=None):
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.d = DaemonProcess(tmp_path, sizes=SIZES).start()
        self.seg = Segment.attach(self.d.segment)
        self.total = self.seg.info.total_blocks
        self.side = Side(str(tmp_path / "side"), workers, self.total, create=True)
        self.pids = [0] * workers
        self.spawned = 0
        self.kills = self.checks = self.in_op_deaths = 0
        self.magazines_seen = 0          # blocks seen cached in clients' magazines (client.c)
        for w in range(workers):
            self.spawn(w)

    def spawn(self, w):
        self.side.holds[w] = 0
        self.side.ctl[w] = 0
        self.spawned += 1
        seed = self.rng.randrange(1 << 30)
        pid = os.fork()
        if pid == 0:
            worker(w, self.d.segment, self.d.socket, self.side, seed, w % 2 == 0, self.seg)
        self.pids[w] = pid
        wait_for(lambda: self.side.ctl[w, Side.SLOT] != 0 or self._exited(w), 30,
                 f"worker {w} to attach")
        assert not self._exited(w), f"worker {w} failed at start"

    def _exited(self, w):
        pid, status = os.waitpid(self.pids[w], os.WNOHANG)
        if pid:
            self.pids[w] = -status - 1
            return True
        return self.pids[w] < 0

    def alive(self):
        return [w for w, p in enumerate(self.pids) if p > 0]

    def progress(self, workers=None, ops=20, timeout=30):
        """Wait until each worker made `ops` more operations."""
        workers = self.alive() if workers is None else workers
        start = {w: self.side.ctl[w, Side.OPS] for w in workers}

        def done():
            gone = [w for w in workers if self._exited(w)]
            assert not gone, f"workers {gone} died on their own (status {self.pids})"
            return all(self.side.ctl[w, Side.OPS] >= start[w] + ops for w in workers)
        wait_for(done, timeout, f"workers {workers} to make progress")

    def kill(self, w):
        """SIGKILL worker w and reap it; returns its slot."""
        slot, pid = int(self.side.ctl[w, Side.SLOT]), self.pids[w]
        self.side.ctl[w, Side.DEAD] = 1               # its stamps stop counting
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        self.pids[w] = 0
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"worker {w} had died on its own before the kill (status {status:#x})"
        self.kills += 1
        if self.seg.client_slot(slot).in_op:
            self.in_op_deaths += 1
        return slot, pid

    def wait_recovered(self, slot, pid, timeout=20):
        try:
            wait_for(lambda: self.seg.client_slot(slot).state == lib.BT_CLIENT_FREE
                     or self.seg.client_slot(slot).pid != pid, timeout,
                     f"slot {slot} (pid {pid}) to be recovered")
        except TimeoutError as e:
            raise TimeoutError(f"{e}: {self.seg.client_slot(slot)}\nbtd's log:\n"
                               f"{self.d.log()[-3000:]}\nbtd's stack:\n"
                               f"{stack_of(self.d.pid)}") from None

    def frozen_check(self):
        rep = ffi.new("bt_check_report *")
        rc = lib.bt_seg_check(self.seg._s(), lib.BT_CHECK_FROZEN, 5000, rep)
        assert rc == 0, ffi.string(lib.bt_errname(rc))
        problems = {k: getattr(rep, k) for k in PROBLEMS if getattr(rep, k)}
        assert not problems, f"invariant broken: {problems} (seed {self.seed})"
        assert rep.blocks_free + rep.blocks_held == self.total - 1
        self.checks += 1
        self.magazines_seen = max([self.magazines_seen] + [
            self.seg.client_slot(int(k)).magazine for k in self.side.ctl[:, Side.SLOT] if k])
        return rep

    def no_rows_of(self, slot):
        owned = [r for r in range(SIZES["num_rows"]) if self.seg.row_info(r).owner == slot]
        assert not owned, f"rows {owned} still owned by dead slot {slot}"

    def survivors_verify(self, timeout=30):
        ws = self.alive()
        for w in ws:
            self.side.ctl[w, Side.REQ] += 1
        wait_for(lambda: all(self.side.ctl[w, Side.ACK] == self.side.ctl[w, Side.REQ]
                             for w in ws), timeout, "survivors to verify their rows")
        errs = {w: int(self.side.ctl[w, Side.VERR]) for w in ws if self.side.ctl[w, Side.VERR]}
        assert not errs, f"survivors' rows damaged: {errs} (seed {self.seed})"
        assert not self.side.stop[1], \
            f"blocks held twice: {int(self.side.stop[1])} times (seed {self.seed})"

    def after_death(self, w, slot, pid):
        """The invariant, after one client's death."""
        self.wait_recovered(slot, pid)
        self.no_rows_of(slot)
        self.frozen_check()
        self.survivors_verify()
        self.spawn(w)

    def finish(self):
        """Stop every worker cleanly; everything must come back."""
        assert not self.side.stop[1], \
            f"blocks held twice: {int(self.side.stop[1])} times (seed {self.seed})"
        self.side.stop[0] = 1
        for w, pid in enumerate(self.pids):
            if pid > 0:
                _, status = os.waitpid(pid, 0)
                self.pids[w] = 0
                assert os.waitstatus_to_exitcode(status) == 0, f"worker {w} failed"
        wait_for(lambda: self.seg.free_blocks() == self.total - 1, 10, "every block free")
        rep = self.frozen_check()
        assert rep.blocks_held == 0

    def close(self):
        self.side.stop[0] = 1
        for pid in self.pids:
            if pid > 0:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ChildProcessError, ProcessLookupError):
                    pass
        self.seg.close()
        self.d.cleanup()


@pytest.fixture
def chaos(tmp_path):
    c = Chaos(tmp_path)
    yield c
    c.close()


def test_chaos_sigkill_clients(chaos):
    c = chaos
    t0 = time.monotonic()
    for k in range(KILLS):
        c.progress(ops=c.rng.randint(1, 40))
        w = c.rng.choice(c.alive())
        if k % 3 == 0:
            # Aim inside a call: most of a worker's time is Python between
            # calls, and dying inside one is what takes a repair.
            slot = int(c.side.ctl[w, Side.SLOT])
            wait_for(lambda: c.seg.client_slot(slot).in_op, 10, "a call", interval=0)
        else:
            time.sleep(c.rng.random() * 0.003)
        slot, pid = c.kill(w)
        c.after_death(w, slot, pid)
    c.finish()
    stats = c.d.request("stats")
    took = time.monotonic() - t0
    print(f"\nchaos: {c.kills} kills ({c.in_op_deaths} inside a call), "
          f"{stats['recoveries_total']} recoveries {stats['recoveries']}, {c.checks} invariant "
          f"checks, 0 lost, 0 held twice, up to {c.magazines_seen} blocks seen in a client's "
          f"magazine, in {took:.1f} s (seed {c.seed})")
    assert stats["recoveries_total"] == c.kills
    # SIZES give magazines of 32 (bt.h, section 4): the invariant held with
    # free blocks cached in clients' slots, killed with them.
    assert c.magazines_seen > 0


def test_chaos_daemon_killed_and_restarted(chaos):
    """btd dies with SIGKILL under load (sometimes mid-recovery); clients carry
    on; a new btd adopts the segment and recovers who died meanwhile."""
    c = chaos
    for round_ in range(4):
        c.progress(ops=30)
        w = c.rng.choice(c.alive())
        if round_ % 2:
            slot, pid = c.kill(w)                    # dies, then the daemon too: mid-recovery
            c.d.kill()
        else:
            c.d.kill()
            slot, pid = c.kill(w)                    # dies while nobody watches
        c.progress(ops=30)                           # the survivors keep working
        c.d.start()
        c.after_death(w, slot, pid)
        for _ in range(5):                           # the new daemon watches old clients
            c.progress(ops=10)
            w = c.rng.choice(c.alive())
            slot, pid = c.kill(w)
            c.after_death(w, slot, pid)
    assert "adopted" in c.d.log()
    c.finish()


def _catch_in_op(c, w, then, tries=2000):
    """SIGSTOP worker w while it is inside a call (in_op != 0), confirmed
    after the stop; `then` = SIGKILL to kill it there, else leave it stopped."""
    slot, pid = int(c.side.ctl[w, Side.SLOT]), c.pids[w]
    for _ in range(tries):
        wait_for(lambda: c.seg.client_slot(slot).in_op, 10, f"worker {w} inside a call",
                 interval=0)
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T",
                 10, f"worker {w} to stop")
        if c.seg.client_slot(slot).in_op:
            if then == signal.SIGKILL:
                return c.kill(w)
            return slot, pid
        os.kill(pid, signal.SIGCONT)
    pytest.fail(f"could not stop worker {w} inside a call in {tries} tries")


def test_chaos_stuck_client_does_not_wedge_recovery(chaos):
    c = chaos
    c.progress(ops=30)
    a, b = c.alive()[:2]
    others = [w for w in c.alive() if w not in (a, b)]
    a_slot, a_pid = _catch_in_op(c, a, signal.SIGSTOP)
    b_slot, b_pid = _catch_in_op(c, b, signal.SIGKILL)   # dies inside a call
    # btd reports the stuck client and the pending recovery...
    wait_for(lambda: any(cl["stuck"] and cl["slot"] == a_slot
                         for cl in c.d.request("clients")["clients"]), 20,
             "btd to report the stuck client")
    status = c.d.request("status")["segments"][0]
    assert status["stuck"][0]["pid"] == a_pid and status["stuck"][0]["proc_state"] == "T"
    assert status["pending_recoveries"] == 1
    assert c.seg.client_slot(b_slot).state == lib.BT_CLIENT_DEAD
    r = c.d.ctl("status")
    assert r.returncode == 0 and "stuck inside a call" in r.stdout
    # ...released what was consistent, and the others are not wedged.
    owned = []
    for r in range(SIZES["num_rows"]):
        try:
            if c.seg.row_info(r).owner == b_slot:
                owned.append(r)
        except E.Busy:                  # mid-write: the row B died writing, left for the repair
            owned.append(r)
    assert len(owned) <= 1, f"the dead client's consistent rows stay held: {owned}"
    if others:
        c.progress(others, ops=200)
    # Once the stuck client moves on, recovery completes by itself.
    os.kill(a_pid, signal.SIGCONT)
    c.wait_recovered(b_slot, b_pid)
    c.no_rows_of(b_slot)
    c.frozen_check()
    c.survivors_verify()
    stats = c.d.request("stats")
    assert any(k.endswith(":deferred") for k in stats["recoveries"]), stats["recoveries"]
    assert not c.d.request("status")["segments"][0]["stuck"]
    c.spawn(b)
    c.finish()
