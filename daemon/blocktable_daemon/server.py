"""btd's server loop: one thread, one selector; signals, ticks, and the
daemon's public face (the methods the control commands call).

Each turn: dispatch (control connections, conns) -> reap (pidfds of dead
clients, watching) -> signals -> tick (slot scan, deferred recoveries,
status, watchdog). Signal handlers only enqueue; signal.set_wakeup_fd wakes
the selector. The model (model), the recovery state machine (recovery),
segment ownership (segments) and socket I/O (conns) live in their modules.
"""
import argparse
import collections
import errno
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback

from blocktable import BUILD_ID, BtError

from . import __version__, clib, commands, config as config_mod, logs, metrics, protocol, \
    sdnotify
from . import model, recovery as recovery_mod, segments as segments_mod
from .conns import Connections
from .protocol import RequestError
from .segments import remove_unfinished  # noqa: F401  (tests import it from here)
from .watching import Watcher

log = logging.getLogger("btd")
REFUSALS_LOGGED = 20            # refused registrations logged per uid and minute


class Daemon:
    """btd: the segments it serves, its connections, watches and recoveries.
    Not thread-safe: every method runs on the loop's thread (the metrics
    thread reads only the published snapshot). Errors: start() raises
    config.ConfigError, BtError or OSError; the request methods raise
    protocol.RequestError (an error reply)."""

    def __init__(self, cfg, args=None):
        self.cfg, self.args = cfg, args
        self.segments = {}              # name -> model.Managed
        self.sel = selectors.DefaultSelector()
        self.stats = model.Stats()
        self.recovery = recovery_mod.Recovery(self.stats, lambda: self.cfg.recovery_wait_ms,
                                              self.changed)
        self.watcher = Watcher(self.sel, self.recovery, self.stats, self.changed)
        self.conns = Connections(self.sel, self.stats, self.handle)
        self.sigq = collections.deque()
        self.running = False
        self.started = time.time()
        self.next_tick = 0.0
        self.next_watchdog = None
        self.last_status = None
        self.collector = metrics.SnapshotCollector()
        self.metrics = None
        self.dirty = True               # publish a snapshot at the next tick
        self.refusal_log = logs.RateLimit(REFUSALS_LOGGED, 60.0)

    def changed(self):
        """What btd shows changed: publish at the next turn."""
        self.dirty = True

    # ---- start / stop ---------------------------------------------------------
    def start(self):
        # The socket first: a bad path or another btd on it must be refused
        # before any segment is created (which would then stay behind).
        self.conns.open(self.cfg.socket or config_mod.choose_socket_path(), self.cfg.socket_mode)
        for name, scfg in self.cfg.segments.items():
            self.open_segment(name, scfg)
        self.size_caps()
        c = self.conns
        log.info("descriptors: limit %d%s; connections: at most %d, %d per uid", c.fd_limit,
                 f" (raised from {c.fd_limit_was})" if c.fd_limit != c.fd_limit_was
                 else "", c.conn_cap, c.uid_cap)
        self.install_signals()
        if self.cfg.metrics:
            self.start_metrics()
        self.watcher.scan(self.segments.values())
        self.publish()
        wd = sdnotify.watchdog_interval()
        if wd:
            self.next_watchdog = time.monotonic() + wd
        self.running = True
        segs = ", ".join(f"{m.name} (/dev/shm{m.shm_path}, {m.seg.info.size} bytes, "
                         f"{'created' if m.created else 'adopted'})" for m in self.segments.values())
        log.info("btd %s serving %s on socket %s", __version__, segs, self.socket_path)
        sdnotify.notify("READY=1", f"STATUS={self.status_line()}", f"MAINPID={os.getpid()}")

    @property
    def socket_path(self):
        return self.conns.socket_path

    def open_segment(self, name, scfg):
        """Serve segment `name`: created, or adopted (see segments.open_segment)."""
        group = bool(self.cfg.socket_mode & 0o060)
        m = segments_mod.open_segment(name, scfg, group, self.cfg.recovery_wait_ms)
        self.segments[name] = m
        return m

    def create_segment(self, name, scfg):
        """Serve a segment asked for by the `create` command: created (or a leftover of
        that name adopted and repaired, as at start) and from then on served like a configured
        one -- registration, watching, recovery, bt-ctl, metrics -- until btd stops."""
        try:
            m = self.open_segment(name, scfg)
        except config_mod.ConfigError as e:
            raise RequestError("BT_ECONFIG", str(e), code=int(clib.ECONFIG)) from None
        m.origin = "create"
        self.changed()
        log.info("segment %s: %s on request (%s); served until btd stops", name,
                 "created" if m.created else "adopted", segments_mod.cfg_str(m.seg.config))
        return m

    def drop_segment(self, m):
        """Stop serving a segment nobody uses yet (a refused create); one btd created is
        removed."""
        self.segments.pop(m.name, None)
        segments_mod.close_segment(m, unlink=m.created)
        self.changed()

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
                self.metrics = metrics.Metrics(self.collector)
            except ImportError:         # at start, main() refused this; here a reload asks
                log.error("metrics off: %s", metrics.PACKAGE_HINT)
                return
            self.stats.observers.append(self.metrics.observe_recovery)
        try:
            self.metrics.start(host, port)
        except OSError as e:
            log.error("metrics on %s: %s (metrics off)", self.cfg.metrics, e)

    def shutdown(self):
        sdnotify.notify("STOPPING=1")
        self.running = False
        self.conns.close()
        self.watcher.close()
        if self.metrics:
            self.metrics.stop()
        for m in self.segments.values():
            if segments_mod.close_segment(m, unlink=self.cfg.unlink_on_exit):
                log.info("segment %s: unlinked", m.name)
        log.info("btd stopped")

    # ---- the loop -----------------------------------------------------------------------
    def run(self):
        while self.running:
            self.turn()
        self.shutdown()

    def turn(self):
        """One turn of the loop: dispatch, reap, signals, tick."""
        now = time.monotonic()
        wake = self.next_tick
        for t in (self.next_watchdog, self.conns.next_deadline()):
            if t is not None:
                wake = min(wake, t)
        dead = []
        for key, mask in self.sel.select(max(0.0, wake - now)):   # dispatch
            kind, obj = key.data
            if kind == "pidfd":
                dead.append(obj)
            elif kind == "signal":
                _drain_wakeups(key.fileobj)
            else:
                self.conns.on_event(kind, obj, mask)
        self.conns.expire_lingering(time.monotonic())
        if dead:                             # reap
            self.reap(dead)
        while self.sigq:                     # signals
            self.on_signal(self.sigq.popleft())
        if not self.running:
            return
        now = time.monotonic()
        if now >= self.next_tick:            # tick
            self.tick()
            self.next_tick = now + recovery_mod.tick_period(
                self.segments.values(), now, self.cfg.tick_ms / 1000)
        if self.next_watchdog is not None and now >= self.next_watchdog:
            sdnotify.notify("WATCHDOG=1")
            self.next_watchdog = now + sdnotify.watchdog_interval()

    def reap(self, dead):
        for w in dead:
            self.watcher.client_died(w, self.segments)
        self.publish()
        if any(m.pending for m in self.segments.values()):
            # e.g. a zombie not yet reaped: retry soon, not a tick away
            self.next_tick = min(self.next_tick,
                                 time.monotonic() + recovery_mod.FAST_TICK[0])

    def on_signal(self, signum):
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("%s: shutting down", signal.Signals(signum).name)
            self.running = False
        elif signum == signal.SIGHUP:
            self.reload()

    def tick(self):
        self.conns.fd_freed()
        for m in self.segments.values():
            self.recovery.retry_pending(m)
        self.watcher.scan(self.segments.values())
        # Every tick, not only when btd saw an event: pool counts and the prefix-cache
        # counters move with the clients' own calls, which btd does not see.
        self.publish()
        line = self.status_line()
        if line != self.last_status:
            sdnotify.notify(f"STATUS={line}")
            self.last_status = line

    # ---- reload ---------------------------------------------------------------------------
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
        added = self.reload_segments(new)
        if (new.socket or self.socket_path) != self.socket_path:
            log.warning("reload: the socket moves only with a restart")
        log.info("reloaded: changed %s, new segments %s", changed or "nothing", added or "none")
        self.changed()
        sdnotify.notify("READY=1", f"STATUS={self.status_line()}")
        return {"changed": changed, "segments_added": added}

    def reload_segments(self, new):
        """Serve the segments new names; warn about what a reload cannot change."""
        added = []
        for name, scfg in new.segments.items():
            if name not in self.segments:
                try:
                    self.open_segment(name, scfg)
                    added.append(name)
                except (config_mod.ConfigError, BtError, OSError) as e:
                    log.error("reload: segment %s: %s", name, e)
            elif segments_mod.norm(scfg) != segments_mod.norm(self.segments[name].requested):
                log.warning("reload: segment %s: a new size needs a new segment (restart "
                            "with it removed)", name)
        gone = sorted(n for n in set(self.segments) - set(new.segments)
                      if self.segments[n].origin == "config")
        if gone:
            log.warning("reload: segments %s stay served until a restart", gone)
        if added:
            self.size_caps()
        return added

    def size_caps(self):
        self.conns.size_caps(sum(m.max_clients for m in self.segments.values()))

    # ---- requests ---------------------------------------------------------------------------
    def allowed(self, conn):
        c = self.cfg
        return (conn.uid in (0, os.geteuid()) or conn.uid in c.allow_uids
                or bool(conn.groups & set(c.allow_groups)))

    def handle(self, conn, line):
        """One request line -> one reply line. Never raises."""
        req_id, cmd, args = None, "?", {}
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
            self.stats.count_request(cmd, segment=self.request_segment(args))
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
        self.stats.count_request(cmd, err.name, self.request_segment(args))
        if cmd == "register":
            self.log_refusal(conn, args, err)
        return protocol.error(req_id, err)

    def request_segment(self, args):
        """The segment a request is about, for the metrics' label: the one it
        names, else the only one served; "" when it is about all of several,
        or names one btd does not serve (a peer's strings never become label
        values: each would be a new series, kept forever)."""
        name = args.get("segment") if isinstance(args, dict) else None
        if name is None and len(self.segments) == 1:
            return next(iter(self.segments))
        return name if isinstance(name, str) and name in self.segments else ""

    def log_refusal(self, conn, args, err):
        """Log a refused registration: the reason, the peer's pid and uid; at
        most REFUSALS_LOGGED per uid a minute (a peer must not flood the log)."""
        n = self.refusal_log.hit(conn.uid)
        if n is None:
            return
        name = args.get("segment") if isinstance(args, dict) else None
        name = (name if isinstance(name, str) else self.request_segment(args) or "-")[:64]
        more = f" ({n} more from uid {conn.uid} not logged)" if n else ""
        log.warning("segment %s: refused to register pid %d (uid %d): %s: %s%s", name,
                    conn.pid, conn.uid, err.name, err.message, more,
                    extra=logs.fields(segment=name, peer_pid=conn.pid, peer_uid=conn.uid,
                                      event="registration_refused"))

    # ---- what the commands call -------------------------------------------------------------
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

    def served(self, name=None):
        """[segment `name`], or every segment served when name is None."""
        return [self.segment(name)] if name is not None else list(self.segments.values())

    def find_segment(self, name):
        """The Managed segment `name`, or None if btd does not serve it."""
        return self.segments.get(name)

    def register(self, conn, m):
        """Reserve a slot of m for the peer of conn and watch it (see Watcher.register)."""
        return self.watcher.register(m, conn.pid, conn.uid, conn.pidfd)

    def summary(self, m):
        """m as `status` shows it (model.segment_summary)."""
        return model.segment_summary(m)

    def clients(self, m):
        """m's claimed slots (model.slot_list)."""
        return model.slot_list(m, self.watcher.is_watched)

    def fsck(self, m, repair, wait_ms):
        """bt_seg_check on m, frozen (or repairing): (rc, report dict)."""
        rc, rep = m.check(clib.CHECK_REPAIR if repair else clib.CHECK_FROZEN, wait_ms)
        if repair and rc == 0:
            self.changed()
        return rc, rep

    def status(self):
        """The `status` command's result."""
        addr = self.metrics.addr if self.metrics else None
        return {"version": __version__, "pid": os.getpid(), "socket": self.socket_path,
                "uptime_s": round(time.time() - self.started, 3),
                "metrics": "%s:%d" % addr if addr else None,
                "recoveries": self.stats.total_recoveries,
                "connections": self.conns.info(),
                "segments": [self.summary(m) for m in self.segments.values()]}

    def stats_report(self):
        """The `stats` command's result."""
        return self.stats.report({m.name: self.summary(m)["client_ops"]
                                  for m in self.segments.values()})

    # ---- what btd publishes -----------------------------------------------------------------
    def publish(self):
        try:
            self.collector.snap = self.snapshot()
        except OSError as e:            # e.g. EMFILE: keep the last snapshot, keep serving
            log.warning("metrics snapshot skipped: %s", e)
            return
        self.dirty = False

    def snapshot(self):
        s = self.stats
        segs = [self.summary(m) for m in self.segments.values()]
        abi = next((m.seg.info.abi for m in self.segments.values()), None)
        return {"segments": segs, "version": __version__, "build_id": BUILD_ID,
                "abi": f"{abi:#018x}" if abi is not None else "",
                "requests": dict(s.requests), "request_errors": dict(s.request_errors),
                "recoveries": dict(s.recoveries), "recovery_failures": dict(s.recovery_failures),
                "registrations": dict(s.registrations)}

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


def _drain_wakeups(sock):
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


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
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics there "
                   "(needs prometheus-client: pip install 'blocktable[daemon]')")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-target", choices=["auto", "journal", "stderr"],
                   help="journal: journald's native protocol with structured fields "
                   "(SEGMENT, CLIENT_ID, PEER_PID, PEER_UID, BT_EVENT); auto (default): "
                   "journal when run by systemd, else stderr")
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
    logs.setup(cfg.log_level, cfg.log_target)
    if args.print_config:
        import json
        print(json.dumps(cfg.summary(), indent=2))
        return 0
    if cfg.metrics and not metrics.available():
        print(f"btd: {metrics.PACKAGE_HINT}", file=sys.stderr)
        return 1
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
