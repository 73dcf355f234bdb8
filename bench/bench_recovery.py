"""Crash recovery, measured: how soon a killed client's blocks are free again,
what pause the live clients see meanwhile, and what the crash-safety
protocol costs the data path.

For segments of 64K and 1M blocks, a victim process holds 2048 blocks in 32
rows plus 64 loose ones, and a live client allocates and frees one block at
a time, timing each call. The victim is SIGKILLed
- outside a call: btd releases its rows and hand lock-free (no pause);
- inside a call (caught there with SIGSTOP, then killed): btd repairs the
  segment under the freeze word, a pause that grows with the segment.
"Recovered" is when the pool's free count is back to what it was before the
victim allocated. The pause is btd's report.pause_ns; the live client's
worst call during the recovery is what an inference step would see.
Targets (issue 3): recovered in under 100 ms, pauses under 5 ms.

Data path: alloc+free of one block through the client API (bt_blocks_alloc /
bt_blocks_release: in_op exchange, freeze check, the hand) against the raw
pool (bt_pool_pop / bt_pool_push), both straight through CFFI, same run.
(bench/bench_alloc.c measures the same in C, without Python's call cost.)

    python bench/bench_recovery.py [--quick]     # a table; run() for bench/run.py
"""
import os
import signal
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for sub in ("bindings", "daemon"):     # a checkout without an install; an install wins
    p = os.path.join(ROOT, sub)
    if p not in sys.path:
        sys.path.append(p)

from blocktable import Segment, ffi, lib  # noqa: E402
from blocktable.connect import connect  # noqa: E402

from blocktable_daemon.testing import DaemonProcess, wait_for  # noqa: E402

ROWS, PER_ROW, LOOSE = 32, 64, 64
HELD = ROWS * PER_ROW + LOOSE


def _shared(n):
    """n int64 shared with forked children (anonymous MAP_SHARED)."""
    import mmap
    return np.frombuffer(mmap.mmap(-1, 8 * n), np.int64)


def live_client(name, sock, box):
    """box[0]: stop; box[1]: reset request; box[2]: max call ns since reset;
    box[3]: calls made."""
    try:
        cl = connect(name, socket=sock)
        c = cl._cl
        ids = ffi.new("int32_t[1]")
        seen_reset = 0
        worst = 0
        while not box[0]:
            if box[1] != seen_reset:
                seen_reset, worst = box[1], 0
            t0 = time.perf_counter_ns()
            rc = lib.bt_blocks_alloc(c, 0, 1, ids)
            if rc == 0:
                rc = lib.bt_blocks_release(c, ids, 1)
            dt = time.perf_counter_ns() - t0
            if dt > worst:
                worst = dt
                box[2] = worst
            box[3] += 1
    finally:
        os._exit(0)


def victim(name, sock, box, busy):
    """Hold HELD blocks; box[0] = slot when ready. busy: keep calling."""
    try:
        cl = connect(name, socket=sock)
        for i in range(ROWS):
            cl.alloc_append(cl.claim_row(key=i), PER_ROW)
        cl.alloc(LOOSE)
        box[0] = cl.id
        c = cl._cl
        ids = ffi.new("int32_t[4]")
        while True:
            if busy and lib.bt_blocks_alloc(c, 0, 4, ids) == 0:
                lib.bt_blocks_release(c, ids, 4)
            elif not busy:
                time.sleep(0.01)
    finally:
        os._exit(0)


def _stopped(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def one_kill(d, seg, live, inside):
    """Kill a fresh victim: (ms to free, pause ms, the live client's worst call
    in ms around it, and in a quiet window just before)."""
    before = seg.free_blocks(0)
    box = _shared(1)
    pid = os.fork()
    if pid == 0:
        victim(d.segment, d.socket, box, inside)
    wait_for(lambda: box[0], 30, "the victim to hold its blocks")
    slot = int(box[0])
    if inside:                       # catch it inside a call, confirmed while stopped
        for _ in range(10000):
            wait_for(lambda: seg.client_slot(slot).in_op, 10, "a call", interval=0)
            os.kill(pid, signal.SIGSTOP)
            wait_for(lambda: _stopped(pid), 10, "the victim to stop")
            if seg.client_slot(slot).in_op:
                break
            os.kill(pid, signal.SIGCONT)
    n_before = d.request("stats")["recoveries_total"]
    quiet = live_window(live, WINDOW)            # the same wait, nothing recovered
    live[1] += 1                                 # the live client starts a fresh window
    t0 = time.perf_counter_ns()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)               # reaped at once, as a supervisor would
    while seg.free_blocks(0) < before:
        os.sched_yield()
    took = (time.perf_counter_ns() - t0) / 1e6
    rest = WINDOW - (time.perf_counter_ns() - t0) / 1e9
    if rest > 0:
        time.sleep(rest)
    worst = live[2] / 1e6
    wait_for(lambda: d.request("stats")["recoveries_total"] > n_before, 10, "btd's record")
    rec = d.request("stats")["recent"][-1]
    return took, rec["pause_ms"], worst, quiet, rec["latency_ms"]


WINDOW = 0.2        # seconds of the live client's calls compared, with and without a recovery


def live_window(live, seconds):
    """The live client's worst call (ms) over `seconds` with nothing going on."""
    live[1] += 1
    time.sleep(seconds)
    return live[2] / 1e6


def recovery_rows(quick):
    rows = []
    reps = 3 if quick else 10
    for blocks in (1 << 16, 1 << 20):
        tag = "64K" if blocks == 1 << 16 else "1M"
        with tempfile.TemporaryDirectory() as tmp:
            d = DaemonProcess(tmp, sizes={"blocks_per_pool": blocks, "num_rows": 256,
                                          "row_width": 128, "max_clients": 16,
                                          "hand_size": 256}).start()
            seg = Segment.attach(d.segment)
            live = _shared(4)
            lpid = os.fork()
            if lpid == 0:
                live_client(d.segment, d.socket, live)
            try:
                wait_for(lambda: live[3] > 100, 30, "the live client to run")
                for inside in (False, True):
                    got = [one_kill(d, seg, live, inside) for _ in range(reps)]
                    how = "inside a call (repair)" if inside else "outside a call (lock-free)"
                    took = statistics.median(g[0] for g in got)
                    pause = max(g[1] for g in got)
                    worst = statistics.median(g[2] for g in got)
                    quiet = statistics.median(g[3] for g in got)
                    rows.append((f"SIGKILL -> blocks free, died {how}, {tag} blocks (median of "
                                 f"{reps})", took, "ms", "target", 100.0, "abs"))
                    rows.append((f"  of which btd: exit seen -> recovered, {tag} blocks (median)",
                                 statistics.median(g[4] for g in got), "ms", "target", 100.0,
                                 "abs"))
                    rows.append((f"recovery pause (freeze), died {how}, {tag} blocks (max)", pause,
                                 "ms", "target", 5.0, "abs"))
                    rows.append((f"live client's worst alloc+free in {WINDOW * 1e3:.0f} ms around "
                                 f"it, {tag} blocks (median)", worst, "ms",
                                 "same window, no recovery", quiet, None))
            finally:
                live[0] = 1
                os.waitpid(lpid, 0)
                seg.close()
                d.cleanup()
    return rows


def datapath_rows(quick):
    """alloc+free of one block: the client protocol against the raw pool."""
    n = 20000 if quick else 200000
    seg = Segment.create(None)
    cl = seg.client()
    c, s = cl._cl, seg._seg
    ids = ffi.new("int32_t[1]")
    alloc, release, pop, push = (lib.bt_blocks_alloc, lib.bt_blocks_release,
                                 lib.bt_pool_pop, lib.bt_pool_push)

    def client(k):
        for _ in range(k):
            alloc(c, 0, 1, ids)
            release(c, ids, 1)

    def raw(k):
        for _ in range(k):
            pop(s, 0, 1, 0, ids)
            push(s, ids, 1)

    best = {}
    for name, fn in (("client", client), ("raw", raw)) * 3:
        t0 = time.perf_counter_ns()
        fn(n)
        best[name] = min(best.get(name, 1e18), (time.perf_counter_ns() - t0) / n)
    cl.close()
    seg.close()
    return [("alloc+free 1 block via the client API (crash-safe), from Python", best["client"],
             "ns", "raw pool pop+push, same run", best["raw"], None)]


def run(quick=False):
    """Rows for bench/run.py: (what, figure, unit, baseline, baseline figure, target)."""
    return recovery_rows(quick) + datapath_rows(quick)


def main():
    quick = "--quick" in sys.argv
    rows = run(quick)
    w = max(len(r[0]) for r in rows)
    print(f"{'what':<{w}}  {'figure':>12}  baseline")
    for what, fig, unit, bname, bfig, target in rows:
        if target == "abs":
            base = f"target < {bfig:g} {unit}: {'met' if fig <= bfig else 'MISSED'}"
        else:
            base = f"{bname}: {bfig:,.3f} {unit} ({fig / bfig:.2f}x)"
        print(f"{what:<{w}}  {fig:>9,.3f} {unit:<2}  {base}")
    return {r[0]: {"figure": r[1], "unit": r[2], "baseline": r[3], "baseline_figure": r[4]}
            for r in rows}


if __name__ == "__main__":
    main()
