"""Corruption: random bytes and words flipped in a live named segment, then
attach, operate, fsck and repair in a separate process (issue 6).

Every attached process can write every byte of the segment. bt.h promises
that such scribbling makes calls fail, never makes libbt write outside the
mapping or loop forever, and that a repairing fsck leaves a segment on which
no block is handed out twice. Each trial here:

  1. copies a populated segment (two live clients of this process: dense,
     raw and paged rows, shared and loose blocks, a token count) into a
     fresh named segment;
  2. corrupts 1-4 spots of one region through a plain mmap of
     /dev/shm/bt.<name>, as a hostile process would: a bit flipped, a byte
     or a 32/64-bit word set to poison (0, -1, an id just out of range, a
     huge count, a neighbour's value);
  3. in a forked child with a timeout: attaches, opens a client, makes every
     kind of call (results caught), runs a read-only fsck, a repair, and
     after a successful repair checks that the segment is clean and that
     every free block can be allocated once, with count 1, and is in no
     live row;
  4. classifies the trial: refused at attach with a clear error / calls
     refused with clear errors / detected and repaired / correct result /
     repair deferred (Busy). A crash (the child's signal), a hang (the
     timeout), an exception that is not a BtError, or a repair that leaves a
     double hand-out or an unclean segment fails the test.

Trials: BT_CORRUPTION_TRIALS (default 120, `make fuzz` more); seed
BT_CORRUPTION_SEED (default random, printed with the outcomes).
"""
import collections
import json
import mmap
import os
import random
import select
import signal
import struct
import sys
import time

import pytest

import blocktable as bt

from conftest import unique_name

CFG = bt.SegmentConfig(block_size=4, kernel_block_size=4, num_pools=2, blocks_per_pool=24, num_rows=8, row_width=8,
                       max_clients=4, hand_size=16, max_mirrors=1, chunk_size=4, num_chunks=8,
                       dir_width=4)
TRIALS = int(os.environ.get("BT_CORRUPTION_TRIALS", "120"))
SEED = int(os.environ.get("BT_CORRUPTION_SEED", random.randrange(1 << 30)))
TIMEOUT = 30.0                  # per trial; calls are bounded by ~2-5 s waits each
OP_BUDGET = 4.0                 # the child stops calling after this (scribbled
                                # seqlocks and freeze words make calls wait 2-5 s)
REGIONS = ["pools", "next", "refcnt", "owner", "rows", "table", "nblocks", "ntokens",
           "clients", "hands", "mirrors", "synced", "cpool", "cnext", "chunks", "dir",
           "cache", "cblocks", "ckeys", "cbuckets"]
CFG_AT = 32                     # bt_config in the header: after magic, format, sizes, ABI
OFF_AT = CFG_AT + bt.ffi.sizeof("bt_config")    # off[] follows it


def region_bounds(image):
    """(name, start, end) of the header and every region, from off[]."""
    offs = struct.unpack_from(f"<{len(REGIONS)}Q", image, OFF_AT)
    bounds = [("header", 0, offs[0])]   # the first region starts right after the header
    ends = list(offs[1:]) + [len(image)]
    for name, lo, hi in zip(REGIONS, offs, ends):
        if hi > lo:
            bounds.append((name, lo, hi))
    return bounds


def populate(seg):
    """Two clients with everything a segment holds; kept open by the caller
    (their slots are live: this process)."""
    a, b = seg.client(), seg.client()
    r1 = a.claim_row(key=1)
    x = a.alloc_append(r1, 4)
    a.set_tokens(r1, 13)
    r2 = b.claim_row(key=2)
    b.append_shared(r2, x[:2])
    b.alloc_append(r2, 3, pool=1)
    r3 = b.claim_row(key=3, raw=True)
    b.append(r3, [7, 0, 99])
    y = a.alloc(4, pool=1)
    b.share(y[:2])
    r4 = a.claim_row(key=4, paged=True)
    a.alloc_append(r4, 6)
    a.punch(r4, 1, 3)
    a.set_block(r4, 13, int(y[3]))
    r5 = b.claim_row(key=5, paged=True, raw=True)
    b.append(r5, [5, 6, 7])
    return a, b


def corrupt(mem, bounds, rng, total):
    """1-4 hits in one region; returns (region, [(offset, what)])."""
    name, lo, hi = rng.choice(bounds)
    hits = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(4)
        if kind == 0:                               # one bit
            off = rng.randrange(lo, hi)
            mem[off] ^= 1 << rng.randrange(8)
            hits.append((off, "bit"))
        elif kind == 1:                             # one byte
            off = rng.randrange(lo, hi)
            mem[off] = rng.randrange(256)
            hits.append((off, "byte"))
        else:                                       # an aligned word, poison
            w = 4 if kind == 2 else 8
            if hi - lo < w:
                continue
            off = lo + rng.randrange((hi - lo) // w) * w
            old = int.from_bytes(mem[off:off + w], "little")
            v = rng.choice([0, (1 << 8 * w) - 1, total, total - 1, total + 1, 0x7fffffff,
                            0x80000000, old + 1, old - 1, old ^ (1 << rng.randrange(8 * w)),
                            rng.randrange(16), rng.getrandbits(8 * w)]) % (1 << 8 * w)
            mem[off:off + w] = v.to_bytes(w, "little")
            hits.append((off, f"u{8 * w}={v:#x}"))
    return name, hits


# ---- the child: attach, operate, fsck, repair, verify ---------------------------------
def trial_child(name, out_fd):
    """Runs in a forked child; writes one JSON line and _exits. The calls
    are the same every trial, so that an uncorrupted copy gives the
    baseline (some calls fail by design: another client's rows)."""
    res = {"attach": "ok", "errors": collections.Counter(), "ok": 0, "undocumented": []}
    deadline = time.monotonic() + OP_BUDGET

    def call(fn, *a, **kw):
        if time.monotonic() > deadline:
            res["errors"]["(budget)"] += 1
            return None
        try:
            v = fn(*a, **kw)
            res["ok"] += 1
            return v
        except bt.BtError as e:
            res["errors"][type(e).__name__] += 1
        except Exception as e:  # noqa: BLE001 - the finding
            res["undocumented"].append(f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {e}")
        return None

    try:
        seg = bt.Segment.attach(name)
    except bt.BtError as e:
        res["attach"] = type(e).__name__
        return finish(res, out_fd)
    except Exception as e:  # noqa: BLE001
        res["attach"] = "undocumented"
        res["undocumented"].append(f"attach: {type(e).__name__}: {e}")
        return finish(res, out_fd)
    c = call(seg.client)
    total = seg.info.total_blocks
    for r in range(CFG.num_rows):
        call(seg.read_row, r)
        call(seg.slots_row, r, 0, 40)
    call(seg.slots_req, list(range(CFG.num_rows)), [-1, 0, 3, 5, 9, 17, 33, 40])
    call(seg.slots_qsl, [0, 3, 5], list(range(5)), rows=[1, 2])
    for b in range(total):
        call(seg.block, b)
    for p in range(CFG.num_pools):
        call(seg.free_blocks, p)
    call(seg.free_chunks)
    if c is not None:
        ids = call(c.alloc, 3, pool=1)
        row = call(c.claim_row, key=9)
        if row is not None:
            call(c.alloc_append, row, 2)
            call(c.append_shared, row, [int(x) for x in seg.table[1][:2]])
            if ids is not None:
                call(c.append, row, ids[:1])
            call(c.step, [row], [1], arrive=[11], arrive_n=[2])
            call(c.set_tokens, row, 40)
            call(c.truncate, row, 1)
        prow = call(c.claim_row, key=10, paged=True)
        if prow is not None:
            call(c.alloc_append, prow, 3)
            call(c.punch, prow, 0, 2)
            if ids is not None and len(ids) > 1:
                call(c.set_block, prow, 9, int(ids[1]))
        if ids is not None:
            call(c.share, ids[2:])
            call(c.release, ids[2:])
        for r in range(CFG.num_rows):                   # other clients' rows
            call(c.release_row, r)
            call(c.move, r, (r + 1) % CFG.num_rows)
        call(c.claim_rows, [20, 21])
        call(c.close)
    try:
        rep = seg.check()
        res["check"] = "clean" if rep.clean else "found"
    except bt.BtError as e:
        res["check"] = type(e).__name__
    try:
        seg.check(repair=True, wait_ms=50)
        res["repair"] = "ok"
    except bt.BtError as e:
        res["repair"] = type(e).__name__
    if res["repair"] == "ok":
        verify_repaired(seg, res)
    seg.close()
    return finish(res, out_fd)


def verify_repaired(seg, res):
    """After a repair: clean, and every free block handed out once with
    count 1, and in no live row."""
    rep = seg.check()
    if not rep.clean:
        res["after"] = f"unclean after repair: {rep}"
        return
    res["after"] = "clean"
    in_rows = set()
    for r in range(seg.config.num_rows):
        try:
            ids, info = seg.read_row(r)
        except bt.BtError as e:
            res["after"] = f"row {r} unreadable after repair: {type(e).__name__}"
            return
        if info.owner and not info.flags & bt.ROW_RAW:
            in_rows.update(int(x) for x in ids if x)
    for p in range(seg.config.num_pools):
        n = seg.free_blocks(p)
        try:
            got = seg.pool_pop(p, n).tolist()   # every free block of the pool, at once
        except bt.BtError as e:
            res["handout"] = f"pool {p}: {n} free after repair, pop: {type(e).__name__}"
            return
        lo, hi = p * seg.config.blocks_per_pool, (p + 1) * seg.config.blocks_per_pool
        for b in got:
            info = seg.block(b)
            if not lo <= b < hi or b == 0 or b in in_rows or info.ref_count != 1 \
                    or got.count(b) != 1:
                res["handout"] = (f"block {b} of pool {p} handed out wrongly after repair "
                                  f"(in a live row: {b in in_rows}, count {info.ref_count}, "
                                  f"times {got.count(b)})")
                return
        seg.pool_push(got)
    res["handout"] = "ok"


def finish(res, out_fd):
    res["errors"] = dict(res["errors"])
    os.write(out_fd, (json.dumps(res) + "\n").encode())
    os._exit(0)


def run_trial(name):
    """Fork the child; ("ok", result) or ("crash", signal) or ("hang", None)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            trial_child(name, w)
        finally:
            os._exit(3)
    os.close(w)
    deadline = time.monotonic() + TIMEOUT
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return "hang", None
        ready, _, _ = select.select([r], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            buf += chunk
    os.close(r)
    _, st = os.waitpid(pid, 0)
    if os.WIFSIGNALED(st):
        return "crash", os.WTERMSIG(st)
    if os.WEXITSTATUS(st) != 0 or not buf:
        return "crash", f"exit {os.WEXITSTATUS(st)}"
    return "ok", json.loads(buf)


def classify(res, base):
    """(outcome, problem or None); base: the uncorrupted copy's result."""
    if res["undocumented"]:
        return "undocumented exception", res["undocumented"][0]
    if res["attach"] != "ok":
        return "refused at attach", None
    if res.get("handout", "ok") != "ok":
        return "double hand-out after repair", res["handout"]
    if res["repair"] == "ok" and res.get("after") != "clean":
        return "repair left damage", res.get("after")
    if res["repair"] != "ok":
        return f"repair deferred ({res['repair']})", None
    if res["check"] != "clean":
        return "detected and repaired", None
    same = res["errors"] == base["errors"] and res["ok"] == base["ok"]
    return ("correct result" if same else "calls refused with clear errors"), None  # same: as uncorrupted, fsck clean


def report(config, text):
    """Lines on the terminal whatever the capture mode (pytest -q too)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print(text)
        return
    with capman.global_and_fixture_disabled():
        sys.stdout.write("\n" + text + "\n")


@pytest.fixture
def template(shm_name):
    """A populated segment, its clients kept live by this process."""
    seg = bt.Segment.create(shm_name, CFG)
    a, b = populate(seg)
    assert seg.check().clean
    with open(f"/dev/shm/bt.{shm_name}", "rb") as f:
        image = f.read()
    yield image
    a.close()
    b.close()
    seg.close()


def test_corruption_never_crashes_hangs_or_double_hands_out(template, request):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    rng = random.Random(SEED)
    bounds = region_bounds(template)
    total = CFG.num_pools * CFG.blocks_per_pool
    outcomes = collections.Counter()
    by_region = collections.defaultdict(collections.Counter)
    failures = []
    t0 = time.monotonic()
    name = unique_name("corrupt")
    seg = bt.Segment.create(name, CFG)
    try:
        with open(f"/dev/shm/bt.{name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as mem:
            mem[:] = template
        kind, base = run_trial(name)
    finally:
        seg.close()
        bt.Segment.unlink(name)
    assert kind == "ok" and classify(base, base) == ("correct result", None), (kind, base)
    for t in range(TRIALS):
        name = unique_name("corrupt")
        seg = bt.Segment.create(name, CFG)
        try:
            path = f"/dev/shm/bt.{name}"
            with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mem:
                mem[:] = template
                region, hits = corrupt(mem, bounds, rng, total)
            kind, res = run_trial(name)
        finally:
            seg.close()
            bt.Segment.unlink(name)
        if kind != "ok":
            outcome, problem = kind, f"child {kind}: {res}"
        else:
            outcome, problem = classify(res, base)
        outcomes[outcome] += 1
        by_region[region][outcome] += 1
        if problem:
            failures.append(f"trial {t} (seed {SEED}), {region} {hits}: {outcome}: {problem}")
    took = time.monotonic() - t0
    lines = [f"test_corruption: {TRIALS} trials in {took:.1f} s (BT_CORRUPTION_SEED={SEED}): "
             + ", ".join(f"{k} {v}" for k, v in outcomes.most_common())]
    for region in sorted(by_region):
        lines.append(f"  {region:8} " + ", ".join(f"{k} {v}" for k, v in by_region[region].most_common()))
    report(request.config, "\n".join(lines))
    assert not failures, "\n".join(failures[:10])


def test_repair_reads_no_further_than_the_mapping(shm_name):
    """A segment whose header claims more than the object holds is refused
    at attach (Corrupt), not read past its end."""
    with bt.Segment.create(shm_name, CFG):
        pass
    path = f"/dev/shm/bt.{shm_name}"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(bt.Corrupt):
        bt.Segment.attach(shm_name)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(bt.BadMagic):
        bt.Segment.attach(shm_name)


def test_bit_flips_in_the_header_are_refused_or_harmless(shm_name, request):
    """Every single-bit flip of the header's identity (magic, format, header
    size, ABI, size) and region offsets is refused at attach (BadMagic /
    VersionMismatch / Corrupt). A flip in the config is refused when it moves
    a region; one that does not (block_size, kernel_block_size, a dir_width
    or num_chunks absorbed by the last page's padding) is accepted -- attach
    recomputes the layout, not the meaning -- and the segment must then be
    usable without a crash: a process attaching after such a scribble
    disagrees with the others on slot math or paged capacity (SECURITY.md)."""
    with bt.Segment.create(shm_name, CFG):
        pass
    path = f"/dev/shm/bt.{shm_name}"
    with open(path, "rb") as f:
        image = bytearray(f.read())
    fields = [n for n, _ in bt.ffi.typeof("bt_config").fields]
    outcome = collections.Counter()
    accepted = collections.Counter()
    for byte in range(0, OFF_AT + len(REGIONS) * 8):    # magic .. off[]
        for bit in range(8):
            img = bytearray(image)
            img[byte] ^= 1 << bit
            with open(path, "r+b") as f:
                f.write(img)
            try:
                seg = bt.Segment.attach(shm_name)
            except (bt.BadMagic, bt.VersionMismatch, bt.Corrupt) as e:
                outcome[type(e).__name__] += 1
                continue
            field = fields[(byte - CFG_AT) // 4] if CFG_AT <= byte < OFF_AT else f"byte {byte}"
            assert CFG_AT <= byte < OFF_AT, f"a flip of bit {bit} of header {field} was accepted"
            accepted[field] += 1
            with seg, seg.client() as c:        # usable: no crash, clear errors at worst
                for r in range(seg.config.num_rows):
                    seg.read_row(r)
                    seg.slots_row(r, 0, 8)
                row = c.claim_row(paged=True)
                c.alloc_append(row, 2)
                c.release_row(row)
                assert seg.check().clean
    report(request.config, "test_corruption: header bit flips: " +
           ", ".join(f"{k} {v}" for k, v in outcome.most_common()) +
           "; accepted (config fields that move no region): " +
           ", ".join(f"{k} {v}" for k, v in accepted.most_common()))


if __name__ == "__main__":      # python tests/test_corruption.py: a quick look
    sys.exit(pytest.main([__file__, "-q"]))
