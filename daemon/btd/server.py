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
class Conn:
    """One control connection and the credentials of its peer."""

    def __init__(self, sock):
        self.sock = sock
        self.pid, self.uid, self.gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
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
        """(size, mode, uid, gid) of the shm object, via posix_ipc; None if gone."""
        try:
            m = posix_ipc.SharedMemory(self.shm_path, flags=0, read_only=True)
        except posix_ipc.ExistentialError:
            return None
        try:
            st = os.fstat(m.fd)
        finally:
            m.close_fd()
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
        self.nconns = 0
        self.reserve_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
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
        repair what a crash left (like fsck)."""
        group = bool(self.cfg.socket_mode & 0o060)
        try:
            seg, created = Segment.create(name, scfg, group=group, exclusive=True), True
        except FileExistsError:
            try:
                seg, created = Segment.attach(name), False
            except BtError as e:
                raise config_mod.ConfigError(
                    f"segment {name!r} exists but cannot be adopted: {e}; if no process uses "
                    f"it, remove /dev/shm/bt.{name} and start again") from None
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
            if kind == "conn":
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
            events = self.sel.select(max(0.0, wake - now))
            dead = []
            for key, mask in events:         # dispatch
                kind, obj = key.data
                if kind == "listen":
                    self.accept()
                elif kind == "conn":
                    self.serve(obj, mask)
                elif kind == "pidfd":
                    dead.append(obj)
                elif kind == "signal":
                    _drain(key.fileobj)
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
        log.info("reloaded: changed %s, new segments %s", changed or "nothing", added or "none")
        self.dirty = True
        sdnotify.notify("READY=1", f"STATUS={self.status_line()}")
        return {"changed": changed, "segments_added": added}

    # ---- control connections --------------------------------------------------------------
    # Connections beyond this get an EBUSY reply and are closed: one peer
    # flooding the socket must not take every descriptor.
    MAX_CONNS = 512

    def accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of descriptors: spend the reserve one on telling the
                # peer, so it gets an answer and we don't spin on accept().
                if e.errno in (errno.EMFILE, errno.ENFILE) and self.refuse_one():
                    continue
                log.error("accept: %s", e)
                return
            sock.setblocking(False)
            if self.nconns >= self.MAX_CONNS:
                self.refuse(sock, f"too many connections ({self.nconns}); try again later")
                continue
            try:
                conn = Conn(sock)
            except OSError as e:
                self.refuse(sock, f"cannot serve this connection: {e}")
                continue
            self.nconns += 1
            self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))

    def refuse(self, sock, message):
        """A best-effort EBUSY reply (non-blocking), then close."""
        try:
            sock.send(protocol.error(None, protocol.RequestError("EBUSY", message)))
        except OSError:
            pass
        sock.close()

    def refuse_one(self):
        """accept() failed with EMFILE: free the reserve descriptor, accept
        and refuse one peer, take the reserve back. False if no reserve."""
        if self.reserve_fd is None:
            return False
        os.close(self.reserve_fd)
        self.reserve_fd = None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            sock = None
        if sock is not None:
            self.refuse(sock, "btd is out of file descriptors; try again later")
        try:
            self.reserve_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass
        return sock is not None

    def serve(self, conn, mask):
        if mask & selectors.EVENT_READ and not conn.closing:
            try:
                data = conn.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                return self.drop(conn)
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

    def drop(self, conn):
        try:
            self.sel.unregister(conn.sock)
            self.nconns -= 1
        except (KeyError, ValueError):
            pass
        conn.close()

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
                if info.state == lib.BT_CLIENT_FREE or info.pid <= 0:
                    continue            # free, or being claimed (pid not stored yet)
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

    def publish(self):
        self.collector.snap = self.snapshot()
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
def _drain(sock):
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


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
    p.add_argument("--config", "-c", help="TOML config file (see btd.config)")
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
