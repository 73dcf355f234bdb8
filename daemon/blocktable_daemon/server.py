"""btd's main loop: one thread, one selector.

Each turn: dispatch (control connections) -> reap (pidfds of dead clients)
-> signals -> tick (slot scan, deferred recoveries, status, watchdog).
Signal handlers only enqueue; signal.set_wakeup_fd wakes the selector.

Recovery, and why it is shaped so (libbt/src/check.c has the protocol):
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
- libbt counts a zombie (exited, not yet reaped by its parent) as alive;
  its recovery is retried each short tick until the parent reaps it.
"""
import argparse
import collections
import errno
import logging
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time
import traceback

import posix_ipc

from blocktable import BtError, Segment, ffi, lib

from . import __version__, commands, config as config_mod, logs, metrics, protocol, sdnotify
from .protocol import RequestError

log = logging.getLogger("btd")

STATES = {lib.BT_CLIENT_FREE: "free", lib.BT_CLIENT_ACTIVE: "active",
          lib.BT_CLIENT_DEAD: "dead", 3: "reserved", 4: "recovering"}
_RESERVED, _RECOVERING = 3, 4
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)     # Linux 6.5
MAX_OUT = 32 << 20              # a peer that reads nothing is dropped past this
FAST_TICK = (0.001, 0.05, 0.02)  # while recoveries are pending: every 1 ms for the
                                # first 50 ms (a zombie is reaped soon), then every 20 ms
STUCK_BACKOFF = (0.5, 30.0)     # forced retry while a client stays stuck
# Descriptors. Each control connection costs two (its socket and the peer's
# pidfd); a watched client process one (its pidfd). The connection cap is
# sized from the limit so that connections alone never exhaust it.
MAX_CONNS = 512                 # connections, at most, whatever the limit
FD_BASE = 32                    # btd's own: std streams, selector, listener, metrics...
FD_RESERVE = 4                  # spare descriptors, spent to answer peers when out
OPERATOR_RESERVE = 8            # connections no single uid may take (room for others)
LINGER_S = 2.0                  # a refused peer's socket waits this long for its request
LINGER_MAX = 8                  # refused sockets held at once (oldest closed first)
DRAIN_MAX = 1 << 17             # bytes read from a refused peer before giving up on it

# A slot reserved for a live process that does not adopt it within this many
# seconds is freed (bt_client_unreserve): its connect() gave up (e.g. timed
# out while btd was stopped) and would otherwise hold the slot for good. An
# adopt takes milliseconds; BT_RESERVE_TIMEOUT_S overrides (tests).
RESERVE_TIMEOUT_S = float(os.environ.get("BT_RESERVE_TIMEOUT_S", "30"))


# ---- /proc ------------------------------------------------------------------
def proc_stat(pid):
    """Fields of /proc/<pid>/stat from field 3 (state) on, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


def proc_start_time(pid):
    """Field 22 (start time in clock ticks), as libbt reads it; 0 if gone."""
    st = proc_stat(pid)
    return (int(st[19]) or 1) if st and len(st) > 19 else 0


def proc_state(pid):
    st = proc_stat(pid)
    return st[0].decode() if st else "gone"


def proc_groups(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def pidfd_exited(fd):
    sel = selectors.DefaultSelector()
    try:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(0))
    finally:
        sel.close()


def report_dict(rep):
    return {k: int(getattr(rep, k)) for k in commands.REPORT_KEYS}


# ---- the parts the loop juggles ------------------------------------------------
def peer_cred(sock):
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED)."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def raise_nofile():
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd starts services
    with soft 1024): (limit now, limit before)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = int(f.read())
        except (OSError, ValueError):
            want = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want, soft
        except (ValueError, OSError):
            pass
    return soft, soft


class Conn:
    """One control connection and the credentials of its peer."""

    def __init__(self, sock, cred=None):
        self.sock = sock
        self.pid, self.uid, self.gid = cred or peer_cred(sock)
        self.last = time.monotonic()    # the last bytes from the peer (or the accept)
        self.requests = 0
        self.pidfd = None
        try:
            self.pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:
            try:
                self.pidfd = os.pidfd_open(self.pid)
            except OSError:
                pass
        self.groups = proc_groups(self.pid) | {self.gid}
        self.lines = protocol.LineBuffer()
        self.out = bytearray()
        self.closing = False            # close once `out` is sent

    def evict_key(self):
        """Which connection goes first when room is needed: idle ones before
        those in the middle of a request or a reply, then the ones that never
        sent a request, the longest idle first."""
        return (bool(self.lines.buf or self.out), self.requests > 0, self.last)

    def close(self):
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.sock.close()


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
    """A segment btd serves."""

    def __init__(self, name, seg, created, requested):
        self.name, self.seg, self.created, self.requested = name, seg, created, requested
        self.pending = {}               # slot -> Pending
        self.seen = {}                  # slot -> (pid, start_time, ops) at last scan
        self.retired_ops = 0            # ops of slots that were freed since
        self.stuck = {}                 # slot -> {"pid", "since", "state"}
        self.reserved = {}              # slot -> (pid, start_time, since): not yet adopted
        self.origin = "config"          # or "create": asked for over the socket (an engine)

    @property
    def shm_path(self):
        return "/bt." + self.name

    def slot(self, sid):
        out = ffi.new("bt_client_slot_info *")
        rc = lib.bt_client_slot_get(self.seg._s(), sid, out)
        if rc:
            raise BtError(f"slot {sid}: {rc}")
        return out

    def check(self, flags, wait_ms):
        rep = ffi.new("bt_check_report *")
        return lib.bt_seg_check(self.seg._s(), flags, wait_ms, rep), rep

    def shm_stat(self):
        """(size, mode, uid, gid) of the shm object; None if gone. A stat by
        path takes no descriptor: btd must answer this (every tick, and in
        `status`) even when it is out of descriptors."""
        try:
            st = os.stat("/dev/shm" + self.shm_path)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mode & 0o7777, st.st_uid, st.st_gid


# ---- the daemon ---------------------------------------------------------------------
class Daemon:
    def __init__(self, cfg, args=None):
        self.cfg, self.args = cfg, args
        self.segments = {}              # name -> Managed
        self.watches = {}               # (pid, start_time) -> Watch
        self.sel = selectors.DefaultSelector()
        self.listener = None
        self.socket_path = None
        self.fd_limit, self.fd_limit_was = raise_nofile()
        self.conns = set()              # Conn
        self.by_uid = collections.Counter()
        self.conn_cap, self.uid_cap = MAX_CONNS, MAX_CONNS - OPERATOR_RESERVE
        self.reserve = []               # descriptors on /dev/null, spare
        self.refill_reserve()
        self.lingering = collections.OrderedDict()  # refused socket -> deadline
        self.accept_paused = False
        self.last_evict_log = self.last_pause_log = -1e9
        self.sigq = collections.deque()
        self.running = False
        self.started = time.time()
        self.next_tick = 0.0
        self.next_watchdog = None
        self.last_status = None
        self.stats = Stats()
        self.collector = metrics.Collector()
        self.metrics = None
        self.dirty = True               # publish a snapshot at the next tick

    # ---- start / stop ---------------------------------------------------------
    def start(self):
        # The socket first: a bad path or another btd on it must be refused
        # before any segment is created (which would then stay behind).
        self.open_socket()
        for name, scfg in self.cfg.segments.items():
            self.open_segment(name, scfg)
        self.size_caps()
        log.info("descriptors: limit %d%s; connections: at most %d, %d per uid", self.fd_limit,
                 f" (raised from {self.fd_limit_was})" if self.fd_limit != self.fd_limit_was
                 else "", self.conn_cap, self.uid_cap)
        self.install_signals()
        if self.cfg.metrics:
            self.start_metrics()
        self.scan()
        self.publish()
        wd = sdnotify.watchdog_interval()
        if wd:
            self.next_watchdog = time.monotonic() + wd
        self.running = True
        segs = ", ".join(f"{m.name} (/dev/shm{m.shm_path}, {m.seg.info.size} bytes, "
                         f"{'created' if m.created else 'adopted'})" for m in self.segments.values())
        log.info("btd %s serving %s on socket %s", __version__, segs, self.socket_path)
        sdnotify.notify("READY=1", f"STATUS={self.status_line()}", f"MAINPID={os.getpid()}")

    def open_segment(self, name, scfg):
        """Create the segment, or adopt it: validate (attach), take ownership,
        repair what a crash left (like fsck). A segment whose owner (another btd)
        is alive is refused; one whose creator died mid-format is recreated."""
        group = bool(self.cfg.socket_mode & 0o060)
        try:
            seg, created = _create(name, scfg, group), True
        except FileExistsError:
            try:
                seg, created = Segment.attach(name), False
            except BtError as e:
                if not (e.code == lib.BT_EBADMAGIC and remove_unfinished(name)):
                    raise config_mod.ConfigError(
                        f"segment {name!r} exists but cannot be adopted: {e}; if no process "
                        f"uses it, remove /dev/shm/bt.{name} and start again") from None
                log.warning("segment %s: its creator died before formatting it (no magic, "
                            "no creator holding it): removed, created afresh", name)
                seg, created = _create(name, scfg, group), True
            if not created and (owner := live_owner(seg.info)):
                seg.close()
                raise config_mod.ConfigError(
                    f"segment {name!r} (/dev/shm/bt.{name}) is owned by a live process, pid "
                    f"{owner} ({proc_comm(owner)}: another btd serving it, or the process "
                    f"that created it); not taken over: stop that one first, or serve another "
                    f"segment name")
        m = Managed(name, seg, created, scfg)
        seg.set_owner(os.getpid(), proc_start_time(os.getpid()))
        self.segments[name] = m
        if created:
            log.info("segment %s: created (%s)", name, _cfg_str(seg.config))
            return m
        if _norm(seg.config) != _norm(scfg):
            log.warning("segment %s: adopted as it is (%s), not as configured (%s); "
                        "sizes change only with a new segment", name, _cfg_str(seg.config),
                        _cfg_str(scfg))
        rc, rep = m.check(lib.BT_CHECK_REPAIR, self.cfg.recovery_wait_ms)
        r = report_dict(rep)
        if rc == 0:
            log.info("segment %s: adopted; repair reaped %d dead clients, fixed %d counts, "
                     "%d rows, freed %d leaked blocks (pause %.3f ms)", name, r["clients_reaped"],
                     r["refcnt_fixed"], r["rows_fixed"], r["leaked"], r["pause_ns"] / 1e6)
        else:
            log.warning("segment %s: adopted; repair deferred (%s, stuck client %d): retried "
                        "on the next ticks", name, _errname(rc), rep.stuck_client)
        return m

    def create_segment(self, name, scfg):
        """Serve a segment asked for by the `create` command: created (or a leftover of
        that name adopted and repaired, as at start) and from then on served like a configured
        one -- registration, watching, recovery, bt-ctl, metrics -- until btd stops."""
        try:
            m = self.open_segment(name, scfg)
        except config_mod.ConfigError as e:
            raise RequestError("BT_ECONFIG", str(e), code=int(lib.BT_ECONFIG)) from None
        m.origin = "create"
        self.dirty = True
        log.info("segment %s: %s on request (%s); served until btd stops", name,
                 "created" if m.created else "adopted", _cfg_str(m.seg.config))
        return m

    def drop_segment(self, m):
        """Stop serving a segment nobody uses yet (a refused create); one btd created is
        removed."""
        self.segments.pop(m.name, None)
        m.seg.close()
        if m.created:
            try:
                posix_ipc.unlink_shared_memory(m.shm_path)
            except posix_ipc.ExistentialError:
                pass
        self.dirty = True

    def open_socket(self):
        path = self.cfg.socket or config_mod.choose_socket_path()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.lexists(path):
            if not _is_socket(path):
                raise config_mod.ConfigError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise config_mod.ConfigError(f"another btd listens on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)         # stale: its daemon is gone
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK |
                          socket.SOCK_CLOEXEC)
        old = os.umask(0o177)           # never wider than 0600 before the chmod
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, self.cfg.socket_mode)
        s.listen(128)
        self.listener, self.socket_path = s, path
        self.sel.register(s, selectors.EVENT_READ, ("listen", None))

    def install_signals(self):
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wake = (r, w)
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: self.sigq.append(signum))
        self.sel.register(r, selectors.EVENT_READ, ("signal", None))

    def start_metrics(self):
        host, port = config_mod.parse_metrics(self.cfg.metrics)
        if self.metrics is None:
            try:
                self.metrics = metrics.Server(self.collector)
            except ImportError:
                log.error("metrics: prometheus-client is not installed (pip install "
                          "'blocktable[daemon]'); metrics off")
                return
        try:
            self.metrics.start(host, port)
        except OSError as e:
            log.error("metrics on %s: %s (metrics off)", self.cfg.metrics, e)

    def shutdown(self):
        sdnotify.notify("STOPPING=1")
        self.running = False
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
            self.listener = None
        for key in list(self.sel.get_map().values()):
            kind, obj = key.data
            if kind in ("conn", "linger"):
                obj.close()
        for w in self.watches.values():
            os.close(w.pidfd)
        self.watches.clear()
        if self.metrics:
            self.metrics.stop()
        for m in self.segments.values():
            if self.cfg.unlink_on_exit:
                try:
                    posix_ipc.unlink_shared_memory(m.shm_path)
                    log.info("segment %s: unlinked", m.name)
                except posix_ipc.ExistentialError:
                    pass
            m.seg.close()
        log.info("btd stopped")

    # ---- the loop -----------------------------------------------------------------------
    def run(self):
        while self.running:
            now = time.monotonic()
            wake = self.next_tick
            if self.next_watchdog is not None:
                wake = min(wake, self.next_watchdog)
            if self.lingering:
                wake = min(wake, next(iter(self.lingering.values())))
            events = self.sel.select(max(0.0, wake - now))
            dead = []
            for key, mask in events:         # dispatch
                kind, obj = key.data
                if kind == "listen":
                    self.accept()
                # (a connection or a refused socket may have been closed by an
                # earlier event of this batch: its event is stale)
                elif kind == "conn":
                    if obj in self.conns:
                        self.serve(obj, mask)
                elif kind == "linger":
                    if obj in self.lingering and _drain(obj):
                        self.unlinger(obj)
                        self.fd_freed()
                elif kind == "pidfd":
                    dead.append(obj)
                elif kind == "signal":
                    _drain_wakeups(key.fileobj)
            self.expire_lingering(time.monotonic())
            for w in dead:                   # reap
                self.client_died(w)
            if dead:
                self.publish()
                if any(m.pending for m in self.segments.values()):
                    # e.g. a zombie not yet reaped: retry soon, not a tick away
                    self.next_tick = min(self.next_tick, time.monotonic() + FAST_TICK[0])
            while self.sigq:                 # signals
                self.on_signal(self.sigq.popleft())
            if not self.running:
                break
            now = time.monotonic()
            if now >= self.next_tick:        # tick
                self.tick()
                self.next_tick = now + self.tick_period(now)
            if self.next_watchdog is not None and now >= self.next_watchdog:
                sdnotify.notify("WATCHDOG=1")
                self.next_watchdog = now + sdnotify.watchdog_interval()
        self.shutdown()

    def tick_period(self, now):
        pending = [p for m in self.segments.values() for p in m.pending.values()]
        if not pending:
            return self.cfg.tick_ms / 1000
        young = any(now - p.since < FAST_TICK[1] for p in pending)
        return FAST_TICK[0] if young else FAST_TICK[2]

    def on_signal(self, signum):
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("%s: shutting down", signal.Signals(signum).name)
            self.running = False
        elif signum == signal.SIGHUP:
            self.reload()

    def reload(self):
        """Re-read the config file; apply what can change without a restart."""
        sdnotify.notify("RELOADING=1")
        try:
            new = config_mod.load(self.args) if self.args is not None else self.cfg
        except config_mod.ConfigError as e:
            log.error("reload: %s (keeping the running config)", e)
            sdnotify.notify("READY=1")
            return {"changed": [], "error": str(e)}
        changed = [k for k in config_mod.RELOADABLE if getattr(new, k) != getattr(self.cfg, k)]
        for k in changed:
            setattr(self.cfg, k, getattr(new, k))
        logs.setup(self.cfg.log_level)
        if "metrics" in changed:
            if self.metrics:
                self.metrics.stop()
            if self.cfg.metrics:
                self.start_metrics()
        added = []
        for name, scfg in new.segments.items():
            if name not in self.segments:
                try:
                    self.open_segment(name, scfg)
                    added.append(name)
                except (config_mod.ConfigError, BtError, OSError) as e:
                    log.error("reload: segment %s: %s", name, e)
            elif _norm(scfg) != _norm(self.segments[name].requested):
                log.warning("reload: segment %s: a new size needs a new segment (restart "
                            "with it removed)", name)
        gone = sorted(n for n in set(self.segments) - set(new.segments)
                      if self.segments[n].origin == "config")
        if gone:
            log.warning("reload: segments %s stay served until a restart", gone)
        if (new.socket or self.socket_path) != self.socket_path:
            log.warning("reload: the socket moves only with a restart")
        if added:
            self.size_caps()
        log.info("reloaded: changed %s, new segments %s", changed or "nothing", added or "none")
        self.dirty = True
        sdnotify.notify("READY=1", f"STATUS={self.status_line()}")
        return {"changed": changed, "segments_added": added}

    # ---- control connections --------------------------------------------------------------
    # Descriptors are the resource a peer can exhaust. The connection cap is
    # sized from the limit (two per connection, one per watched client, and
    # btd's own), so that connections alone never run btd out; one uid may
    # hold all but OPERATOR_RESERVE of them. At a cap, a new peer is served
    # and the connection that matters least goes (an idle one of the uid
    # holding the most; see Conn.evict_key): holding connections open denies
    # nobody else. If descriptors run out anyway (used elsewhere, or the
    # limit lowered), spare ones answer each new peer EBUSY.

    def size_caps(self):
        watches = sum(m.seg.config.max_clients for m in self.segments.values())
        room = (self.fd_limit - FD_BASE - FD_RESERVE - LINGER_MAX - watches) // 2
        self.conn_cap = max(4, min(MAX_CONNS, room))
        self.uid_cap = max(2, self.conn_cap - OPERATOR_RESERVE) \
            if self.conn_cap > 2 * OPERATOR_RESERVE else max(2, self.conn_cap * 3 // 4)

    def conn_stats(self):
        return {"open": len(self.conns), "cap": self.conn_cap, "per_uid_cap": self.uid_cap,
                "fd_limit": self.fd_limit, "evicted": self.stats.conn_evicted,
                "refused": self.stats.conn_refused}

    def accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    if self.refuse_one():
                        continue
                    self.pause_accept()
                    return
                log.error("accept: %s", e)
                return
            sock.setblocking(False)
            try:
                cred = peer_cred(sock)
                self.make_room(cred[1])
                conn = Conn(sock, cred)
            except OSError as e:
                self.refuse(sock, f"cannot serve this connection: {e}")
                continue
            self.conns.add(conn)
            self.by_uid[conn.uid] += 1
            self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))

    def make_room(self, uid):
        """Before a connection of `uid` is added: at the uid's cap, its own
        least needed connection goes; at the total cap, that of the uid
        holding the most."""
        if self.by_uid[uid] >= self.uid_cap:
            victim_uid = uid
        elif len(self.conns) >= self.conn_cap:
            victim_uid = max(self.by_uid, key=self.by_uid.__getitem__)
        else:
            return
        victim = min((c for c in self.conns if c.uid == victim_uid), key=Conn.evict_key)
        self.stats.conn_evicted += 1
        now = time.monotonic()
        if now - self.last_evict_log > 10:
            log.warning("connections: at the cap (%d open, %d of uid %d; caps %d, %d per uid): "
                        "closing the least needed (pid %d, idle %.1f s); %d closed so far",
                        len(self.conns), self.by_uid[victim_uid], victim_uid, self.conn_cap,
                        self.uid_cap, victim.pid, now - victim.last, self.stats.conn_evicted)
            self.last_evict_log = now
        self.forget(victim)
        self.refuse(victim.sock, "connection closed to make room: btd is at its connection "
                    f"cap ({self.conn_cap}, {self.uid_cap} per uid) and this one was idle "
                    "the longest; connect again", notice=not victim.out, count=False)

    def refuse(self, sock, message, notice=True, count=True):
        """Answer EBUSY and close, without the two ways a close can hurt the
        answer: closing with the peer's request unread makes the kernel
        reset the peer (which may lose the answer), and closing before the
        peer has sent makes its send fail (EPIPE). So: answer, end our side
        of the stream, and hold the socket until the peer's request (or its
        close) is in, for LINGER_S at most."""
        if count:
            self.stats.conn_refused += 1
        if notice:
            try:
                sock.send(protocol.error(None, protocol.RequestError("EBUSY", message)))
            except OSError:
                pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if _drain(sock):
            sock.close()
            return
        while len(self.lingering) >= LINGER_MAX:
            self.unlinger(next(iter(self.lingering)))
        self.lingering[sock] = time.monotonic() + LINGER_S
        self.sel.register(sock, selectors.EVENT_READ, ("linger", sock))

    def unlinger(self, sock):
        """Close a refused socket: what the peer sent is read first."""
        del self.lingering[sock]
        self.sel.unregister(sock)
        _drain(sock)
        sock.close()

    def expire_lingering(self, now):
        freed = False
        while self.lingering:
            sock, deadline = next(iter(self.lingering.items()))
            if deadline > now:
                break
            self.unlinger(sock)
            freed = True
        if freed:
            self.fd_freed()

    def fd_freed(self):
        """A descriptor was given back (or a tick passed): spares first, then
        new connections again."""
        self.refill_reserve()
        self.resume_accept()

    def refill_reserve(self):
        while len(self.reserve) < FD_RESERVE:
            try:
                self.reserve.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def refuse_one(self):
        """accept() failed with EMFILE: free a spare descriptor (a reserve
        one, else the oldest refused socket's), accept and refuse one peer.
        False if there was nothing to free."""
        if self.reserve:
            os.close(self.reserve.pop())
        elif self.lingering:
            self.unlinger(next(iter(self.lingering)))
        else:
            return False
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return False
        sock.setblocking(False)
        self.refuse(sock, "btd is out of file descriptors; try again later")
        return True

    def pause_accept(self):
        """Out of descriptors with none to spare: stop watching the listener
        (it would wake us at once, forever) until one is freed."""
        if not self.accept_paused and self.listener is not None:
            self.sel.unregister(self.listener)
            self.accept_paused = True
            now = time.monotonic()
            if now - self.last_pause_log > 10:
                log.warning("accept: out of file descriptors (limit %d) and none to spare: new "
                            "connections wait in the backlog",
                            resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                self.last_pause_log = now

    def resume_accept(self):
        if self.accept_paused and self.listener is not None:
            self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
            self.accept_paused = False

    def serve(self, conn, mask):
        if mask & selectors.EVENT_READ and not conn.closing:
            try:
                data = conn.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                return self.drop(conn)
            if data:
                conn.last = time.monotonic()
            if data == b"":
                if conn.lines.buf.strip():      # a last request without newline
                    conn.out += self.handle(conn, bytes(conn.lines.buf))
                conn.closing = True
            elif data:
                try:
                    lines = conn.lines.feed(data)
                except RequestError as e:
                    lines = []
                    conn.out += protocol.error(None, e)
                    self.stats.count_request("?", e.name)
                    conn.closing = True
                for line in lines:
                    if line.strip():
                        conn.requests += 1
                        conn.out += self.handle(conn, line)
        self.flush(conn)

    def flush(self, conn):
        if conn.out:
            try:
                n = conn.sock.send(conn.out)
                del conn.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return self.drop(conn)
        if len(conn.out) > MAX_OUT:
            log.warning("pid %d reads nothing: connection dropped", conn.pid)
            return self.drop(conn)
        if conn.closing and not conn.out:
            return self.drop(conn)
        want = selectors.EVENT_WRITE if conn.out else 0
        if not conn.closing:
            want |= selectors.EVENT_READ
        self.sel.modify(conn.sock, want, ("conn", conn))

    def forget(self, conn):
        """Stop serving conn (its socket stays open): the counts, the
        selector and the pidfd."""
        if conn in self.conns:
            self.conns.discard(conn)
            self.by_uid[conn.uid] -= 1
            if not self.by_uid[conn.uid]:
                del self.by_uid[conn.uid]
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        if conn.pidfd is not None:
            os.close(conn.pidfd)
            conn.pidfd = None

    def drop(self, conn):
        self.forget(conn)
        conn.close()
        self.fd_freed()

    def allowed(self, conn):
        c = self.cfg
        return (conn.uid in (0, os.geteuid()) or conn.uid in c.allow_uids
                or bool(conn.groups & set(c.allow_groups)))

    def handle(self, conn, line):
        """One request line -> one reply line. Never raises."""
        req_id, cmd = None, "?"
        try:
            req_id, cmd, args = protocol.parse_request(line)
            command = commands.SERVER.get(cmd)
            if command is None:
                raise RequestError("ENOCMD", f"unknown command {cmd!r} (known: "
                                             f"{', '.join(sorted(commands.SERVER))})")
            if not self.allowed(conn):
                raise RequestError("EPERM", f"uid {conn.uid} is not served by this btd "
                                            "(allow_uids / allow_groups)")
            args = command.check_args(args)
            result = command.execute(self, conn, args)
            self.stats.count_request(cmd)
            return protocol.ok(req_id, result)
        except RequestError as e:
            err = e
            req_id = getattr(e, "req_id", req_id)
        except BtError as e:
            err = RequestError(e.name, str(e), code=e.code)
        except OSError as e:
            err = RequestError(errno.errorcode.get(e.errno, "EIO"), str(e), code=-(e.errno or 5))
        except Exception as e:  # noqa: BLE001 - a bug must not take the daemon down
            log.error("request %r failed:\n%s", line[:200], traceback.format_exc())
            err = RequestError("EINTERNAL", f"{type(e).__name__}: {e}")
        if cmd not in commands.SERVER:
            cmd = "?"
        self.stats.count_request(cmd, err.name)
        return protocol.error(req_id, err)

    def segment(self, name):
        """The Managed segment `name` (None: the only one)."""
        if name is None:
            if len(self.segments) == 1:
                return next(iter(self.segments.values()))
            raise RequestError("EARGS", f"several segments ({', '.join(self.segments)}): "
                                        "name one with segment")
        m = self.segments.get(name)
        if m is None:
            raise RequestError("ENOENT", f"no segment {name!r} (served: "
                                         f"{', '.join(self.segments)})")
        return m

    def register(self, conn, m):
        """Reserve a slot for the peer and watch it. Its pid comes from the
        socket (SO_PEERCRED), its identity is pinned by a pidfd taken at
        accept and the start time read while that pidfd says it lives."""
        if conn.pidfd is None:
            raise RequestError("EBUSY", f"cannot watch pid {conn.pid} (no pidfd)")
        start = proc_start_time(conn.pid)
        if not start or pidfd_exited(conn.pidfd):
            raise RequestError("ENOENT", f"pid {conn.pid} exited")
        slot = m.seg.reserve_client(conn.pid, start)
        w = self.watch(conn.pid, start, os.dup(conn.pidfd))
        w.slots.add((m.name, slot))
        m.seen[slot] = (conn.pid, start, 0)
        m.reserved[slot] = (conn.pid, start, time.monotonic())
        self.stats.registrations[m.name] += 1
        log.info("segment %s: registered pid %d (uid %d) in slot %d", m.name, conn.pid,
                 conn.uid, slot)
        self.dirty = True
        return slot

    # ---- watching clients -----------------------------------------------------------------
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

    def client_died(self, w):
        now = time.monotonic()
        self.unwatch(w)
        for name, sid in sorted(w.slots):
            m = self.segments.get(name)
            if m is not None:
                self.recover(m, sid, w.pid, w.start_time, now, "exited")

    def recover(self, m, sid, pid, start, since, reason):
        """Recover slot sid of a process that is gone, if it still holds it."""
        info = m.slot(sid)
        if info.state == lib.BT_CLIENT_FREE or info.pid != pid or \
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
        if info.state == lib.BT_CLIENT_FREE or info.pid != p.pid:
            return self.recovered(m, sid, p, None, "repair")
        if p.start_time and info.start_time != p.start_time:
            m.pending.pop(sid, None)     # a torn read of a slot being claimed: not a death
            return
        if info.state in (lib.BT_CLIENT_DEAD, _RECOVERING):
            rc, rep = m.check(lib.BT_CHECK_REPAIR, self.cfg.recovery_wait_ms)
            kind = "repair"
        else:
            rep = ffi.new("bt_check_report *")
            rc = lib.bt_seg_recover_client(m.seg._s(), sid, self.cfg.recovery_wait_ms, rep)
            kind = "repair" if rep.pause_ns else "lockfree"
        if rc == 0:
            if m.slot(sid).state == lib.BT_CLIENT_FREE or m.slot(sid).pid != p.pid:
                return self.recovered(m, sid, p, rep, kind)
            rc = lib.BT_EBUSY           # a repair that could not reap it (its pid lives)
        self.stats.recovery_failures[(m.name, _errname(rc))] += 1
        if rc == lib.BT_EBUSY and rep.stuck_client:
            st = m.slot(rep.stuck_client)
            p.stuck = (rep.stuck_client, st.pid, st.ops)
            p.next_forced = time.monotonic() + p.backoff
            p.backoff = min(p.backoff * 2, STUCK_BACKOFF[1])
            m.stuck[rep.stuck_client] = {"slot": rep.stuck_client, "pid": st.pid,
                                         "proc_state": proc_state(st.pid),
                                         "since": m.stuck.get(rep.stuck_client, {}).get(
                                             "since", time.time()),
                                         "blocking_slot": sid}
            if not p.logged:
                log.warning("segment %s: client %d (pid %d) died inside a call; the repair "
                            "waits for client %d (pid %d, state %s) stuck inside a call; its "
                            "consistent rows were released, the rest follows when it moves",
                            m.name, sid, p.pid, rep.stuck_client, st.pid,
                            proc_state(st.pid))
                p.logged = True
        elif rc == lib.BT_EBUSY:
            if not p.logged and p.attempts > 50:
                log.warning("segment %s: pid %d of client %d has exited but is not reaped "
                            "(state %s): recovery waits for its parent", m.name, p.pid, sid,
                            proc_state(p.pid))
                p.logged = True
        else:
            log.error("segment %s: recovering client %d (pid %d): %s", m.name, sid, p.pid,
                      _errname(rc))
        self.dirty = True

    def recovered(self, m, sid, p, rep, kind):
        m.pending.pop(sid, None)
        latency = time.monotonic() - p.since
        pause = rep.pause_ns / 1e9 if rep is not None else 0.0
        if p.stuck:
            kind = "deferred"
        self.stats.recovered(m.name, sid, p.pid, kind, pause, latency,
                             report_dict(rep) if rep is not None else None)
        if not m.pending:
            m.stuck.clear()
        log.info("segment %s: recovered client %d (pid %d, %s) in %.2f ms, pause %.3f ms",
                 m.name, sid, p.pid, kind, latency * 1e3, pause * 1e3)
        self.dirty = True

    def retry_pending(self, m):
        now = time.monotonic()
        for sid, p in list(m.pending.items()):
            if sid not in m.pending:     # completed by an earlier repair this turn
                continue
            if p.stuck and now < p.next_forced:
                ssid, spid, sops = p.stuck
                st = m.slot(ssid)
                if st.in_op and st.ops == sops and st.pid == spid and \
                        st.state == lib.BT_CLIENT_ACTIVE and proc_start_time(spid):
                    m.stuck[ssid]["proc_state"] = proc_state(spid)
                    continue            # still inside the same call: no freeze
            self.attempt(m, sid, p)

    # ---- the tick -----------------------------------------------------------------------
    def tick(self):
        self.fd_freed()
        for m in self.segments.values():
            self.retry_pending(m)
        self.scan()
        # Every tick, not only when btd saw an event: pool counts and the prefix-cache
        # counters move with the clients' own calls, which btd does not see.
        self.publish()
        line = self.status_line()
        if line != self.last_status:
            sdnotify.notify(f"STATUS={line}")
            self.last_status = line

    def scan(self):
        """Watch every claimed slot, including clients that opened without us
        or registered with an earlier btd; recover those already gone."""
        now = time.monotonic()
        for m in self.segments.values():
            for sid in range(1, m.seg.config.max_clients + 1):
                info = m.slot(sid)
                key = (info.pid, info.start_time)
                prev = m.seen.get(sid)
                if prev is not None and (info.state == lib.BT_CLIENT_FREE or prev[:2] != key):
                    m.retired_ops += prev[2]
                    w = self.watches.get(prev[:2])
                    if w is not None:
                        w.slots.discard((m.name, sid))
                        if not w.slots:
                            self.unwatch(w)
                    del m.seen[sid]
                    self.dirty = True
                if info.state != _RESERVED:
                    m.reserved.pop(sid, None)
                if info.state == lib.BT_CLIENT_FREE or info.pid <= 0:
                    continue            # free, or being claimed (pid not stored yet)
                if info.state == _RESERVED and sid not in m.pending and \
                        self.reclaim_reserved(m, sid, info, now):
                    continue
                m.seen[sid] = (info.pid, info.start_time, info.ops)
                if sid in m.pending:
                    continue
                if info.state in (lib.BT_CLIENT_DEAD, _RECOVERING):
                    if info.state == _RECOVERING and prev is None:
                        continue        # someone is recovering it now; look again later
                    self.recover(m, sid, info.pid, info.start_time, now, "found dead")
                    continue
                w = self.watches.get(key)
                if w is None:
                    try:
                        fd = os.pidfd_open(info.pid) if info.pid > 0 else None
                    except OSError:
                        fd = None
                    if fd is None or (info.start_time and proc_start_time(info.pid) != info.start_time):
                        if fd is not None:
                            os.close(fd)
                        self.recover(m, sid, info.pid, info.start_time, now, "found dead")
                        continue
                    w = self.watch(info.pid, info.start_time, fd)
                    log.info("segment %s: watching client %d (pid %d), found in its slot",
                             m.name, sid, info.pid)
                    self.dirty = True
                w.slots.add((m.name, sid))

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
        log.warning("segment %s: freed client slot %d reserved for pid %d, which did not "
                    "adopt it within %.0f s (its connect gave up)", m.name, sid, info.pid,
                    RESERVE_TIMEOUT_S)
        self.dirty = True
        return True

    def publish(self):
        try:
            self.collector.snap = self.snapshot()
        except OSError as e:            # e.g. EMFILE: keep the last snapshot, keep serving
            log.warning("metrics snapshot skipped: %s", e)
            return
        self.dirty = False

    def snapshot(self):
        s = self.stats
        return {"segments": [commands.segment_summary(self, m) for m in self.segments.values()],
                "requests": dict(s.requests), "request_errors": dict(s.request_errors),
                "recoveries": dict(s.recoveries), "recovery_failures": dict(s.recovery_failures),
                "registrations": dict(s.registrations),
                "pause_hist": {"buckets": s.pause.buckets(), "sum": s.pause.sum},
                "latency_hist": {"buckets": s.latency.buckets(), "sum": s.latency.sum}}

    def status_line(self):
        n = sum(len(m.seen) for m in self.segments.values())
        pend = sum(len(m.pending) for m in self.segments.values())
        stuck = sum(len(m.stuck) for m in self.segments.values())
        line = (f"{len(self.segments)} segment(s), {n} client(s), "
                f"{self.stats.total_recoveries} recovered")
        if pend:
            line += f", {pend} recovering"
        if stuck:
            line += f", {stuck} stuck client(s)"
        return line


class Stats:
    """Counters the daemon keeps (for stats, status and the metrics)."""

    def __init__(self):
        C = collections.Counter
        self.requests, self.request_errors = C(), C()
        self.recoveries, self.recovery_failures, self.registrations = C(), C(), C()
        self.pause = metrics.Hist(metrics.PAUSE_BUCKETS)
        self.latency = metrics.Hist(metrics.LATENCY_BUCKETS)
        self.recent = collections.deque(maxlen=256)
        self.total_recoveries = 0
        self.conn_evicted = 0           # closed to make room for a new peer
        self.conn_refused = 0           # answered EBUSY at accept (out of descriptors)

    def count_request(self, cmd, error=None):
        self.requests[cmd] += 1
        if error:
            self.request_errors[(cmd, error)] += 1

    def recovered(self, seg, slot, pid, kind, pause, latency, report):
        self.recoveries[(seg, kind)] += 1
        self.total_recoveries += 1
        self.pause.observe(pause)
        self.latency.observe(latency)
        self.recent.append({"time": time.time(), "segment": seg, "slot": slot, "pid": pid,
                            "kind": kind, "pause_ms": pause * 1e3, "latency_ms": latency * 1e3,
                            "report": report})


# ---- helpers --------------------------------------------------------------------------------
def _drain_wakeups(sock):
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _drain(sock, limit=DRAIN_MAX):
    """Read what a socket holds, without blocking. True once the peer is
    done sending (end of stream, a reset, a complete request line, or more
    than `limit` bytes), False if it may still send."""
    n = 0
    try:
        while n < limit:
            data = sock.recv(4096)
            if not data or data.endswith(b"\n"):
                return True
            n += len(data)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return True


def live_owner(info):
    """The pid of the segment's recorded owner if that process still runs (the
    same process: its start time matches, so a recycled pid is not it), else
    None. Adopting a live btd's segment would have two daemons repairing and
    recovering one segment under each other."""
    pid, start = info.owner_pid, info.owner_start_time
    if pid <= 0 or pid == os.getpid():
        return None
    st = proc_stat(pid)
    if not st or st[0] in (b"Z", b"X"):
        return None                     # gone, or exited and not yet reaped
    if start and proc_start_time(pid) != start:
        return None                     # the pid now names another process
    return pid


def proc_comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _create(name, scfg, group):
    """Segment.create, with a lack of memory explained: libbt reserves the whole
    segment at creation (a tmpfs without room would otherwise SIGBUS us later)."""
    try:
        return Segment.create(name, scfg, group=group, exclusive=True)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.ENOMEM):
            raise
        st = os.statvfs("/dev/shm")
        raise config_mod.ConfigError(
            f"segment {name!r} needs {scfg.size} bytes of shared memory; /dev/shm has "
            f"{st.f_bavail * st.f_frsize} bytes free ({os.strerror(e.errno)}): make the "
            f"segment smaller (--blocks-per-pool, --num-rows, ...) or /dev/shm larger") from None


def remove_unfinished(name, wait_s=30.0):
    """Unlink /dev/shm/bt.<name> if its formatting never finished: magic,
    format and header size still zero (the header is written last) while no
    creator holds the flock libbt's bt_seg_create keeps until the magic is
    written (the kernel drops it when the creator dies). A creator still
    formatting is waited for, up to wait_s. True if removed."""
    import fcntl
    path = f"/dev/shm/bt.{name}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)
        if os.pread(fd, 16, 0).strip(b"\0"):
            return False                # a header was written: damage, not a dead creator
        os.unlink(path)                 # under the lock: no creator can be mid-way
        return True
    finally:
        os.close(fd)


def _is_socket(path):
    import stat
    return stat.S_ISSOCK(os.lstat(path).st_mode)


def _errname(rc):
    return ffi.string(lib.bt_errname(rc)).decode()


def _norm(c):
    from dataclasses import replace
    return replace(c, kernel_block_size=c.kernel_block_size or c.block_size)


def _cfg_str(c):
    return (f"{c.num_pools} pool(s) x {c.blocks_per_pool} blocks of {c.block_size} tokens, "
            f"{c.num_rows} rows x {c.row_width}, {c.max_clients} clients")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="btd", description="The blocktable daemon: owns shared-memory segments, "
        "registers clients, recovers what dead clients held.")
    p.add_argument("--config", "-c", help="TOML config file (see blocktable_daemon.config)")
    p.add_argument("--socket", "-s", help="control socket path (default: $RUNTIME_DIRECTORY, "
                   "/run/blocktable, $XDG_RUNTIME_DIR/blocktable, /tmp/blocktable-UID)")
    p.add_argument("--socket-mode", help="socket permissions, octal, 0660 or stricter")
    p.add_argument("--segment", action="append", metavar="NAME",
                   help="serve this segment (repeatable; default: 'default'); the size flags "
                   "apply to the segments named here")
    for f in config_mod.SEG_FIELDS:
        p.add_argument("--" + f.replace("_", "-"), dest=f, type=int, metavar="N")
    p.add_argument("--allow-uid", type=int, action="append", metavar="UID",
                   help="serve this uid too (btd's own uid and root always are)")
    p.add_argument("--allow-group", action="append", metavar="GROUP",
                   help="serve peers in this group")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics there")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--tick-ms", type=int, help="slot scan period (default 500)")
    p.add_argument("--recovery-wait-ms", type=int,
                   help="how long a repair waits for live clients to leave their calls (50)")
    p.add_argument("--unlink-on-exit", action="store_true",
                   help="remove the segments on a clean shutdown (default: they stay)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective configuration as JSON and exit")
    p.add_argument("--version", action="version", version=f"btd {__version__}")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = config_mod.load(args)
    except config_mod.ConfigError as e:
        print(f"btd: {e}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level)
    if args.print_config:
        import json
        print(json.dumps(cfg.summary(), indent=2))
        return 0
    d = Daemon(cfg, args)
    try:
        d.start()
    except (config_mod.ConfigError, BtError, OSError) as e:
        log.error("cannot start: %s", e)
        for m in d.segments.values():
            m.seg.close()
        return 1
    d.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
