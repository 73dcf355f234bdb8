"""Worker processes for test_multiprocess.py (a module of its own so that the
"spawn" start method can import them). Each reports through a queue or pipe;
none sleeps waiting for the parent: they block on events with timeouts."""
import random
import traceback

import numpy as np

import blocktable as bt


def take(stamps, ids, wid):
    """Stamp blocks as ours; a block someone else stamped was handed out twice."""
    ids = np.asarray(ids, np.int64)
    if ids.size:
        other = stamps[ids]
        if other.any():
            b = int(ids[other != 0][0])
            raise AssertionError(f"block {b} given to worker {wid} while worker "
                                 f"{int(stamps[b])} holds it")
        stamps[ids] = wid


def give(stamps, ids, wid):
    """Unstamp blocks before handing them back (never after: by then another
    process may own them)."""
    ids = np.asarray(ids, np.int64)
    if ids.size:
        assert (stamps[ids] == wid).all(), f"worker {wid} lost a stamp"
        stamps[ids] = 0


class Worker:
    """Random allocator and row traffic; knows exactly what it holds."""

    def __init__(self, seg, wid, stamps, seed):
        self.seg, self.c, self.wid, self.stamps = seg, seg.client(), wid, stamps
        self.rng = random.Random(seed)
        self.loose, self.rows = [], {}
        self.width = seg.config.row_width

    def alloc(self):
        try:
            ids = self.c.alloc(self.rng.randint(1, 6))
        except (bt.OutOfBlocks, bt.HandFull):
            return
        take(self.stamps, ids, self.wid)
        self.loose += ids.tolist()

    def release(self):
        k = self.rng.randint(1, len(self.loose))
        drop, self.loose = self.loose[:k], self.loose[k:]
        give(self.stamps, drop, self.wid)
        self.c.release(drop)

    def claim(self):
        try:
            row = self.c.claim_row(key=self.rng.getrandbits(63))
        except bt.OutOfRows:
            return
        self.rows[row] = []
        try:
            ids = self.c.alloc_append(row, self.rng.randint(0, 3))
        except bt.OutOfBlocks:
            return
        take(self.stamps, ids, self.wid)
        self.rows[row] += ids.tolist()

    def append(self):
        row = self.rng.choice(list(self.rows))
        k = min(len(self.loose), self.rng.randint(1, 3), self.width - len(self.rows[row]))
        ids, self.loose = self.loose[:k], self.loose[k:]
        self.c.append(row, ids)
        self.rows[row] += ids

    def step(self):
        rows = self.rng.sample(list(self.rows), min(3, len(self.rows)))
        free = [rows.pop()] if len(rows) > 1 and self.rng.random() < 0.5 else []
        n = [self.rng.randint(0, min(2, self.width - len(self.rows[r]))) for r in rows]
        for r in free:
            give(self.stamps, self.rows[r], self.wid)
        try:
            ids = self.c.step(rows, n, free_rows=free)
        except bt.OutOfBlocks:  # nothing changed: the freed row is still ours
            for r in free:
                take(self.stamps, self.rows[r], self.wid)
            return
        for r in free:
            del self.rows[r]
        take(self.stamps, ids, self.wid)
        at = 0
        for r, k in zip(rows, n):
            self.rows[r] += ids[at:at + k].tolist()
            at += k

    def release_row(self):
        row = self.rng.choice(list(self.rows))
        give(self.stamps, self.rows.pop(row), self.wid)
        self.c.release_row(row)

    def verify_rows(self):
        for row, ids in self.rows.items():
            got, info = self.seg.read_row(row)
            assert got.tolist() == ids and info.owner == self.c.id, f"row {row} differs"

    def one(self):
        r = self.rng.random()
        if r < 0.25:
            self.alloc()
        elif r < 0.35 and self.loose:
            self.release()
        elif r < 0.5 or not self.rows:
            self.claim()
        elif r < 0.65 and self.loose:
            self.append()
        elif r < 0.85:
            self.step()
        else:
            self.release_row()

    def held(self):
        return self.loose + [b for ids in self.rows.values() for b in ids]


def stress(name, wid, iters, stamps_raw, barrier, results, done):
    """Run `iters` random operations, report what we hold, keep holding it
    until the parent has checked the segment, then close."""
    try:
        stamps = np.frombuffer(stamps_raw, dtype=np.int32)
        seg = bt.Segment.attach(name)
        w = Worker(seg, wid, stamps, seed=wid)
        barrier.wait(30)
        for i in range(iters):
            w.one()
            if i % 64 == 0:
                w.verify_rows()
        w.verify_rows()
        results.put((wid, w.c.id, w.held(), None))
        if not done.wait(60):
            raise TimeoutError("the parent never finished its check")
        w.c.close()
    except BaseException:
        results.put((wid, None, None, traceback.format_exc()))


def hold_then_block(name, conn):
    """Take blocks and a row, report them, block until killed."""
    seg = bt.Segment.attach(name)
    c = seg.client()
    loose = c.alloc(5)
    row = c.claim_row(key=99)
    ids = c.alloc_append(row, 7)
    conn.send((c.id, loose.tolist(), row, ids.tolist()))
    conn.recv()  # nothing is ever sent: the parent kills us here


def churn_forever(name, conn, seed):
    """Random traffic without end, killed at a random moment by the parent."""
    seg = bt.Segment.attach(name)
    stamps = np.zeros(seg.info.total_blocks, np.int32)  # private: no cross-check
    w = Worker(seg, 1, stamps, seed)
    conn.send(w.c.id)
    while True:
        w.one()


def write_row_and_wait(name, ids, conn):
    """Append ids to row 0 (RAW), tell the parent, wait for its go to close."""
    with bt.Segment.attach(name) as seg, seg.client() as c:
        row = c.claim_row(row=0, raw=True)
        c.append(row, ids)
        conn.send(row)
        if not conn.poll(30):
            raise TimeoutError("no word from the parent")
        conn.recv()
