"""What btd knows: the segments it serves, their client slots and states, the
client processes it watches, the recoveries under way, its counters, and the
summaries (status, pools, clients) built from them.

Nothing here does I/O on sockets or decides a recovery; the loop (server) and
the recovery state machine (recovery) change these objects. Not thread-safe:
only btd's loop thread touches them (metrics read a published snapshot).
"""
import collections
import os
import time

from blocktable import BtError

from . import clib
from .clib import ClientState
from .procfs import proc_state, proc_title

STATES = {s.value: s.name.lower() for s in ClientState}
PROBLEM_KEYS = tuple(k for k in ("refcnt_fixed", "leaked", "double_free", "rows_fixed",
                                 "bad_entries", "chunks_leaked") if k in clib.REPORT_KEYS)
# bt_cache_stats counters: prefix-cache lookups, those that hit, keys stored, keys evicted
# (with their blocks, when a cached block is taken for a new one), pool resets.
CACHE_COUNTERS = ("queries", "hits", "stored", "evicted", "blocks_evicted", "resets")
STUCK_BACKOFF = (0.5, 30.0)     # forced repair retry while a client stays stuck: first, max


def state_name(state):
    """A slot's state word as shown: a value no libbt writes (a scribble by an
    attached process) is named, never an error in btd's loop."""
    name = STATES.get(state)
    return name if name is not None else f"invalid(0x{state:08x})"


class Watch:
    """A client process, watched through a pidfd; the slots it holds."""

    def __init__(self, pid, start_time, pidfd):
        self.pid, self.start_time, self.pidfd = pid, start_time, pidfd
        self.slots = set()              # (segment name, slot id)


class Pending:
    """A dead client whose recovery is not finished."""

    def __init__(self, pid, start_time, since, reason):
        self.pid, self.start_time, self.since, self.reason = pid, start_time, since, reason
        self.attempts = 0
        self.stuck = None               # (slot, pid, ops) of the client in the way
        self.next_forced = 0.0
        self.backoff = STUCK_BACKOFF[0]
        self.logged = False


class Managed:
    """A segment btd serves, and what btd tracks of its slots. Errors: slot()
    raises BtError for a slot id out of range."""

    def __init__(self, name, seg, created, requested):
        self.name, self.seg, self.created, self.requested = name, seg, created, requested
        self.pending = {}               # slot -> Pending
        self.seen = {}                  # slot -> (pid, start_time, ops) at last scan
        self.retired_ops = 0            # ops of slots that were freed since
        self.stuck = {}                 # slot -> {"pid", "since", "state"}
        self.reserved = {}              # slot -> (pid, start_time, since): not yet adopted
        self.released = set()           # slots btd freed (recovered, unreserved) since the
                                        # last scan: their next vacancy is no clean close
        self.origin = "config"          # or "create": asked for over the socket (an engine)

    @property
    def shm_path(self):
        return "/bt." + self.name

    @property
    def max_clients(self):
        return self.seg.config.max_clients

    def slot(self, sid):
        """Slot sid's snapshot (state, pid, start_time, in_op, hand_count, rows, ops)."""
        return clib.slot_get(self.seg, sid)

    def slots(self):
        """(sid, snapshot) of every slot, 1..max_clients."""
        return ((sid, self.slot(sid)) for sid in range(1, self.max_clients + 1))

    def check(self, flags, wait_ms):
        """bt_seg_check on this segment: (rc, report dict)."""
        return clib.check(self.seg, flags, wait_ms)

    def shm_stat(self):
        """(size, mode, uid, gid) of the shm object; None if gone. A stat by
        path takes no descriptor: btd must answer this (every tick, and in
        `status`) even when it is out of descriptors."""
        try:
            st = os.stat("/dev/shm" + self.shm_path)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mode & 0o7777, st.st_uid, st.st_gid


class Stats:
    """Counters the daemon keeps (for stats, status and the metrics)."""

    def __init__(self):
        C = collections.Counter
        self.requests, self.request_errors = C(), C()
        self.recoveries, self.recovery_failures, self.registrations = C(), C(), C()
        self.recent = collections.deque(maxlen=256)
        self.total_recoveries = 0
        self.conn_evicted = 0           # closed to make room for a new peer
        self.conn_refused = 0           # answered EBUSY at accept (out of descriptors)
        self.observers = []             # f(segment, kind, pause_s, latency_s) per recovery

    def count_request(self, cmd, error=None, segment=""):
        """A request answered; segment: the one it was about ("" if not one)."""
        self.requests[(cmd, segment)] += 1
        if error:
            self.request_errors[(cmd, error, segment)] += 1

    def recovered(self, seg, slot, pid, kind, pause, latency, report):
        """A recovery finished; pause is 0 when it froze nothing."""
        self.recoveries[(seg, kind)] += 1
        self.total_recoveries += 1
        for f in self.observers:
            f(seg, kind, pause, latency)
        self.recent.append({"time": time.time(), "segment": seg, "slot": slot, "pid": pid,
                            "kind": kind, "pause_ms": pause * 1e3,
                            "latency_ms": latency * 1e3, "report": report})

    def report(self, client_ops):
        """The `stats` command's result (keys stable: bt-ctl --json prints them)."""
        recent = list(self.recent)
        requests, errors = collections.Counter(), collections.Counter()
        for (cmd, _seg), v in self.requests.items():
            requests[cmd] += v
        for (cmd, name, _seg), v in self.request_errors.items():
            errors[f"{cmd}:{name}"] += v
        return {"requests": dict(requests), "request_errors": dict(errors),
                "registrations": dict(self.registrations),
                "recoveries": {f"{seg}:{kind}": v for (seg, kind), v in self.recoveries.items()},
                "recovery_failures": {f"{seg}:{why}": v
                                      for (seg, why), v in self.recovery_failures.items()},
                "recoveries_total": self.total_recoveries,
                # Only recoveries that froze the segment paused anyone.
                "pause_ms": _dist(sorted(x["pause_ms"] for x in recent if x["pause_ms"] > 0)),
                "latency_ms": _dist(sorted(x["latency_ms"] for x in recent)),
                "client_ops": client_ops, "recent": recent[-20:]}


def _dist(xs):
    if not xs:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(xs), "p50": round(xs[len(xs) // 2], 3),
            "p99": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 3), "max": round(xs[-1], 3)}


# ---- summaries ----------------------------------------------------------------------------
def slot_list(m, watched):
    """The claimed slots of m as dicts (the `clients` command); watched(pid,
    start_time) says whether btd watches that process."""
    out = []
    for sid, s in m.slots():
        if s.state == ClientState.FREE:
            continue
        pending = m.pending.get(sid)
        note = []
        if sid in m.stuck:
            note.append("stuck in a call, holding up a repair")
        if pending is not None:
            note.append(f"dead, recovering ({pending.attempts} tries)")
        out.append({"segment": m.name, "slot": sid, "state": state_name(s.state),
                    "pid": s.pid, "proc_state": proc_state(s.pid) if s.pid > 0 else "gone",
                    "process": proc_title(s.pid) if s.pid > 0 else None,
                    "in_op": s.in_op, "hand": s.hand_count, "rows": s.rows, "ops": s.ops,
                    "watched": watched(s.pid, s.start_time),
                    "stuck": sid in m.stuck, "recovering": pending is not None,
                    "note": "; ".join(note)})
    return out


def segment_summary(m):
    """One segment as `status` shows it (keys stable)."""
    info = clib.seg_info(m.seg)
    c = m.seg.config
    pools = [pool_summary(m.seg, c, p) for p in range(c.num_pools)]
    states = dict.fromkeys([*STATES.values(), "invalid"], 0)
    rows_used, ops = 0, m.retired_ops
    for _sid, s in m.slots():
        states[STATES.get(s.state, "invalid")] += 1
        if s.state != ClientState.FREE:
            rows_used += s.rows
            ops += s.ops
    stat = m.shm_stat()
    return {"name": m.name, "shm": "/dev/shm" + m.shm_path, "size": info["size"],
            "mode": f"{stat[1]:04o}" if stat else None, "linked": stat is not None,
            "generation": info["generation"], "owner_pid": info["owner_pid"],
            "created": m.created, "origin": m.origin,
            "config": {k: getattr(c, k) for k in clib.CFG_KEYS},
            "pools": pools, "blocks_free": sum(p["free"] for p in pools),
            "blocks_used": sum(p["used"] for p in pools),
            "blocks_cached": sum(p["cached"] for p in pools), "rows_used": rows_used,
            "rows_total": c.num_rows, "clients": states, "client_ops": ops,
            "pending_recoveries": len(m.pending), "stuck": list(m.stuck.values())}


def pool_summary(seg, c, p):
    """One pool's blocks: blocks == used + cached + free. A cache pool (vLLM's BlockPool,
    an engine's prefix cache) also counts `cached`: free blocks that still hold a prefix
    (reused on a hit, evicted LRU-first when needed), and its prefix-cache counters; read
    lock-free (Segment.cache_stats). The null block (pool 0's id 0) is never counted."""
    blocks = c.blocks_per_pool - (1 if p == 0 else 0)
    if p < getattr(c, "cache_pools", 0):
        try:
            st = seg.cache_stats(p)
        except BtError as e:
            # Busy: its writer died inside a call and the pool awaits its reset (recovery).
            # Counted as all used until then; never an exception in btd's loop.
            return {"pool": p, "kind": "cache", "blocks": blocks, "used": blocks, "cached": 0,
                    "free": 0, "owner_pid": None, "keys": 0, "key_cap": 0, "cache": None,
                    "error": e.name}
        cached = int(st["cached_free"])
        free = int(st["free"]) - cached
        return {"pool": p, "kind": "cache", "blocks": blocks, "used": blocks - int(st["free"]),
                "cached": cached, "free": free, "owner_pid": int(st["owner_pid"]) or None,
                "keys": int(st["keys"]), "key_cap": int(st["key_cap"]),
                "cache": {k: int(st[k]) for k in CACHE_COUNTERS}}
    free = seg.free_blocks(p)
    return {"pool": p, "kind": "stack", "blocks": blocks, "used": blocks - free, "cached": 0,
            "free": free, "owner_pid": None, "keys": 0, "key_cap": 0, "cache": None}


def row_kind(flags):
    """managed / raw, and paged where the row keeps its ids in chunks."""
    kind = "raw" if flags & clib.ROW_RAW else "managed"
    return f"paged {kind}" if flags & clib.ROW_PAGED else kind


def row_dict(seg, row, info, pid):
    """A claimed row as `rows` and `row` show it."""
    return {"segment": seg, "row": row, "slot": info.owner, "pid": pid, "key": info.key,
            "kind": row_kind(info.flags),
            "num_blocks": info.num_blocks, "num_tokens": info.num_tokens,
            "generation": info.generation}


def slot_pids(m):
    """slot id -> pid of every claimed slot."""
    return {sid: s.pid for sid, s in m.slots() if s.state != ClientState.FREE}
