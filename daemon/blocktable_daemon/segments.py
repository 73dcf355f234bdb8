"""Taking a segment into service: create it, or adopt one that exists (validate,
refuse a live owner's, recreate one whose creator died mid-format, repair what
a crash left, like fsck), and let it go.

Errors: config.ConfigError (a message for the operator), BtError, OSError.
Process safety: ownership is recorded in the segment (owner pid and start
time), so a second btd refuses a segment a live one serves.
"""
import errno
import fcntl
import logging
import os
import time
from dataclasses import replace

import posix_ipc

from blocktable import BtError, Segment

from . import clib, config as config_mod
from .model import Managed
from .procfs import proc_alive, proc_comm, proc_start_time

log = logging.getLogger("btd")


def open_segment(name, scfg, group, wait_ms):
    """The Managed segment `name`: created from scfg, or adopted and repaired;
    btd (this process) recorded as its owner."""
    seg, created = _create_or_attach(name, scfg, group)
    m = Managed(name, seg, created, scfg)
    seg.set_owner(os.getpid(), proc_start_time(os.getpid()))
    if created:
        log.info("segment %s: created (%s)", name, cfg_str(seg.config))
    else:
        _repair_adopted(m, scfg, wait_ms)
    return m


def _create_or_attach(name, scfg, group):
    try:
        return _create(name, scfg, group), True
    except FileExistsError:
        pass
    try:
        seg = Segment.attach(name)
    except BtError as e:
        if not (e.code == clib.EBADMAGIC and remove_unfinished(name)):
            raise config_mod.ConfigError(
                f"segment {name!r} exists but cannot be adopted: {e}; if no process "
                f"uses it, remove /dev/shm/bt.{name} and start again") from None
        log.warning("segment %s: its creator died before formatting it (no magic, "
                    "no creator holding it): removed, created afresh", name)
        return _create(name, scfg, group), True
    owner = live_owner(seg.info)
    if owner:
        seg.close()
        raise config_mod.ConfigError(
            f"segment {name!r} (/dev/shm/bt.{name}) is owned by a live process, pid "
            f"{owner} ({proc_comm(owner)}: another btd serving it, or the process "
            f"that created it); not taken over: stop that one first, or serve another "
            f"segment name")
    return seg, False


def _repair_adopted(m, scfg, wait_ms):
    name, seg = m.name, m.seg
    if norm(seg.config) != norm(scfg):
        log.warning("segment %s: adopted as it is (%s), not as configured (%s); "
                    "sizes change only with a new segment", name, cfg_str(seg.config),
                    cfg_str(scfg))
    rc, r = m.check(clib.CHECK_REPAIR, wait_ms)
    if rc == 0:
        log.info("segment %s: adopted; repair reaped %d dead clients, fixed %d counts, "
                 "%d rows, freed %d leaked blocks (pause %.3f ms)", name, r["clients_reaped"],
                 r["refcnt_fixed"], r["rows_fixed"], r["leaked"], r["pause_ns"] / 1e6)
    else:
        log.warning("segment %s: adopted; repair deferred (%s, stuck client %d): retried "
                    "on the next ticks", name, clib.errname(rc), r["stuck_client"])


def close_segment(m, unlink=False):
    """Unmap m; with unlink, remove its shm object too (True if removed)."""
    m.seg.close()
    if not unlink:
        return False
    try:
        posix_ipc.unlink_shared_memory(m.shm_path)
        return True
    except posix_ipc.ExistentialError:
        return False


def live_owner(info):
    """The pid of the segment's recorded owner if that process still runs (the
    same process: its start time matches, so a recycled pid is not it), else
    None. Adopting a live btd's segment would have two daemons repairing and
    recovering one segment under each other."""
    pid, start = info.owner_pid, info.owner_start_time
    if pid <= 0 or pid == os.getpid():
        return None
    if not proc_alive(pid):
        return None                     # gone, or exited and not yet reaped
    if start and proc_start_time(pid) != start:
        return None                     # the pid now names another process
    return pid


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


def norm(c):
    """A config as compared for "the same size" (kernel_block_size defaulted)."""
    return replace(c, kernel_block_size=c.kernel_block_size or c.block_size)


def cfg_str(c):
    return (f"{c.num_pools} pool(s) x {c.blocks_per_pool} blocks of {c.block_size} tokens, "
            f"{c.num_rows} rows x {c.row_width}, {c.max_clients} clients")
