"""Attach to a segment that the daemon btd owns: register over its control
socket, then map the segment and take the reserved client slot.

Only registration goes through the socket. The daemon reads the caller's pid
from the socket's peer credentials (never from the request), reserves a
client slot for it, and watches the process; from then on every call is a
direct libbt call on the shared mapping, and if the process dies the daemon
recovers what it held. Without a daemon, ``Segment.create()`` (embedded) and
``Segment.attach(name).client()`` keep working as before.

The socket protocol (newline-delimited JSON) is spoken here in a few lines
so that a client needs nothing but this package; blocktable_daemon.protocol is the server
side and bt-ctl's client.
"""
from __future__ import annotations

import errno
import grp
import json
import os
import socket as _socket
import stat as _stat
from typing import Any, Mapping

from ._core import Client, Segment

__all__ = ["connect", "request", "default_socket_path", "socket_candidates",
           "DaemonNotRunning", "DaemonDisconnected", "DaemonError", "SOCKET_ENV", "SOCKET_NAME"]

SOCKET_ENV = "BT_SOCKET"            # picks the daemon, for connect() and bt-ctl
SOCKET_NAME = "btd.sock"
MAX_REPLY = 64 << 20                # a reply larger than this is refused


class DaemonNotRunning(ConnectionError):
    """Nobody listens on the control socket (absent, or refused)."""


class DaemonDisconnected(ConnectionError):
    """btd closed or reset the connection before its answer was complete
    (it was stopped, restarted or killed meanwhile). The message names the
    socket; ``errno`` is ECONNRESET."""


class DaemonError(RuntimeError):
    """The daemon answered with an error: ``code``, ``name``, ``message``."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.code, self.name, self.message = code, name, message


def socket_candidates() -> list[str]:
    """Where a daemon's socket may be, most specific first: systemd's
    RuntimeDirectory (/run/blocktable), then the user's runtime dir, then a
    per-uid folder in /tmp (btd picks the first it can create)."""
    out = []
    rd = os.environ.get("RUNTIME_DIRECTORY")
    if rd:                          # set by systemd for the service itself
        out.append(os.path.join(rd.split(":")[0], SOCKET_NAME))
    out.append(os.path.join("/run/blocktable", SOCKET_NAME))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        out.append(os.path.join(xdg, "blocktable", SOCKET_NAME))
    out.append(os.path.join(f"/tmp/blocktable-{os.getuid()}", SOCKET_NAME))
    return list(dict.fromkeys(out))


def default_socket_path() -> str:
    """$BT_SOCKET, else the first candidate that exists, else the first one."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    cands = socket_candidates()
    return next((p for p in cands if os.path.exists(p)), cands[0])


def request(cmd: str, args: Mapping[str, Any] | None = None, socket: str | None = None,
            timeout: float = 10.0, req_id: int = 1) -> Any:
    """Send one request and return its result; raise DaemonError for an
    error reply (EBUSY: btd is at a limit, try again later),
    DaemonNotRunning when nobody listens, DaemonDisconnected when btd
    closes the connection before its answer is complete."""
    path = socket or default_socket_path()
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError as e:
            raise DaemonNotRunning(e.errno, f"btd is not running (no listener on {path})",
                                   path) from None
        except ConnectionRefusedError as e:
            if not _stat.S_ISSOCK(os.stat(path).st_mode):   # e.g. --socket /etc/passwd
                raise ConnectionRefusedError(
                    e.errno, f"{path} is not a socket: not btd's control socket "
                    "(see --socket / $BT_SOCKET)", path) from None
            raise DaemonNotRunning(e.errno, f"btd is not running (no listener on {path})",
                                   path) from None
        except PermissionError as e:
            raise PermissionError(e.errno, _permission_hint(path), path) from None
        line = json.dumps({"id": req_id, "cmd": cmd, "args": args or {}}) + "\n"
        try:
            s.sendall(line.encode())
        except (BrokenPipeError, ConnectionResetError):
            pass        # btd answered and closed first (a refusal): its answer is queued
        buf = bytearray()
        while not buf.endswith(b"\n"):
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise DaemonDisconnected(
                    errno.ECONNRESET, f"btd closed the connection on {path} before its "
                    "answer was complete (it was stopped, restarted or killed meanwhile)")
            buf += chunk
            if len(buf) > MAX_REPLY:
                raise ConnectionError(errno.EMSGSIZE, f"btd's reply is too large ({path})")
    except TimeoutError:                # socket.timeout: connect, send or recv
        raise TimeoutError(errno.ETIMEDOUT, f"btd did not answer {cmd!r} within {timeout} s "
                                            f"on {path} (is it stopped or overloaded?)",
                           path) from None
    finally:
        s.close()
    reply = json.loads(buf)
    if reply.get("status") != "ok":
        err = reply.get("error") or {}
        raise DaemonError(err.get("code", -1), err.get("name", "EUNKNOWN"),
                          err.get("message", "no message"))
    return reply.get("result")


def _permission_hint(path: str) -> str:
    """The message of a refused connect: the path, and what lets us in."""
    msg = f"permission denied connecting to btd's socket {path}"
    try:
        st = os.stat(path)
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        msg += (f" (mode {st.st_mode & 0o777:o}, group {group}): join the socket's group "
                f"(e.g. usermod -aG {group} $USER, then log in again), or ask the operator "
                f"to serve your uid")
    except OSError:
        msg += ": join the socket's group, or ask the operator to serve your uid"
    return msg


def connect(name: str = "default", socket: str | None = None, timeout: float = 10.0,
            create: Mapping[str, int] | None = None) -> Client:
    """Register with btd for segment `name` and return an attached Client
    (its Segment is ``client.segment``). Closing the client releases what it
    holds; if the process dies instead, the daemon recovers it.

    create: a dict of bt_config fields (e.g. block_size, blocks_per_pool,
    num_rows, row_width, cache_pools): btd creates the segment so if it does
    not serve `name` yet (an engine sizing its segment from its KV-cache
    config); if it does, the segment must be at least that large.

    Errors: DaemonNotRunning; PermissionError and TimeoutError naming the
    socket (a stopped btd: any slot it reserves late is reclaimed by it
    unless adopted, see blocktable_daemon.server); DaemonError (the daemon refused: an unknown
    segment, a uid it does not serve, no free client slot; with create,
    name "BT_ECONFIG" when the served segment is too small, naming both
    sizes, or the config is impossible); the errors of Segment.attach and
    Segment.adopt_client. Thread safety: none needed (one request each)."""
    if create is not None:
        request("create", {"segment": name, "config": dict(create)}, socket=socket,
                timeout=timeout)
    res = request("register", {"segment": name}, socket=socket, timeout=timeout)
    seg = Segment.attach(res["segment"])
    try:
        return seg.adopt_client(res["slot"])
    except BaseException:
        seg.close()
        raise
