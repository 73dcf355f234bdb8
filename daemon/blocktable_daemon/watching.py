"""Watching client processes: one pidfd per process holding a slot, taken at
registration or found by the slot scan (clients that opened without btd, or
registered with an earlier one); a pidfd that turns readable is a death,
handed to the recovery state machine. Reserved slots nobody adopts are freed.

Not thread-safe: btd's loop thread only.
"""
import logging
import os
import selectors
import time

from blocktable import BtError

from . import logs
from .clib import ClientState
from .model import Watch
from .procfs import pidfd_exited, proc_start_time
from .protocol import RequestError

log = logging.getLogger("btd")

# A slot reserved for a live process that does not adopt it within this many
# seconds is freed (bt_client_unreserve): its connect() gave up (e.g. timed
# out while btd was stopped) and would otherwise hold the slot for good. An
# adopt takes milliseconds; BT_RESERVE_TIMEOUT_S overrides (tests).
RESERVE_TIMEOUT_S = float(os.environ.get("BT_RESERVE_TIMEOUT_S", "30"))


class Watcher:
    """The watched processes, keyed (pid, start_time); their pidfds are in `sel`
    with data ("pidfd", Watch). Recovery is a recovery.Recovery."""

    def __init__(self, sel, recovery, stats, changed):
        self.sel, self.recovery, self.stats, self.changed = sel, recovery, stats, changed
        self.watches = {}               # (pid, start_time) -> Watch

    def is_watched(self, pid, start_time):
        return (pid, start_time) in self.watches

    def watch(self, pid, start, pidfd):
        """The Watch of (pid, start); pidfd is consumed (closed if one exists)."""
        w = self.watches.get((pid, start))
        if w is not None:
            os.close(pidfd)
            return w
        w = Watch(pid, start, pidfd)
        self.watches[(pid, start)] = w
        self.sel.register(pidfd, selectors.EVENT_READ, ("pidfd", w))
        return w

    def unwatch(self, w):
        if self.watches.pop((w.pid, w.start_time), None) is not None:
            self.sel.unregister(w.pidfd)
            os.close(w.pidfd)

    def close(self):
        for w in self.watches.values():
            os.close(w.pidfd)
        self.watches.clear()

    def client_died(self, w, segments):
        """w's pidfd said it exited: recover each slot it held."""
        now = time.monotonic()
        self.unwatch(w)
        for name, sid in sorted(w.slots):
            m = segments.get(name)
            if m is not None:
                self.recovery.recover(m, sid, w.pid, w.start_time, now, "exited")

    def register(self, m, pid, uid, pidfd):
        """Reserve a slot of m for process pid and watch it: its identity is
        pinned by pidfd (taken at accept) and the start time read while that
        pidfd says it lives. The slot id; RequestError if pid is gone."""
        if pidfd is None:
            raise RequestError("EBUSY", f"cannot watch pid {pid} (no pidfd)")
        start = proc_start_time(pid)
        if not start or pidfd_exited(pidfd):
            raise RequestError("ENOENT", f"pid {pid} exited")
        slot = m.seg.reserve_client(pid, start)
        w = self.watch(pid, start, os.dup(pidfd))
        w.slots.add((m.name, slot))
        m.seen[slot] = (pid, start, 0)
        m.reserved[slot] = (pid, start, time.monotonic())
        self.stats.registrations[m.name] += 1
        log.info("segment %s: registered pid %d (uid %d) in slot %d", m.name, pid, uid, slot,
                 extra=logs.fields(segment=m.name, client_id=slot, peer_pid=pid, peer_uid=uid,
                                   event="registered"))
        self.changed()
        return slot

    def scan(self, segments):
        """Watch every claimed slot of every segment; recover those already gone."""
        now = time.monotonic()
        for m in segments:
            for sid, info in m.slots():
                self.scan_slot(m, sid, info, now)

    def scan_slot(self, m, sid, info, now):
        key = (info.pid, info.start_time)
        prev = m.seen.get(sid)
        if prev is not None and (info.state == ClientState.FREE or prev[:2] != key):
            self.forget_slot(m, sid, prev)
        if info.state != ClientState.RESERVED:
            m.reserved.pop(sid, None)
        if info.state == ClientState.FREE or info.pid <= 0:
            return                      # free, or being claimed (pid not stored yet)
        if info.state == ClientState.RESERVED and sid not in m.pending and \
                self.reclaim_reserved(m, sid, info, now):
            return
        m.seen[sid] = (info.pid, info.start_time, info.ops)
        if sid in m.pending:
            return
        if info.state in (ClientState.DEAD, ClientState.RECOVERING):
            if info.state == ClientState.RECOVERING and prev is None:
                return                  # someone is recovering it now; look again later
            self.recovery.recover(m, sid, info.pid, info.start_time, now, "found dead")
            return
        w = self.watches.get(key) or self.watch_found(m, sid, info, now)
        if w is not None:
            w.slots.add((m.name, sid))

    def forget_slot(self, m, sid, prev):
        """Slot sid was freed or taken by another process since the last scan:
        by btd (a recovery), or its client closed it (logged)."""
        if sid in m.released:
            m.released.discard(sid)
        else:
            log.info("segment %s: client %d (pid %d) closed cleanly (%d ops)", m.name, sid,
                     prev[0], prev[2], extra=logs.fields(segment=m.name, client_id=sid,
                                                         peer_pid=prev[0],
                                                         event="client_closed"))
        m.retired_ops += prev[2]
        w = self.watches.get(prev[:2])
        if w is not None:
            w.slots.discard((m.name, sid))
            if not w.slots:
                self.unwatch(w)
        del m.seen[sid]
        self.changed()

    def watch_found(self, m, sid, info, now):
        """Start watching a process found in a slot; None if it is gone (recovered)."""
        try:
            fd = os.pidfd_open(info.pid) if info.pid > 0 else None
        except OSError:
            fd = None
        if fd is None or (info.start_time and proc_start_time(info.pid) != info.start_time):
            if fd is not None:
                os.close(fd)
            self.recovery.recover(m, sid, info.pid, info.start_time, now, "found dead")
            return None
        w = self.watch(info.pid, info.start_time, fd)
        log.info("segment %s: watching client %d (pid %d), found in its slot",
                 m.name, sid, info.pid)
        self.changed()
        return w

    def reclaim_reserved(self, m, sid, info, now):
        """Free a slot reserved for a live process that never adopted it
        within RESERVE_TIMEOUT_S (a gone process is recovered as any dead
        client is). True if it was freed."""
        r = m.reserved.get(sid)
        if r is None or r[:2] != (info.pid, info.start_time):
            m.reserved[sid] = (info.pid, info.start_time, now)   # first seen reserved
            return False
        if now - r[2] < RESERVE_TIMEOUT_S:
            return False
        try:
            m.seg.unreserve_client(sid, info.pid)
        except BtError:
            return False                # adopted meanwhile (one CAS wins): a client now
        del m.reserved[sid]
        if sid in m.seen:
            m.released.add(sid)
        log.warning("segment %s: freed client slot %d reserved for pid %d, which did not "
                    "adopt it within %.0f s (its connect gave up)", m.name, sid, info.pid,
                    RESERVE_TIMEOUT_S, extra=logs.fields(segment=m.name, client_id=sid,
                                                         peer_pid=info.pid,
                                                         event="reservation_expired"))
        self.changed()
        return True
