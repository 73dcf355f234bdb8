"""What btd reads about other processes: /proc and pidfds.

A process's start time is libbt's (bt_proc_start_time, through clib), so that
a slot's recorded start time compares equal and a zombie counts as dead in
both. Nothing here raises: a process that is gone reads as gone.
"""
from __future__ import annotations

import selectors


def proc_stat(pid: int) -> list[bytes] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


from .clib import proc_start_time  # noqa: E402,F401  (re-exported: btd's callers import it here)


def proc_state(pid: int) -> str:
    """The one-letter state (R, S, T, Z...), or "gone"."""
    st = proc_stat(pid)
    return st[0].decode() if st else "gone"


def proc_alive(pid: int) -> bool:
    """True if pid runs (not gone, not a zombie)."""
    st = proc_stat(pid)
    return bool(st) and st[0] not in (b"Z", b"X")  # type: ignore[index]  # (st is set)


def proc_groups(pid: int) -> set[int]:
    """Supplementary group ids of pid (empty if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def proc_comm(pid: int) -> str:
    """The command name of pid, or "?"."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def proc_title(pid: int) -> str | None:
    """What a process calls itself (vLLM sets titles: VLLM::EngineCore, VLLM::Worker_TP0),
    else its command name; None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        title = argv[0].decode(errors="replace").strip()
        if title and not title.startswith("/"):
            return title[:32]
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def pidfd_exited(fd: int) -> bool:
    """True if the process behind pidfd fd has exited (the fd is readable)."""
    sel = selectors.DefaultSelector()
    try:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(0))
    finally:
        sel.close()
