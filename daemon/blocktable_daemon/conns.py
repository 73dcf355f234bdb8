"""The control socket's I/O: listening, accepting, reading request lines,
writing replies, and refusing peers without letting any of them deny service.

Descriptors are the resource a peer can exhaust. The connection cap is sized
from the limit (two per connection, one per watched client, and btd's own),
so that connections alone never run btd out; one uid may hold all but
OPERATOR_RESERVE of them. At a cap, a new peer is served and the connection
that matters least goes (an idle one of the uid holding the most; see
Conn.evict_key): holding connections open denies nobody else. If descriptors
run out anyway (used elsewhere, or the limit lowered), spare ones answer each
new peer EBUSY.

Not thread-safe: btd's loop thread only. Errors: open() raises
config.ConfigError (path not a socket, another btd on it) or OSError.
"""
import collections
import errno
import logging
import os
import resource
import selectors
import socket
import stat
import struct
import time

from . import config as config_mod, protocol
from .procfs import proc_groups
from .protocol import RequestError

log = logging.getLogger("btd")

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)     # Linux 6.5
MAX_OUT = 32 << 20              # a peer that reads nothing is dropped past this
MAX_CONNS = 512                 # connections, at most, whatever the limit
FD_BASE = 32                    # btd's own: std streams, selector, listener, metrics...
FD_RESERVE = 4                  # spare descriptors, spent to answer peers when out
OPERATOR_RESERVE = 8            # connections no single uid may take (room for others)
LINGER_S = 2.0                  # a refused peer's socket waits this long for its request
LINGER_MAX = 8                  # refused sockets held at once (oldest closed first)
DRAIN_MAX = 1 << 17             # bytes read from a refused peer before giving up on it


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


class Connections:
    """The listener and every connection. handle(conn, line) -> reply bytes
    answers one request line (never raises); stats (model.Stats) counts
    evicted and refused peers."""

    def __init__(self, sel, stats, handle):
        self.sel, self.stats, self.handle = sel, stats, handle
        self.listener = self.socket_path = None
        self.fd_limit, self.fd_limit_was = raise_nofile()
        self.conns = set()              # Conn
        self.by_uid = collections.Counter()
        self.conn_cap, self.uid_cap = MAX_CONNS, MAX_CONNS - OPERATOR_RESERVE
        self.reserve = []               # descriptors on /dev/null, spare
        self.refill_reserve()
        self.lingering = collections.OrderedDict()  # refused socket -> deadline
        self.accept_paused = False
        self.last_evict_log = self.last_pause_log = -1e9

    # ---- the listener ---------------------------------------------------------------------
    def open(self, path, mode):
        """Listen on path (a stale socket replaced; a live btd's refused)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.lexists(path):
            _remove_stale(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK |
                          socket.SOCK_CLOEXEC)
        old = os.umask(0o177)           # never wider than 0600 before the chmod
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        s.listen(128)
        self.listener, self.socket_path = s, path
        self.sel.register(s, selectors.EVENT_READ, ("listen", None))

    def close(self):
        """Stop listening (the socket file removed) and close every connection."""
        if self.listener is not None:
            if not self.accept_paused:
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

    def size_caps(self, watches):
        """Size the caps from the descriptor limit; watches: pidfds btd may hold."""
        room = (self.fd_limit - FD_BASE - FD_RESERVE - LINGER_MAX - watches) // 2
        self.conn_cap = max(4, min(MAX_CONNS, room))
        self.uid_cap = max(2, self.conn_cap - OPERATOR_RESERVE) \
            if self.conn_cap > 2 * OPERATOR_RESERVE else max(2, self.conn_cap * 3 // 4)

    def info(self):
        return {"open": len(self.conns), "cap": self.conn_cap, "per_uid_cap": self.uid_cap,
                "fd_limit": self.fd_limit, "evicted": self.stats.conn_evicted,
                "refused": self.stats.conn_refused}

    def next_deadline(self):
        """When the oldest refused socket is due to close, or None."""
        return next(iter(self.lingering.values())) if self.lingering else None

    # ---- events from the loop --------------------------------------------------------------
    def on_event(self, kind, obj, mask):
        """One selector event of kind "listen", "conn" or "linger". A connection
        or refused socket closed by an earlier event of the batch is stale."""
        if kind == "listen":
            self.accept()
        elif kind == "conn":
            if obj in self.conns:
                self.serve(obj, mask)
        elif kind == "linger":
            if obj in self.lingering and _drain(obj):
                self.unlinger(obj)
                self.fd_freed()

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

    # ---- refusing -------------------------------------------------------------------------
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
                sock.send(protocol.error(None, RequestError("EBUSY", message)))
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

    # ---- serving --------------------------------------------------------------------------
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
                self.take_lines(conn, data)
        self.flush(conn)

    def take_lines(self, conn, data):
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


def _remove_stale(path):
    """path exists: unlink it if it is a socket nobody listens on."""
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise config_mod.ConfigError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        raise config_mod.ConfigError(f"another btd listens on {path}")
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)                 # stale: its daemon is gone
    finally:
        probe.close()


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
