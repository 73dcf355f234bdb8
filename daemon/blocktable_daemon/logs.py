"""btd's logging: to the systemd journal with structured fields, or to stderr.

Targets (--log-target, `log_target` in the config file):
- journal: each record is one datagram in journald's native protocol
  (systemd.journal-fields(7), "Native Journal Protocol") to
  /run/systemd/journal/socket, with MESSAGE, PRIORITY, SYSLOG_IDENTIFIER=btd,
  CODE_* and the fields btd attaches to an event: SEGMENT, CLIENT_ID,
  PEER_PID, PEER_UID, BT_EVENT (see fields()). `journalctl BT_EVENT=...
  SEGMENT=...` then selects them. A record that cannot be sent (journald
  gone, its socket full, out of descriptors) goes to stderr instead.
- stderr: a plain timestamped line; when journald holds our stderr
  ($JOURNAL_STREAM names it) each line starts with its syslog priority,
  "<6>registered pid 42", which journald strips and keeps.
- auto (the default): journal when journald holds our stderr and its socket
  exists (a systemd service), else stderr.

Why our own few lines and not the `systemd` Python package: systemd-python
is published only as source and builds against libsystemd's headers
(pkg-config libsystemd), which a plain `pip install` on a machine without
them fails to find; the protocol itself is a documented datagram format.
BT_JOURNAL_SOCKET overrides the socket path (tests).

Thread safety: logging's handler lock serialises emit; the socket is made
once and kept (as sdnotify does), so btd can still log when out of
descriptors.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import sys
import time
from typing import Any, Hashable, Iterable

TARGETS = ("auto", "journal", "stderr")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIO = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
         logging.CRITICAL: 2}
_FIELDS = {"segment": "SEGMENT", "client_id": "CLIENT_ID", "peer_pid": "PEER_PID",
           "peer_uid": "PEER_UID", "event": "BT_EVENT"}


def fields(**kw: object) -> dict[str, dict[str, str]]:
    """`extra=` for a log call: journal fields of an event, by their short names
    (segment, client_id, peer_pid, peer_uid, event); None values are left out."""
    return {"journal": {_FIELDS[k]: str(v) for k, v in kw.items() if v is not None}}


class RateLimit:
    """At most n events per key in each period (seconds). hit(key) -> None when
    this one is not to be logged, else how many of the key's were not logged
    since the last one that was. Not thread-safe."""

    def __init__(self, n: int, period: float) -> None:
        self.n, self.period = n, period
        self.windows = {}               # key -> [window start, logged, dropped]

    def hit(self, key: Hashable, now: float | None = None) -> int | None:
        now = time.monotonic() if now is None else now
        w = self.windows.get(key)
        if w is None or now - w[0] >= self.period:
            if len(self.windows) > 4096:    # forget old windows (keys are uids)
                self.windows = {k: v for k, v in self.windows.items()
                                if now - v[0] < self.period}
            dropped = w[2] if w is not None else 0
            w = self.windows[key] = [now, 0, 0]
        else:
            dropped = 0
        if w[1] >= self.n:
            w[2] += 1
            return None
        w[1] += 1
        dropped, w[2] = dropped + w[2], 0
        return dropped


def _prio(record: logging.LogRecord) -> int:
    return _PRIO.get(record.levelno, 6)


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _prio(record)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def encode(pairs: Iterable[tuple[str, str | bytes]]) -> bytes:
    """journald's native datagram for (KEY, value) pairs: KEY=value lines; a
    value holding a newline as KEY, newline, its length (64-bit little
    endian), the bytes, newline."""
    out = bytearray()
    for key, value in pairs:
        v = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
        if b"\n" in v:
            out += key.encode() + b"\n" + struct.pack("<Q", len(v)) + v + b"\n"
        else:
            out += key.encode() + b"=" + v + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record to journald's socket; stderr (fallback) if it can't."""

    sock: socket.socket | None      # made on the first record

    def __init__(self, path: str, fallback: logging.Handler) -> None:
        super().__init__()
        self.path, self.fallback = path, fallback
        self.sock = None

    def record_fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        pairs = [("MESSAGE", self.format(record)), ("PRIORITY", str(_prio(record))),
                 ("SYSLOG_IDENTIFIER", "btd"), ("SYSLOG_PID", str(os.getpid())),
                 ("CODE_FILE", record.pathname), ("CODE_LINE", str(record.lineno)),
                 ("CODE_FUNC", record.funcName), ("LOGGER", record.name)]
        return pairs + sorted(getattr(record, "journal", {}).items())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(encode(self.record_fields(record)))
        except OSError:
            self.fallback.handle(record)
        except Exception:  # noqa: BLE001 - logging must never take btd down
            self.handleError(record)

    def send(self, data: bytes) -> None:
        if self.sock is None:
            # Non-blocking: a journald that reads nothing must not stall btd's loop.
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC |
                                      socket.SOCK_NONBLOCK)
        try:
            self.sock.sendto(data, self.path)
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self.send_memfd(data)

    def send_memfd(self, data: bytes) -> None:
        """A record larger than a datagram: in a sealed memfd, passed over the
        socket (the protocol's way for large entries)."""
        fd = os.memfd_create("btd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW |
                        fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,  # type: ignore[union-attr]
                                    struct.pack("i", fd))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        super().close()


def _stderr_is_journal() -> bool:
    js = os.environ.get("JOURNAL_STREAM")
    if not js:
        return False
    try:
        dev, ino = (int(x) for x in js.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def journal_socket() -> str:
    return os.environ.get("BT_JOURNAL_SOCKET") or JOURNAL_SOCKET


def _stderr_handler() -> logging.Handler:
    h = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        h.setFormatter(JournalFormatter("%(message)s"))
    else:
        h.setFormatter(logging.Formatter(
            "%(asctime)s btd[%(process)d] %(levelname)s: %(message)s"))
    return h


def setup(level: str | int = "info", target: str = "auto") -> logging.Logger:
    """Configure the "btd" logger; returns it. Safe to call again (reload: the
    level changes; the target stays what it was first set to)."""
    log = logging.getLogger("btd")
    log.setLevel(parse_level(level))
    if not log.handlers:
        h = _stderr_handler()
        path = journal_socket()
        if target == "journal" or (target == "auto" and _stderr_is_journal()
                                   and os.path.exists(path)):
            h = JournalHandler(path, h)
            h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.propagate = False
    return log


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    v = logging.getLevelName(str(level).upper())
    if not isinstance(v, int):
        raise ValueError(f"unknown log level {level!r} (debug, info, warning, error)")
    return v
