"""Orphan segments: /dev/shm/bt.<name> objects whose owner is gone (bt-ctl orphans).

Segments outlive btd by design (clients keep working while it restarts; the next btd
adopts them). A segment is an *orphan* when its recorded owner -- the btd or process that
created or adopted it, bt_seg_info's owner_pid with owner_start_time, so a recycled pid
is not taken for it -- no longer runs: nobody recovers what its dead clients held, and
nobody removes it. A segment whose creator died before formatting finished (no header,
creation lock free) is an orphan too.

This runs locally, without btd (the point is that btd is gone). Removal is refused for a
segment whose owner lives or which a live process maps (its clients may still be
working); each segment is looked at again right before its unlink. Processes whose
/proc/PID/maps we may not read (another user's, without privileges) are not seen: run it
as root or as the segments' user.
"""
from __future__ import annotations

import fcntl
import os
from typing import Any, Dict, Iterable, List, Optional

SHM_DIR = "/dev/shm"
PREFIX = "bt."


def names() -> List[str]:
    """The segment names (without the bt. prefix) present in /dev/shm."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(e[len(PREFIX):] for e in entries
                  if e.startswith(PREFIX) and len(e) > len(PREFIX))


def mappers(paths: Iterable[str]) -> Dict[str, List[int]]:
    """path -> pids of the live processes (other than this one) that map it."""
    want = set(paths)
    out: Dict[str, List[int]] = {p: [] for p in want}
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/maps") as f:
                seen = set()
                for line in f:
                    parts = line.rstrip("\n").split(None, 5)
                    if len(parts) == 6:
                        path = parts[5].removesuffix(" (deleted)")
                        if path in want and path not in seen:
                            seen.add(path)
                            out[path].append(int(d))
        except OSError:             # gone meanwhile, or not ours to read
            continue
    return out


def _header_state(path: str) -> str:
    """For an object bt_seg_attach refused: 'formatting' while its creator holds the
    creation lock, 'unformatted' if no header was ever written and the lock is free
    (its creator died mid-format), else 'damaged'."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return "unreadable"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "formatting"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "damaged" if os.pread(fd, 16, 0).strip(b"\0") else "unformatted"
    finally:
        os.close(fd)


def inspect(name: str, mapped: Optional[List[int]] = None) -> Dict[str, Any]:
    """One segment: its owner, whether that owner lives, who maps it, and the verdict:
    orphan (owner dead) and removable (orphan, mapped by no live process)."""
    from blocktable import BtError, Segment

    from .procfs import proc_comm
    from .segments import live_owner
    path = f"{SHM_DIR}/{PREFIX}{name}"
    try:
        size = os.stat(path).st_size
    except OSError:
        size = None
    if mapped is None:
        mapped = mappers([path])[path]
    out: Dict[str, Any] = {"name": name, "path": path, "size": size, "owner_pid": None,
                           "owner_alive": False, "owner": None, "state": "formatted",
                           "mapped_by": mapped, "orphan": False, "removable": False,
                           "why": ""}
    try:
        seg = Segment.attach(name)
    except (BtError, OSError) as e:
        state = _header_state(path)
        out["state"] = state
        out["orphan"] = state == "unformatted"
        out["why"] = {"formatting": "its creator is formatting it",
                      "unformatted": "its creator died before formatting it",
                      "damaged": f"unreadable header ({e}); not removed by bt-ctl",
                      "unreadable": f"cannot open it ({e})"}[state]
    else:
        try:
            info = seg.info
        finally:
            seg.close()
        out["owner_pid"] = info.owner_pid or None
        pid = live_owner(info) if info.owner_pid != os.getpid() else os.getpid()
        if pid is not None:
            out.update(owner_alive=True, owner=proc_comm(pid),
                       why=f"owned by live pid {pid} ({proc_comm(pid)})")
        else:
            out["orphan"] = True
            out["why"] = (f"owner pid {info.owner_pid} is gone" if info.owner_pid
                          else "no owner recorded")
    if out["orphan"]:
        out["removable"] = not mapped
        if mapped:
            out["why"] += "; mapped by live pid " + ", ".join(map(str, mapped))
    return out


def scan() -> List[Dict[str, Any]]:
    """Every bt.* segment in /dev/shm, inspected."""
    ns = names()
    m = mappers(f"{SHM_DIR}/{PREFIX}{n}" for n in ns)
    return [inspect(n, m[f"{SHM_DIR}/{PREFIX}{n}"]) for n in ns]


def remove(names_: Optional[List[str]], found: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Unlink the named orphans (every removable orphan when names_ is None). Each is
    inspected again right before its unlink; one that is not a removable orphan is
    refused with the reason. Returns {"removed": [...], "refused": [...]}."""
    by_name = {s["name"]: s for s in found}
    if names_ is None:
        names_ = [s["name"] for s in found if s["removable"]]
    removed, refused = [], []
    for n in dict.fromkeys(names_):
        if n not in by_name and not os.path.exists(f"{SHM_DIR}/{PREFIX}{n}"):
            refused.append({"name": n, "reason": f"no segment {n!r} in {SHM_DIR}"})
            continue
        s = inspect(n)                  # again: it may have been adopted meanwhile
        if not s["orphan"]:
            refused.append({"name": n, "reason": f"not an orphan: {s['why']}"})
        elif not s["removable"]:
            refused.append({"name": n, "reason": s["why"]})
        else:
            err = _unlink(s)
            if err:
                refused.append({"name": n, "reason": err})
            else:
                removed.append({"name": n, "path": s["path"], "size": s["size"],
                                "owner_pid": s["owner_pid"], "why": s["why"]})
    return {"removed": removed, "refused": refused}


def _unlink(s: Dict[str, Any]) -> Optional[str]:
    """Unlink; an unformatted object only under its creation lock (no creator mid-way)."""
    try:
        if s["state"] != "unformatted":
            os.unlink(s["path"])
            return None
        fd = os.open(s["path"], os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "its creator is formatting it"
            if os.pread(fd, 16, 0).strip(b"\0"):
                return "a header appeared meanwhile"
            os.unlink(s["path"])
            return None
        finally:
            os.close(fd)
    except OSError as e:
        return f"cannot remove it: {e.strerror}"


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB"):
        if v < 1024:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"


def render(found: List[Dict[str, Any]]) -> str:
    from .commands import table
    orph = [s for s in found if s["orphan"]]
    rows = [[s["name"], _size(s["size"]), s["owner_pid"], s["state"],
             ",".join(map(str, s["mapped_by"])) or "-",
             "yes" if s["removable"] else "no", s["why"]] for s in orph]
    out = table(["SEGMENT", "SIZE", "OWNER", "STATE", "MAPPED_BY", "REMOVABLE", "WHY"], rows)
    live = len(found) - len(orph)
    return (out + f"\n{len(orph)} orphan(s); {live} other segment(s) have a live owner"
            + ("\nremove them with: bt-ctl orphans --remove [NAME...]"
               if any(s["removable"] for s in orph) else ""))


def render_removal(r: Dict[str, Any]) -> str:
    lines = [f"removed {s['path']} ({_size(s['size'])}; {s['why']})" for s in r["removed"]]
    lines += [f"refused {s['name']}: {s['reason']}" for s in r["refused"]]
    return "\n".join(lines) or "no orphans to remove"
