"""Logging to stderr, in the form journald reads when it holds our stderr.

Under systemd ($JOURNAL_STREAM names our stderr) each line starts with its
syslog priority, "<6>registered pid 42", and journald strips and keeps it;
elsewhere a plain timestamped line.
"""
import logging
import os
import sys

_PRIO = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
         logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    def format(self, record):
        prio = _PRIO.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def _stderr_is_journal():
    js = os.environ.get("JOURNAL_STREAM")
    if not js:
        return False
    try:
        dev, ino = (int(x) for x in js.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(level="info"):
    """Configure the "btd" logger; returns it. Safe to call again (reload)."""
    log = logging.getLogger("btd")
    log.setLevel(parse_level(level))
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        if _stderr_is_journal():
            h.setFormatter(JournalFormatter("%(message)s"))
        else:
            h.setFormatter(logging.Formatter(
                "%(asctime)s btd[%(process)d] %(levelname)s: %(message)s"))
        log.addHandler(h)
        log.propagate = False
    return log


def parse_level(level):
    if isinstance(level, int):
        return level
    v = logging.getLevelName(str(level).upper())
    if not isinstance(v, int):
        raise ValueError(f"unknown log level {level!r} (debug, info, warning, error)")
    return v
