"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

A name starting with '@' is in the abstract namespace. Without the variable
(not started by systemd) every call is a no-op. WATCHDOG_USEC asks for
WATCHDOG=1 at least that often; watchdog_interval() says how often to send
it (half the period, as sd_watchdog_enabled(3) advises), or None.
"""
from __future__ import annotations

import os
import socket


_sock = None


def notify(*lines: str) -> bool:
    """Send "KEY=value" lines; True if a datagram went out. Never raises:
    the socket is made once and kept, so that status and watchdog pings
    still go out while btd is out of file descriptors (a socket made per
    call raised EMFILE then, and took btd down)."""
    global _sock
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not lines:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        if _sock is None:
            # Non-blocking: a receiver that reads nothing must not stall the loop.
            _sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC |
                                  socket.SOCK_NONBLOCK)
        _sock.sendto("\n".join(lines).encode(), addr)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when none is asked for."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None
