"""The recovery state machine: from a client's death to its holdings free.

Why it is shaped so (libbt/src/check.c has the protocol):
- A client that died outside a call is released lock-free, no pause
  (bt_seg_recover_client). One that died inside a call needs a repair: the
  segment is frozen, live clients drained, counts rebuilt.
- If a live client stays inside a call (SIGSTOP), the repair is deferred
  (BT_EBUSY, report.stuck_client): the dead slot stays DEAD, its consistent
  rows are released, and we retry with bt_seg_check(BT_CHECK_REPAIR) -- never
  bt_seg_recover_client again, which would take the lock-free path on a slot
  whose in_op word the deferral cleared. We do not freeze again while the
  stuck client is still inside the same call (its ops count and in_op tell),
  except on a slow backoff: every freeze makes every live client wait.
- libbt counts a zombie (exited, not yet reaped by its parent) as dead
  (bt_proc_start_time), so its recovery does not wait for the reap; a
  recovery that cannot finish yet is retried each short tick.

Not thread-safe: btd's loop thread only.
"""
import logging
import time

from . import clib, logs
from .clib import ClientState
from .model import STUCK_BACKOFF, Pending
from .procfs import proc_start_time, proc_state

log = logging.getLogger("btd")

FAST_TICK = (0.001, 0.05, 0.02)  # while recoveries are pending: every 1 ms for the
                                # first 50 ms, then every 20 ms


class Recovery:
    """Drives each Managed segment's `pending` recoveries. `wait_ms()` is how long
    a repair waits for live clients; `changed()` is called when what btd shows
    changed; stats (model.Stats) counts recoveries and retries."""

    def __init__(self, stats, wait_ms, changed):
        self.stats, self.wait_ms, self.changed = stats, wait_ms, changed

    def recover(self, m, sid, pid, start, since, reason):
        """Recover slot sid of a process that is gone, if it still holds it."""
        info = m.slot(sid)
        if info.state == ClientState.FREE or info.pid != pid or \
                (start and info.start_time and info.start_time != start):
            m.pending.pop(sid, None)     # closed cleanly, or already recovered
            return
        p = m.pending.get(sid)
        if p is None:
            p = m.pending[sid] = Pending(pid, start, since, reason)
        self.attempt(m, sid, p)

    def attempt(self, m, sid, p):
        """One try at a pending recovery; see the module docstring."""
        p.attempts += 1
        info = m.slot(sid)
        if info.state == ClientState.FREE or info.pid != p.pid:
            return self.recovered(m, sid, p, None, "repair")
        if p.start_time and info.start_time != p.start_time:
            m.pending.pop(sid, None)     # a torn read of a slot being claimed: not a death
            return
        if info.state in (ClientState.DEAD, ClientState.RECOVERING):
            rc, rep = m.check(clib.CHECK_REPAIR, self.wait_ms())
            kind = "repair"
        else:
            rc, rep = clib.recover_client(m.seg, sid, self.wait_ms())
            kind = "repair" if rep["pause_ns"] else "lockfree"
        if rc == 0:
            after = m.slot(sid)
            if after.state == ClientState.FREE or after.pid != p.pid:
                return self.recovered(m, sid, p, rep, kind)
            rc = clib.EBUSY             # a repair that could not reap it (its pid lives)
        self.failed(m, sid, p, rc, rep)

    def failed(self, m, sid, p, rc, rep):
        """An attempt that did not finish: note who is in the way, log once."""
        self.stats.recovery_failures[(m.name, clib.errname(rc))] += 1
        if rc == clib.EBUSY and rep["stuck_client"]:
            self.note_stuck(m, sid, p, rep["stuck_client"])
        elif rc == clib.EBUSY:
            if not p.logged and p.attempts > 50:
                log.warning("segment %s: pid %d of client %d has exited but is not reaped "
                            "(state %s): recovery waits for its parent", m.name, p.pid, sid,
                            proc_state(p.pid))
                p.logged = True
        else:
            log.error("segment %s: recovering client %d (pid %d): %s", m.name, sid, p.pid,
                      clib.errname(rc))
        self.changed()

    def note_stuck(self, m, sid, p, stuck_sid):
        st = m.slot(stuck_sid)
        p.stuck = (stuck_sid, st.pid, st.ops)
        p.next_forced = time.monotonic() + p.backoff
        p.backoff = min(p.backoff * 2, STUCK_BACKOFF[1])
        m.stuck[stuck_sid] = {"slot": stuck_sid, "pid": st.pid,
                              "proc_state": proc_state(st.pid),
                              "since": m.stuck.get(stuck_sid, {}).get("since", time.time()),
                              "blocking_slot": sid}
        if not p.logged:
            log.warning("segment %s: client %d (pid %d) died inside a call; the repair "
                        "waits for client %d (pid %d, state %s) stuck inside a call; its "
                        "consistent rows were released, the rest follows when it moves",
                        m.name, sid, p.pid, stuck_sid, st.pid, proc_state(st.pid),
                        extra=logs.fields(segment=m.name, client_id=stuck_sid,
                                          peer_pid=st.pid, event="client_stuck"))
            p.logged = True

    def recovered(self, m, sid, p, rep, kind):
        m.pending.pop(sid, None)
        if sid in m.seen:
            m.released.add(sid)
        latency = time.monotonic() - p.since
        pause = rep["pause_ns"] / 1e9 if rep is not None else 0.0
        if p.stuck:
            kind = "deferred"
        self.stats.recovered(m.name, sid, p.pid, kind, pause, latency, rep)
        if not m.pending:
            m.stuck.clear()
        log.info("segment %s: recovered client %d (pid %d, %s) in %.2f ms, pause %.3f ms",
                 m.name, sid, p.pid, kind, latency * 1e3, pause * 1e3,
                 extra=logs.fields(segment=m.name, client_id=sid, peer_pid=p.pid,
                                   event="client_recovered"))
        self.changed()

    def retry_pending(self, m):
        """Retry m's pending recoveries, except those whose stuck client is still
        inside the same call (until their forced retry is due)."""
        now = time.monotonic()
        for sid, p in list(m.pending.items()):
            if sid not in m.pending:     # completed by an earlier repair this turn
                continue
            if p.stuck and now < p.next_forced and self.still_stuck(m, p):
                continue                # still inside the same call: no freeze
            self.attempt(m, sid, p)

    @staticmethod
    def still_stuck(m, p):
        ssid, spid, sops = p.stuck
        st = m.slot(ssid)
        if st.in_op and st.ops == sops and st.pid == spid and \
                st.state == ClientState.ACTIVE and proc_start_time(spid):
            m.stuck[ssid]["proc_state"] = proc_state(spid)
            return True
        return False


def tick_period(segments, now, idle):
    """Seconds to the next tick: `idle` unless recoveries are pending (FAST_TICK)."""
    pending = [p for m in segments for p in m.pending.values()]
    if not pending:
        return idle
    young = any(now - p.since < FAST_TICK[1] for p in pending)
    return FAST_TICK[0] if young else FAST_TICK[2]
