"""Hostile calls on a live segment (issue 10): random calls of the Python
API with random arguments, many of them hostile (wrong types, negative,
huge). Every call that raises must have changed no shared state (the table,
counts, tokens, every block's reference count and owner, free blocks and
chunks, rows' owners and keys, client slots), and its error must be a
BtError subclass or a standard exception; a hostile argument must be
refused, with a message naming it.

Derandomized for `make test` (a fixed seed, a bounded number of calls);
BT_FUZZ_API_SEED and BT_FUZZ_API_CALLS explore further (make fuzz).
"""
import os
import random
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

import blocktable as bt

CFG = bt.SegmentConfig(blocks_per_pool=48, num_pools=2, num_rows=6, row_width=8,
                       max_clients=4, hand_size=32, chunk_size=4, num_chunks=24, dir_width=4)
SEED = int(os.environ.get("BT_FUZZ_API_SEED", "10"))
CALLS = int(os.environ.get("BT_FUZZ_API_CALLS", "1500"))

# Values no index, count, pool, pid or key may take: wrong types, and ints
# that fit no C integer type.
WRONG_TYPE = [Fraction(1, 2), Fraction(3), Decimal("1"), 1.0, 2.5, "1", b"1", None,
              np.float32(1), np.float64(0), [1], complex(1, 0)]
NEVER_FITS = [2**64 + 5, -2**63 - 1]


def snapshot(seg):
    c = seg.config
    slots = [seg.client_slot(i) for i in range(1, c.max_clients + 1)]
    return {
        "table": seg.table.tolist(), "nblocks": seg.num_blocks.tolist(),
        "ntokens": seg.num_tokens.tolist(),
        "blocks": [(b.ref_count, b.owner) for b in
                   (seg.block(i) for i in range(1, c.num_pools * c.blocks_per_pool))],
        "free": [seg.free_blocks(p) for p in range(c.num_pools)],
        "chunks": seg.free_chunks(),
        "rows": [(i.owner, i.flags, i.key, i.num_blocks, i.num_tokens, i.generation)
                 for i in (seg.row_info(r) for r in range(c.num_rows))],
        "paged": [seg.read_row(r)[0].tolist() for r in range(c.num_rows)],
        "slots": [(s.state, s.pid, s.hand_count, s.rows) for s in slots],
    }


class Fuzzer:
    def __init__(self, seg, rng):
        self.seg, self.rng = seg, rng
        self.clients = [seg.client(), seg.client()]
        self.c = self.clients[0]

    # -- argument makers: (value, hostile) ---------------------------------------------
    def hostile(self):
        r = self.rng.random()
        if r < 0.6:
            return self.rng.choice(WRONG_TYPE)
        if r < 0.8:
            return self.rng.choice(NEVER_FITS)
        return self.rng.choice([-5, -2, -2**31 - 1])

    def arg(self, valid, p=0.25, negative_ok=False):
        """A valid-looking value from `valid()`, or with probability p a
        hostile one (flagged so the checker knows it must be refused)."""
        if self.rng.random() < p:
            v = self.hostile()
            if negative_ok and isinstance(v, int) and -2**63 <= v < 0:
                return valid(), False
            return v, True
        v = valid()
        if self.rng.random() < 0.2:
            v = np.int64(v) if v >= 0 else np.int32(v)   # numpy integers are fine
        return v, False

    def row(self):
        return self.rng.randrange(-1, CFG.num_rows + 2)

    def small(self):
        return self.rng.randrange(0, 12)

    def ids(self):
        hold = [int(x) for x in self.seg.table.ravel() if x] or [1]
        n = self.rng.randrange(0, 4)
        pick = lambda: self.rng.choice(hold + [self.rng.randrange(-3, 100)])  # noqa: E731
        return [pick() for _ in range(n)]

    # -- one random call -------------------------------------------------------------------
    def call(self):
        """(description, thunk, {arg name: hostile?})."""
        c, seg, A = self.rng.choice(self.clients), self.seg, self.arg
        pool = lambda: self.rng.randrange(0, 3)      # noqa: E731
        which = self.rng.randrange(22)
        args = {}

        def named(**kw):
            for k, (v, h) in kw.items():
                args[k] = (v, h)
            return {k: v for k, (v, h) in kw.items()}
        if which == 0:
            a = named(n=A(self.small), pool=A(pool))
            return "alloc", lambda: c.alloc(a["n"], pool=a["pool"]), args
        if which == 1:
            a = named(key=A(self.small), row=A(self.row, negative_ok=False))
            paged = self.rng.random() < 0.5
            return "claim_row", lambda: c.claim_row(key=a["key"], row=a["row"], paged=paged), args
        if which == 2:
            a = named(row=A(self.row))
            return "release_row", lambda: c.release_row(a["row"]), args
        if which == 3:
            a = named(row=A(self.row), n=A(self.small), pool=A(pool))
            return "alloc_append", lambda: c.alloc_append(a["row"], a["n"], pool=a["pool"]), args
        if which == 4:
            a = named(row=A(self.row), keep=A(self.small))
            return "truncate", lambda: c.truncate(a["row"], a["keep"]), args
        if which == 5:
            a = named(row=A(self.row), index=A(self.small),
                      block_id=A(lambda: self.rng.choice(self.ids() or [0])))
            return "set_block", lambda: c.set_block(a["row"], a["index"], a["block_id"]), args
        if which == 6:
            a = named(row=A(self.row), start=A(self.small), stop=A(self.small))
            return "punch", lambda: c.punch(a["row"], a["start"], a["stop"]), args
        if which == 7:
            a = named(row=A(self.row), num_tokens=A(lambda: self.rng.randrange(0, 200),
                                                     negative_ok=True))
            return "set_tokens", lambda: c.set_tokens(a["row"], a["num_tokens"]), args
        if which == 8:
            a = named(src=A(self.row), dst=A(self.row))
            return "move", lambda: c.move(a["src"], a["dst"]), args
        if which == 9:
            a = named(a=A(self.row), b=A(self.row))
            return "swap", lambda: c.swap(a["a"], a["b"]), args
        if which == 10:
            a = named(row=A(self.row))
            ids = self.ids()
            return "append", lambda: c.append(a["row"], ids), args
        if which == 11:
            a = named(row=A(self.row))
            ids = self.ids()
            return "append_shared", lambda: c.append_shared(a["row"], ids), args
        if which == 12:
            a = named(row=A(self.row))
            ids = self.ids()
            return "set_row", lambda: c.set_row(a["row"], ids), args
        if which == 13:
            ids = self.ids()
            return "release", lambda: c.release(ids), args
        if which == 14:
            ids = self.ids()
            return "share", lambda: c.share(ids), args
        if which == 15:
            a = named(pool=A(pool))
            rows = [self.rng.randrange(0, CFG.num_rows) for _ in range(self.rng.randrange(0, 3))]
            n_new = [self.rng.randrange(0, 3) for _ in rows]
            return "step", lambda: c.step(rows, n_new, pool=a["pool"]), args
        if which == 16:
            a = named(slot=A(lambda: self.rng.randrange(0, CFG.max_clients + 2)))
            return "adopt_client", lambda: seg.adopt_client(a["slot"]), args
        if which == 17:
            a = named(pool=A(pool))
            return "free_blocks", lambda: seg.free_blocks(a["pool"]), args
        if which == 18:
            a = named(block_id=A(lambda: self.rng.randrange(-1, 100)))
            return "block", lambda: seg.block(a["block_id"]), args
        if which == 19:
            a = named(row=A(self.row))
            return "read_row", lambda: seg.read_row(a["row"]), args
        if which == 20:
            a = named(row=A(self.row), start=A(self.small, negative_ok=True), n=A(self.small))
            return "slots_row", lambda: seg.slots_row(a["row"], a["start"], a["n"]), args
        a = named(max_free=A(self.small), max_rows=A(self.small), pool=A(pool))
        return "step_plan", lambda: c.step_plan(max_free=a["max_free"], max_rows=a["max_rows"],
                                                pool=a["pool"]), args


def _names_it(msg, name, value):
    return f"{name}=" in msg or f"{name} " in msg


def test_hostile_calls_change_nothing_when_they_raise():
    rng = random.Random(SEED)
    with bt.Segment.create(None, CFG) as seg:
        f = Fuzzer(seg, rng)
        stats = {"raised": 0, "ok": 0}
        for i in range(CALLS):
            what, thunk, args = f.call()
            hostile = [k for k, (v, h) in args.items() if h]
            before = snapshot(seg)
            try:
                thunk()
            except (bt.BtError, TypeError, ValueError, IndexError) as e:
                stats["raised"] += 1
                after = snapshot(seg)
                where = f"call {i}: {what}({ {k: v for k, (v, h) in args.items()} }) -> {e!r}"
                assert after == before, f"{where} raised and changed shared state"
                if hostile:              # it names the hostile argument, or another bad one
                    assert any(_names_it(str(e), k, args[k][0]) for k in args), \
                        f"{where}: the message names no argument"
                for k in hostile:
                    v = args[k][0]
                    if not isinstance(v, (int, np.integer)) and len(hostile) == 1:
                        assert isinstance(e, TypeError), f"{where}: {k} of a wrong type"
                continue
            stats["ok"] += 1
            assert not hostile, (f"call {i}: {what} accepted hostile "
                                 f"{ {k: args[k][0] for k in hostile} }")
        assert stats["raised"] > CALLS // 10 and stats["ok"] > CALLS // 10, stats
        for c in f.clients:
            c.close()
        rep = seg.check()
        assert rep.clean and rep.blocks_held == 0, rep
