"""btd: start and stop, signals, sd_notify, registration over the socket,
adoption of an existing segment, recovery of dead clients, and a control
socket that survives whatever it is sent."""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

import blocktable
from blocktable import Segment, SegmentConfig
from blocktable.connect import DaemonError, DaemonNotRunning, connect, request

from blocktable_daemon import config as btd_config, protocol, sdnotify
from blocktable_daemon.server import parse_args
from blocktable_daemon.testing import DaemonProcess, child_env, unique_name, wait_for

from conftest import free_port, socket_lines, unlink_quietly

SMALL = {"blocks_per_pool": 1024, "num_rows": 32, "row_width": 16, "max_clients": 16,
         "hand_size": 64}


SIZES = SMALL                       # what conftest's `daemon` fixture serves


def child(code, *args, env=None, timeout=60):
    """Run Python code in a fresh process (argv available as sys.argv[1:])."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=child_env(env),
                          capture_output=True, text=True, timeout=timeout)


def python_child(code, *args, **popen):
    """`python -c code args...` in the test environment, its stdin and stdout piped (text)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **popen)


def slot_state(seg, slot):
    return seg.client_slot(slot).state


def recovered_then_close(seg, slot, what):
    """Wait (10 s at most) for `what`: slot freed and nothing held in seg; then close seg."""
    wait_for(lambda: slot_state(seg, slot) == 0, 10, what)
    assert seg.check().blocks_held == 0
    seg.close()


# ---- start, stop, signals ----------------------------------------------------------------
def test_start_serves_socket_and_segment(daemon):
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) & 0o007 == 0          # 0660 or stricter
    assert os.path.exists(f"/dev/shm/bt.{daemon.segment}")
    s = daemon.request("status")
    assert s["pid"] == daemon.pid and s["socket"] == daemon.socket
    [seg] = s["segments"]
    assert seg["name"] == daemon.segment and seg["created"] is True
    assert seg["config"]["blocks_per_pool"] == SMALL["blocks_per_pool"]
    assert seg["blocks_free"] == SMALL["blocks_per_pool"] - 1
    assert "serving" in daemon.log() and daemon.socket in daemon.log()


def test_term_keeps_segment_and_removes_socket(daemon):
    assert daemon.stop(signal.SIGTERM) == 0
    assert not os.path.exists(daemon.socket)
    seg = Segment.attach(daemon.segment)                   # the segment outlives btd
    assert seg.config.blocks_per_pool == SMALL["blocks_per_pool"]
    seg.close()
    with pytest.raises(DaemonNotRunning):
        request("status", socket=daemon.socket)


def test_int_and_unlink_on_exit(tmp_path):
    d = DaemonProcess(tmp_path, args=["--unlink-on-exit"], sizes=SMALL).start()
    try:
        assert d.stop(signal.SIGINT) == 0
        assert not os.path.exists(f"/dev/shm/bt.{d.segment}")
        assert "STOPPING=1" in "".join(_drain_notices(d))
    finally:
        d.cleanup()


def _drain_notices(d):
    out = list(d.notices)
    d._notify.settimeout(0.2)
    try:
        while True:
            out.append(d._notify.recv(4096).decode())
    except socket.timeout:
        pass
    return out


def test_second_daemon_on_same_socket_refused(daemon, tmp_path):
    other = DaemonProcess(tmp_path / "other")
    other.socket = daemon.socket
    other.start(ready=False)
    assert other.proc.wait(30) == 1
    assert "another btd listens" in other.log()
    daemon.request("status")                               # the first still serves
    other.cleanup()


def test_stale_socket_replaced(tmp_path):
    d = DaemonProcess(tmp_path, sizes=SMALL).start()
    try:
        d.kill()                                           # leaves the socket file behind
        assert os.path.exists(d.socket)
        d.start()
        assert d.request("status")["segments"][0]["created"] is False
    finally:
        d.cleanup()


def test_second_btd_refuses_a_live_btds_segment_and_adopts_a_dead_ones(tmp_path):
    """Two btds on one segment (a `make run` beside a service) would both repair
    and recover it: the second must refuse while the owner lives, naming it."""
    a = DaemonProcess(tmp_path / "a", sizes=SMALL).start()
    b = DaemonProcess(tmp_path / "b", segment=a.segment, sizes=SMALL)
    try:
        b.start(ready=False)
        assert b.proc.wait(30) == 1
        assert f"segment {a.segment!r}" in b.log() and f"pid {a.pid}" in b.log(), b.log()
        assert "adopted" not in b.log()
        seg = Segment.attach(a.segment)
        assert seg.info.owner_pid == a.pid                 # A's ownership untouched
        seg.close()
        assert a.request("status")["pid"] == a.pid
        a.kill()                                           # a dead owner: adopted
        b.start()
        assert "adopted" in b.log()
        seg = Segment.attach(a.segment)
        assert seg.info.owner_pid == b.pid
        seg.close()
    finally:
        b.cleanup()
        a.cleanup()


def test_unfinished_segment_is_recreated(tmp_path):
    """A creator that died mid-format (the header, magic last, never written)
    leaves an object nobody holds: btd recreates it rather than refusing to
    start until someone removes it by hand."""
    d = DaemonProcess(tmp_path, sizes=SMALL)
    with open(f"/dev/shm/bt.{d.segment}", "wb") as f:
        f.truncate(1 << 16)                                # zeros: no magic, no header
    try:
        d.start()
        assert "created afresh" in d.log()
        assert d.request("status")["segments"][0]["created"] is True
        seg = Segment.attach(d.segment)
        assert seg.info.size == SegmentConfig(**SMALL).size and seg.info.owner_pid == d.pid
        seg.close()
    finally:
        d.cleanup()


def test_unfinished_segment_is_left_alone_while_its_creator_holds_it():
    """Recreated only with no creator holding libbt's format lock (a live one is
    waited for, bounded) and no header written (a damaged segment is not a
    dead creator's, and stays refused)."""
    import fcntl
    from blocktable_daemon.server import remove_unfinished
    name = unique_name()
    path = f"/dev/shm/bt.{name}"
    try:
        with open(path, "wb") as f:
            f.truncate(1 << 16)
            fcntl.flock(f, fcntl.LOCK_EX)                  # a creator still formatting
            assert remove_unfinished(name, wait_s=0.2) is False and os.path.exists(path)
            fcntl.flock(f, fcntl.LOCK_UN)                  # it died
            assert remove_unfinished(name, wait_s=0.2) is True and not os.path.exists(path)
        with open(path, "wb") as f:
            f.truncate(1 << 16)
            f.seek(9)
            f.write(b"\x07")                               # a header: damage, not unfinished
        assert remove_unfinished(name, wait_s=0.2) is False and os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _unshare_ok():
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_segment_larger_than_dev_shm_is_refused_cleanly(tmp_path):
    """/dev/shm too small (Docker's default is 64 MB): libbt reserves the memory
    at creation, so btd exits with the bytes needed and free instead of dying
    of SIGBUS while formatting, and leaves no half-written segment behind."""
    if not _unshare_ok():
        pytest.skip("needs `unshare -m` (root or user namespaces) to mount a small /dev/shm")
    name = unique_name()
    sizes = {**SMALL, "blocks_per_pool": 1 << 20}
    need = SegmentConfig(**sizes).size
    assert need > 8 << 20
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sizes.items())
    script = (f"mount -t tmpfs -o size=8m tmpfs /dev/shm || exit 99; "
              f"{sys.executable} -m blocktable_daemon.server --socket {tmp_path}/btd.sock --segment {name} "
              f"{flags}; echo rc=$?; ls -A /dev/shm")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], env=child_env(),
                       capture_output=True, text=True, timeout=60)
    if r.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace: {r.stderr}")
    out, err = r.stdout.split(), r.stderr
    assert out == ["rc=1"], (r.stdout, err)                # exit 1, nothing left in /dev/shm
    assert f"segment {name!r} needs {need} bytes" in err, err
    assert f"/dev/shm has {8 << 20} bytes free" in err, err


def test_status_and_watchdog_notifications(tmp_path):
    d = DaemonProcess(tmp_path, sizes=SMALL)
    d.start(extra_env={"WATCHDOG_USEC": "200000"})
    try:
        d.wait_notice("WATCHDOG=1", timeout=10)
        d.wait_notice("WATCHDOG=1", timeout=10)
    finally:
        d.cleanup()


def test_sdnotify_abstract_socket(monkeypatch):
    name = "bt-test-" + unique_name()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert sdnotify.notify("READY=1", "STATUS=hi")
    assert s.recv(100) == b"READY=1\nSTATUS=hi"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1")
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert sdnotify.watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sdnotify.watchdog_interval() is None
    s.close()


def test_journal_priority_prefix(tmp_path):
    # JOURNAL_STREAM naming our stderr: lines carry <N> priorities.
    code = ("import os,sys; st=os.fstat(2); os.environ['JOURNAL_STREAM']=f'{st.st_dev}:{st.st_ino}';"
            "from blocktable_daemon import logs; log=logs.setup('info'); log.info('hello'); log.warning('careful')")
    r = child(code)
    assert r.stderr.splitlines() == ["<6>hello", "<4>careful"], r.stderr
    r = child("from blocktable_daemon import logs; logs.setup('info').info('plain')")
    assert "INFO: plain" in r.stderr and not r.stderr.startswith("<")


def journal_entries(sock):
    """Entries in journald's native protocol received on sock so far (dicts)."""
    import struct
    out = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except (BlockingIOError, socket.timeout):
            return out
        entry, i = {}, 0
        while i < len(data):
            nl = data.index(b"\n", i)
            line = data[i:nl]
            if b"=" in line:
                k, v = line.split(b"=", 1)
                i = nl + 1
            else:                       # KEY\n<u64 le length><bytes>\n
                k = line
                n = struct.unpack("<Q", data[nl + 1:nl + 9])[0]
                v = data[nl + 9:nl + 9 + n]
                i = nl + 9 + n + 1
            entry[k.decode()] = v.decode()
        out.append(entry)


def test_journal_native_encoding():
    from blocktable_daemon import logs
    assert logs.encode([("MESSAGE", "one line"), ("SEGMENT", "s")]) == \
        b"MESSAGE=one line\nSEGMENT=s\n"
    # a value with a newline: KEY, newline, 64-bit little-endian length, bytes, newline
    assert logs.encode([("MESSAGE", "a\nb")]) == b"MESSAGE\n\x03" + b"\0" * 7 + b"a\nb\n"


def _refuse_and_close(d):
    """A registration btd refuses (an unknown segment), then a client that
    registers, closes its slot and exits: (its pid, its slot)."""
    with pytest.raises(DaemonError):
        d.request("register", {"segment": "nope"})
    p, slot, _row = spawn_client(d, mode="close")
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "closed"
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(10) == 0
    return p.pid, slot


def test_refused_registration_and_clean_exit_are_logged(daemon):
    pid, slot = _refuse_and_close(daemon)
    me = f"pid {os.getpid()} (uid {os.getuid()})"
    wait_for(lambda: "closed cleanly" in daemon.log(), 10, "the clean close in btd's log")
    log = daemon.log()
    [refused] = [ln for ln in log.splitlines() if "refused to register" in ln]
    assert "WARNING" in refused and me in refused and "no segment 'nope'" in refused, refused
    [closed] = [ln for ln in log.splitlines() if "closed cleanly" in ln]
    assert f"segment {daemon.segment}: client {slot} (pid {pid}) closed cleanly" in closed


def test_refused_registrations_are_logged_at_most_20_a_minute_per_uid(daemon):
    """One peer refused in a loop must not flood the log (and push out the lines
    about everyone else); what was not logged is counted in the next line."""
    for _ in range(25):
        with pytest.raises(DaemonError):
            daemon.request("register", {"segment": "nope"})
    daemon.request("status")            # the replies above came after their log lines
    assert daemon.log().count("refused to register") == 20
    from blocktable_daemon.logs import RateLimit
    r = RateLimit(2, 60.0)
    assert [r.hit(7, now=t) for t in (0, 1, 2, 3)] == [0, 0, None, None]
    assert r.hit(8, now=4) == 0                 # per key
    assert r.hit(7, now=61) == 2 and r.hit(7, now=62) == 0


@pytest.mark.parametrize("how", ["option", "systemd"])
def test_structured_journal_fields(how):
    """Under systemd (JOURNAL_STREAM naming btd's stderr, journald's socket
    present) or with --log-target journal, btd logs in journald's native
    protocol with SEGMENT, CLIENT_ID, PEER_PID, PEER_UID and BT_EVENT. The
    journal socket is a datagram socket of the test (BT_JOURNAL_SOCKET)."""
    tmp = tempfile.mkdtemp(prefix="btj")   # short: a socket path holds 108 bytes
    jpath = os.path.join(tmp, "journal.sock")
    jsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    jsock.bind(jpath)
    jsock.settimeout(0.05)
    d = DaemonProcess(tmp, sizes=SMALL,
                      args=["--log-target", "journal"] if how == "option" else [])
    env = {"BT_JOURNAL_SOCKET": jpath}
    if how == "systemd":
        open(d.log_path, "ab").close()  # btd's stderr: JOURNAL_STREAM names it
        st = os.stat(d.log_path)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    try:
        d.start(extra_env=env)
        pid, slot = _refuse_and_close(d)
        got = []

        def closed():
            got.extend(journal_entries(jsock))
            return [e for e in got if e.get("BT_EVENT") == "client_closed"]
        [close] = wait_for(closed, 10, "the clean close in the journal", interval=0.01)
        assert (close["SEGMENT"], close["CLIENT_ID"], close["PEER_PID"]) == \
            (d.segment, str(slot), str(pid)), close
        assert close["PRIORITY"] == "6" and close["SYSLOG_IDENTIFIER"] == "btd"
        assert "closed cleanly" in close["MESSAGE"]
        [refused] = [e for e in got if e.get("BT_EVENT") == "registration_refused"]
        assert (refused["SEGMENT"], refused["PEER_PID"], refused["PEER_UID"]) == \
            ("nope", str(os.getpid()), str(os.getuid())), refused
        assert refused["PRIORITY"] == "4" and "no segment 'nope'" in refused["MESSAGE"]
        [reg] = [e for e in got if e.get("BT_EVENT") == "registered"]
        assert (reg["CLIENT_ID"], reg["PEER_PID"]) == (str(slot), str(pid)), reg
        assert any("serving" in e["MESSAGE"] for e in got)
        # nothing went to stderr but what python itself may print
        assert "closed cleanly" not in d.log() and "refused" not in d.log()
    finally:
        d.cleanup()
        jsock.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_hup_reloads_config(tmp_path):
    cfgfile = tmp_path / "btd.toml"
    name = unique_name()
    cfgfile.write_text(f'log_level = "info"\n[segments.{name}]\nblocks_per_pool = 512\n')
    d = DaemonProcess(tmp_path, segment=name, args=["--config", str(cfgfile)])
    d.start()
    second = unique_name()
    try:
        cfgfile.write_text(f'log_level = "debug"\nallow_uids = [4242]\n'
                           f'[segments.{name}]\nblocks_per_pool = 512\n'
                           f'[segments.{second}]\nblocks_per_pool = 256\n')
        d.proc.send_signal(signal.SIGHUP)
        d.wait_notice("RELOADING=1")
        d.wait_notice("READY=1")
        names = [s["name"] for s in d.request("status")["segments"]]
        assert names == [name, second]
        assert "allow_uids" in d.log() and "log_level" in d.log()
        # A broken file keeps the running config.
        cfgfile.write_text("this is not toml ===")
        r = d.request("reload")
        assert "error" in r and d.request("status")["pid"] == d.pid
    finally:
        d.cleanup()
        unlink_quietly(second)


# ---- registration, several processes, recovery ------------------------------------------------
CLIENT = """
import os, sys, time
from blocktable.connect import connect
cl = connect(sys.argv[1], socket=sys.argv[2])
row = cl.claim_row(key=os.getpid())
ids = cl.alloc_append(row, 4)
loose = cl.alloc(3)
print(cl.id, row, flush=True)
sys.stdin.readline()           # hold everything until told
if sys.argv[3] == "close":
    cl.close()
    print("closed", flush=True)
    sys.stdin.readline()
"""


def spawn_client(d, mode="close"):
    p = python_child(CLIENT, d.segment, d.socket, mode)
    slot, row = map(int, p.stdout.readline().split())
    return p, slot, row


def test_attach_from_several_processes_and_recover(daemon):
    seg = Segment.attach(daemon.segment)
    procs = [spawn_client(daemon) for _ in range(4)]
    assert len({slot for _, slot, _ in procs}) == 4
    clients = daemon.request("clients")["clients"]
    assert sorted(c["pid"] for c in clients) == sorted(p.pid for p, _, _ in procs)
    assert all(c["watched"] and c["state"] == "active" for c in clients)
    assert seg.free_blocks() == SMALL["blocks_per_pool"] - 1 - 4 * 7
    # One closes cleanly, one is killed; the others keep their rows.
    p0, s0, r0 = procs[0]
    p0.stdin.write("\n")
    p0.stdin.flush()
    assert p0.stdout.readline().strip() == "closed"
    p1, s1, r1 = procs[1]
    p1.kill()
    p1.wait()
    wait_for(lambda: slot_state(seg, s1) == 0, 10, "the killed client's slot to be freed")
    assert seg.row_info(r1).owner == 0
    for p, slot, row in procs[2:]:
        assert seg.row_info(row).owner == slot and seg.row_info(row).num_blocks == 4
    wait_for(lambda: daemon.request("stats")["recoveries_total"] == 1, 10, "the recovery count")
    st = daemon.request("stats")
    # Killed outside a call: released lock-free, nobody paused; no zero-length
    # pause is counted among the pauses.
    assert st["latency_ms"]["n"] == 1 and st["pause_ms"]["n"] == 0, st
    rep = seg.check()
    assert rep.clean and rep.blocks_held == 2 * 7
    for p, _, _ in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    wait_for(lambda: seg.free_blocks() == SMALL["blocks_per_pool"] - 1, 10, "every block free")
    seg.close()


def test_unregistered_clients_are_watched_too(daemon):
    """A client that opened its slot without btd is found by the slot scan and
    recovered when it dies (no pidfd from registration)."""
    code = ("import sys,os; from blocktable import Segment; s=Segment.attach(sys.argv[1]);"
            "c=s.client(); r=c.claim_row(); c.alloc_append(r,5); print(c.id, flush=True);"
            "sys.stdin.readline()")
    p = python_child(code, daemon.segment)
    slot = int(p.stdout.readline())
    wait_for(lambda: any(c["slot"] == slot and c["watched"]
                         for c in daemon.request("clients")["clients"]), 10, "the scan to watch it")
    seg = Segment.attach(daemon.segment)
    p.kill()
    p.wait()
    recovered_then_close(seg, slot, "its slot to be freed")


def test_zombie_is_recovered_without_waiting_for_the_reap(daemon):
    """An exited but unreaped process (a zombie) is dead to libbt: its
    holdings come back while its parent has not reaped it yet."""
    seg = Segment.attach(daemon.segment)
    p, slot, _ = spawn_client(daemon)
    os.kill(p.pid, signal.SIGKILL)
    wait_for(lambda: open(f"/proc/{p.pid}/stat").read().split(") ")[1][0] == "Z", 10, "a zombie")
    wait_for(lambda: slot_state(seg, slot) == 0, 10, "recovery of the zombie")
    p.wait()
    seg.close()


def test_adopt_existing_segment_with_live_client(tmp_path):
    """A daemon restart: the segment and a client's holdings survive; the new
    btd adopts, checks, and recovers the client when it dies."""
    d = DaemonProcess(tmp_path, sizes=SMALL).start()
    try:
        p, slot, row = spawn_client(d, mode="hold")
        d.kill()
        d.start()
        assert "adopted" in d.log()
        s = d.request("status")["segments"][0]
        assert s["created"] is False and s["clients"]["active"] == 1
        seg = Segment.attach(d.segment)
        assert seg.row_info(row).owner == slot and seg.row_info(row).num_blocks == 4
        wait_for(lambda: any(c["watched"] for c in d.request("clients")["clients"]), 10,
                 "the new daemon to watch the old client")
        p.kill()
        p.wait()
        recovered_then_close(seg, slot, "recovery by the new daemon")
    finally:
        d.cleanup()


def test_client_dead_while_daemon_down_is_recovered_at_adoption(tmp_path):
    d = DaemonProcess(tmp_path, sizes=SMALL).start()
    try:
        seg = Segment.attach(d.segment)
        p, slot, _ = spawn_client(d, mode="hold")
        d.kill()
        p.kill()
        p.wait()
        assert slot_state(seg, slot) == lib_active()
        d.start()
        recovered_then_close(seg, slot, "recovery at adoption")
    finally:
        d.cleanup()


def lib_active():
    return blocktable.lib.BT_CLIENT_ACTIVE


def test_register_unknown_segment_and_connect_without_daemon(daemon, tmp_path):
    with pytest.raises(DaemonError) as e:
        request("register", {"segment": "no-such-segment"}, socket=daemon.socket)
    assert e.value.name == "ENOENT"
    with pytest.raises(DaemonNotRunning):
        connect(daemon.segment, socket=str(tmp_path / "nobody.sock"))


def test_out_of_client_slots_is_an_error_reply(tmp_path):
    d = DaemonProcess(tmp_path, sizes={**SMALL, "max_clients": 2}).start()
    try:
        got = [request("register", {}, socket=d.socket) for _ in range(2)]
        assert sorted(g["slot"] for g in got) == [1, 2]
        with pytest.raises(DaemonError) as e:
            request("register", {}, socket=d.socket)
        assert e.value.name == "BT_ENOCLIENTS"
        # Our own pid holds two reserved slots; they go when we... are still
        # alive: a reservation of a live process stays. Free them by hand.
        seg = Segment.attach(d.segment)
        for g in got:
            assert seg.client_slot(g["slot"]).state == 3          # reserved
            seg.adopt_client(g["slot"]).close()
        seg.close()
    finally:
        d.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_other_uid_refused_unless_allowed(tmp_path):
    # Import first: the interpreter's own files may not be readable by nobody.
    code = ("import os,sys,json; from blocktable.connect import request, DaemonError\n"
            "os.setgid(65534); os.setgroups([]); os.setuid(65534)\n"
            "try:\n print(request('register', {}, socket=sys.argv[1])['slot'])\n"
            "except DaemonError as e:\n print(e.name)")
    for allow, want in (([], "EPERM"), (["--allow-uid", "65534"], "1")):
        top = tempfile.mkdtemp(prefix="btd-uid-")     # pytest's tmp_path is 0700
        os.chmod(top, 0o755)
        d = DaemonProcess(top, args=allow, sizes=SMALL).start()
        try:
            os.chown(d.socket, 0, 65534)               # let nobody's group reach the socket
            r = child(code, d.socket)
            assert r.stdout.strip() == want, r.stderr
        finally:
            d.cleanup()
            shutil.rmtree(top, ignore_errors=True)


# ---- the socket survives anything ---------------------------------------------------------
def raw(d, payload, read=True):
    """Send payload to d's socket; its replies, one per line it ended with (read=False:
    hang up without reading)."""
    want = payload.count(b"\n") if payload.endswith(b"\n") else None
    return socket_lines(d.socket, payload, want if read else 0)


@pytest.mark.parametrize("line,name", [
    (b"garbage\n", "EPARSE"),
    (b"\xff\xfe\n", "EPARSE"),
    (b"[1,2]\n", "EREQUEST"),
    (b'"status"\n', "EREQUEST"),
    (b'{"id":1}\n', "EREQUEST"),
    (b'{"id":[1],"cmd":"status"}\n', "EREQUEST"),
    (b'{"id":2,"cmd":"nope"}\n', "ENOCMD"),
    (b'{"id":3,"cmd":"status","args":[1]}\n', "EARGS"),
    (b'{"id":4,"cmd":"row","args":{"row":"7"}}\n', "EARGS"),
    (b'{"id":5,"cmd":"row","args":{}}\n', "EARGS"),
    (b'{"id":6,"cmd":"fsck","args":{"repair":1}}\n', "EARGS"),
    (b'{"id":7,"cmd":"rows","args":{"owner":true}}\n', "EARGS"),
    (b'{"id":8,"cmd":"clients","args":{"bogus":1}}\n', "EARGS"),
    (b'{"id":9,"cmd":"row","args":{"row":99999}}\n', "ENOENT"),
    (b'{"id":10,"cmd":"row","args":{"row":1,"segment":"x"}}\n', "ENOENT"),
    (b'{"id":11,"cmd":"row","args":{"row":-1}}\n', "ENOENT"),
    (b'{"id":12,"cmd":"register","args":{"segment":7}}\n', "EARGS"),
])
def test_malformed_requests_get_error_replies(daemon, line, name):
    [reply] = raw(daemon, line)
    assert reply["status"] == "error" and reply["error"]["name"] == name, reply
    assert isinstance(reply["error"]["code"], int) and reply["error"]["message"]
    if b'"id":' in line and name != "EREQUEST":
        assert reply["id"] == json.loads(line)["id"]
    assert daemon.request("status")["pid"] == daemon.pid


def test_huge_line_closes_connection_daemon_survives(daemon):
    replies = raw(daemon, b'{"id":1,"cmd":"status","args":{"x":"' + b"a" * (protocol.MAX_LINE + 10))
    assert [r["error"]["name"] for r in replies] == ["ETOOBIG"]
    replies = raw(daemon, b"x" * (3 * protocol.MAX_LINE) + b"\n")
    assert [r["error"]["name"] for r in replies] == ["ETOOBIG"]
    assert daemon.request("status")["pid"] == daemon.pid


def test_pipelined_requests_and_abrupt_disconnects(daemon):
    lines = b"".join(b'{"id":%d,"cmd":"status"}\n' % i for i in range(50))
    replies = raw(daemon, lines + b'{"id":"last","cmd":"pools"}\n')
    assert [r["id"] for r in replies] == list(range(50)) + ["last"]
    for payload in (b"", b'{"id":1,"cmd":"sta', b'{"id":1,"cmd":"status"}\n' * 100):
        raw(daemon, payload, read=False)                       # hang up mid-way
    # A last request without a newline, then EOF from our side, is answered.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket)
    s.sendall(b'{"id":"eof","cmd":"status"}')
    s.shutdown(socket.SHUT_WR)
    s.settimeout(10)
    data = b""
    while not data.endswith(b"\n"):
        data += s.recv(1 << 16)
    assert json.loads(data)["id"] == "eof"
    s.close()
    many = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(100)]
    for s in many:
        s.connect(daemon.socket)
    for s in many:
        s.close()
    assert daemon.request("status")["pid"] == daemon.pid


def test_fsck_repair_over_socket(daemon):
    r = daemon.request("fsck", {"repair": True})
    assert r["ok"] and r["segments"][0]["repaired"]
    r = daemon.request("fsck", {})
    assert r["ok"] and r["segments"][0]["report"]["blocks_free"] == SMALL["blocks_per_pool"] - 1


def metrics_daemon(tmp_path):
    """A started btd serving SMALL with its metrics on a free local port: (daemon, port)."""
    port = free_port()
    d = DaemonProcess(tmp_path, args=["--metrics", f"127.0.0.1:{port}"], sizes=SMALL)
    return d.start(), port


def test_metrics_endpoint(tmp_path):
    import urllib.request
    d, port = metrics_daemon(tmp_path)
    try:
        p, slot, _ = spawn_client(d, mode="hold")
        p.kill()
        p.wait()
        wait_for(lambda: d.request("stats")["recoveries_total"] == 1, 10, "a recovery")

        def scrape():
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            text = body.decode()
            return text if "blocktable_recoveries_total{" in text else None
        text = wait_for(scrape, 10, "the metrics to show the recovery", interval=0.1)
        seg = d.segment
        assert f'blocktable_blocks_free{{pool="0",segment="{seg}"}} 1023.0' in text
        assert f'blocktable_blocks_used{{pool="0",segment="{seg}"}} 0.0' in text
        assert f'blocktable_rows_used{{segment="{seg}"}}' in text
        assert f'blocktable_clients{{segment="{seg}",state="active"}}' in text
        assert "blocktable_recovery_latency_seconds_bucket" in text
        assert f'blocktable_recoveries_total{{kind="lockfree",segment="{seg}"}} 1.0' in text
        assert f'blocktable_requests_total{{cmd="register",segment="{seg}"}} 1.0' in text
        assert f'blocktable_registrations_total{{segment="{seg}"}} 1.0' in text
    finally:
        d.cleanup()


# ---- configuration --------------------------------------------------------------------------
def load(argv, tmp_path=None, toml=None):
    if toml is not None:
        f = tmp_path / "c.toml"
        f.write_text(toml)
        argv = ["--config", str(f), *argv]
    return btd_config.load(parse_args(argv))


def test_config_defaults_and_flags(tmp_path):
    c = load([])
    assert list(c.segments) == ["default"]
    assert c.segments["default"] == SegmentConfig()
    c = load(["--segment", "a", "--segment", "b", "--blocks-per-pool", "4096",
              "--socket-mode", "0600", "--metrics", ":9999"])
    assert list(c.segments) == ["a", "b"] and c.segments["b"].blocks_per_pool == 4096
    assert c.socket_mode == 0o600
    assert btd_config.parse_metrics(c.metrics) == ("127.0.0.1", 9999)
    assert btd_config.parse_metrics("[::1]:80") == ("::1", 80)


def test_config_file(tmp_path):
    c = load([], tmp_path, 'socket = "/x/y.sock"\nallow_uids = [5]\nallow_groups = [0]\n'
                           '[segments.one]\nnum_pools = 2\n[segments.two]\n')
    assert list(c.segments) == ["one", "two"] and c.segments["one"].num_pools == 2
    assert c.socket == "/x/y.sock" and c.allow_uids == (5,) and c.allow_groups == (0,)


@pytest.mark.parametrize("toml,flags,msg", [
    ("bogus = 1\n", [], "unknown key"),
    ("[segments.a]\nblock_sise = 16\n", [], "unknown keys"),
    ("[segments.a]\nblock_size = 0\n", [], "block_size"),
    ("[segments.a]\nnum_rows = -1\n", [], "num_rows"),
    ('socket_mode = "0666"\n', [], "0660 or stricter"),
    ('allow_groups = ["no-such-group-xyz"]\n', [], "no group"),
    ("", ["--segment", "a/b"], "without '/'"),
    ("", ["--segment", "x" * 49], "longer than 48"),
    ("", ["--segment", "a b"], "without '/' or spaces"),
    ("", ["--metrics", "host:notaport"], "HOST:PORT"),
    ("this is = = not toml", [], "c.toml"),
])
def test_config_errors(tmp_path, toml, flags, msg):
    with pytest.raises(btd_config.ConfigError, match=msg):
        load(flags, tmp_path, toml)


def test_bad_config_exits_2_and_print_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "blocktable_daemon.server", "--segment", "../x"],
                       env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "segment name" in r.stderr
    r = subprocess.run([sys.executable, "-m", "blocktable_daemon.server", "--print-config", "--num-rows", "8"],
                       env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    seg = json.loads(r.stdout)["segments"]["default"]
    assert seg["num_rows"] == 8
    assert seg["size_bytes"] == SegmentConfig(num_rows=8).size      # bt_config_size


# ---- create: a segment asked for by an engine -------------------------------------------
CREATE_CLIENT = """
import json, os, sys
from blocktable.connect import connect
cl = connect(sys.argv[1], socket=sys.argv[2], create=json.loads(sys.argv[3]))
row = cl.claim_row(key=os.getpid())
cl.alloc_append(row, 5)
print(cl.id, row, cl.segment.config.blocks_per_pool, flush=True)
sys.stdin.readline()
"""


def test_create_serves_a_new_segment_like_a_configured_one(daemon):
    """connect(create=...) makes btd create the segment; it is then registered into,
    watched, recovered, listed, and its leftovers found by fsck, as a configured one."""
    name = unique_name("cr")
    ask = {"blocks_per_pool": 200, "num_rows": 8, "row_width": 8, "block_size": 32}
    try:
        p = python_child(CREATE_CLIENT, name, daemon.socket, json.dumps(ask))
        slot, row, bpp = map(int, p.stdout.readline().split())
        assert bpp == 200
        st = {s["name"]: s for s in daemon.request("status")["segments"]}
        assert st[name]["created"] is True and st[name]["origin"] == "create"
        assert st[daemon.segment]["origin"] == "config"
        assert st[name]["config"]["block_size"] == 32 and st[name]["blocks_used"] == 5
        clients = daemon.request("clients", {"segment": name})["clients"]
        assert [(c["slot"], c["pid"], c["watched"]) for c in clients] == [(slot, p.pid, True)]
        rows = daemon.ctl_json("rows", "--segment", name)["rows"]
        assert [(r["row"], r["pid"], r["num_blocks"]) for r in rows] == [(row, p.pid, 5)]
        # asking again: served as it is (created false), smaller asks are fine
        again = daemon.request("create", {"segment": name, "config": {"blocks_per_pool": 100}})
        assert again["created"] is False and again["config"]["blocks_per_pool"] == 200
        # the engine dies: btd recovers its blocks in the created segment
        p.kill()
        p.wait()
        seg = Segment.attach(name)
        try:
            wait_for(lambda: slot_state(seg, slot) == 0, 10, "recovery in the created segment")
            rep = seg.check()
            assert rep.clean and rep.blocks_held == 0 and seg.free_blocks() == 199
        finally:
            seg.close()
        assert daemon.request("stats")["recoveries"].get(f"{name}:lockfree", 0) + \
            daemon.request("stats")["recoveries"].get(f"{name}:repair", 0) == 1
        fs = daemon.ctl_json("fsck", "--segment", name)
        assert fs["ok"] is True
        # a reload keeps serving it and does not warn that it is gone from the config
        daemon.request("reload")
        assert name in {s["name"] for s in daemon.request("status")["segments"]}
        assert f"segments ['{name}'] stay served" not in daemon.log()
    finally:
        unlink_quietly(name)


@pytest.mark.parametrize("ask, bad", [
    ({"blocks_per_pool": 400}, "blocks_per_pool"),
    ({"num_rows": 64}, "num_rows"),
    ({"row_width": 32}, "row_width"),
    ({"block_size": 32}, "block_size"),
    ({"cache_pools": 1}, "cache_pools"),
])
def test_create_on_a_too_small_segment_names_both_sizes(daemon, ask, bad):
    name = unique_name("cs")
    base = {"blocks_per_pool": 300, "num_rows": 16, "row_width": 16, "block_size": 16,
            "cache_pools": 0}
    try:
        r = daemon.request("create", {"segment": name, "config": base})
        assert r["created"] is True
        with pytest.raises(DaemonError) as e:
            connect(name, socket=daemon.socket, create={**base, **ask})
        assert e.value.name == "BT_ECONFIG"
        msg = e.value.message
        assert repr(name) in msg and bad in msg
        have = f"{bad}={base[bad]}"
        need = f"{bad}={ask[bad]}"
        assert have in msg.split("the engine needs")[0] and need in msg.split("the engine needs")[1]
        # nothing changed, and nobody was registered
        assert daemon.request("create", {"segment": name, "config": base})["created"] is False
        assert daemon.request("clients", {"segment": name})["clients"] == []
    finally:
        unlink_quietly(name)


@pytest.mark.parametrize("args, name", [
    ({"config": {"blocks_per_pool": 64}}, "EARGS"),                  # no segment
    ({"segment": "x", "config": 5}, "EARGS"),                         # config not an object
    ({"segment": "x", "config": {"no_such_field": 1}}, "BT_ECONFIG"),
    ({"segment": "x", "config": {"blocks_per_pool": -1}}, "BT_ECONFIG"),
    ({"segment": "bad/name", "config": {}}, "BT_ECONFIG"),
])
def test_create_refuses_bad_requests(daemon, args, name):
    with pytest.raises(DaemonError) as e:
        daemon.request("create", args)
    assert e.value.name == name
    served = {s["name"] for s in daemon.request("status")["segments"]}
    assert served == {daemon.segment}


# ---- cache pools (an engine's BlockPool): bt-ctl pools and the metrics ---------------------
CACHE_CLIENT = """
import json, os, sys
from blocktable.connect import connect
cl = connect(sys.argv[1], socket=sys.argv[2], create=json.loads(sys.argv[3]))
cp = cl.cache_pool(0)
ids = cp.alloc(6)                           # (the null block, id 0, is never queued)
for i, b in enumerate(ids[:4]):
    cp.insert(int(b), b"key-%d" % i, 16)
cp.free(ids[:4], caching=True)              # 4 cached (free, with keys)
assert cp.lookup(b"key-1") is not None and cp.lookup(b"nope") is None
print(cl.id, flush=True)
sys.stdin.readline()
"""


def test_cache_pool_view_metrics_and_reset_when_its_engine_dies(tmp_path):
    d, port = metrics_daemon(tmp_path)
    name = unique_name("cp")
    ask = {"blocks_per_pool": 64, "num_rows": 8, "row_width": 8, "cache_pools": 1}
    try:
        p = python_child(CACHE_CLIENT, name, d.socket, json.dumps(ask))
        slot = int(p.stdout.readline())
        [pool] = d.request("pools", {"segment": name})["pools"]
        # 63 blocks besides the null block: 2 held (6 - 4 freed), 4 cached, 57 free
        assert (pool["kind"], pool["blocks"], pool["used"], pool["cached"], pool["free"]) == \
            ("cache", 63, 2, 4, 57), pool
        assert pool["owner_pid"] == p.pid and pool["keys"] == 4
        assert pool["cache"]["queries"] == 2 and pool["cache"]["hits"] == 1
        assert pool["cache"]["stored"] == 4
        text = d.ctl("pools", "--segment", name).stdout
        head, row = text.splitlines()
        assert head.split() == ["SEGMENT", "POOL", "KIND", "BLOCKS", "USED", "CACHED", "FREE",
                                "USED%", "ENGINE", "QUERIES", "HITS", "HIT%", "EVICTED"]
        assert row.split() == [name, "0", "cache", "63", "2", "4", "57", "3.2", str(p.pid),
                               "2", "1", "50.0", "0"], text
        st = {x["name"]: x for x in d.request("status")["segments"]}[name]
        assert st["blocks_cached"] == 4 and st["blocks_used"] == 2

        def scrape():
            t = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            t = t.decode()
            return t if f'blocktable_prefix_cache_hits_total{{pool="0",segment="{name}"}}' in t \
                else None
        import urllib.request
        text = wait_for(scrape, 10, "the cache pool in the metrics", interval=0.1)
        lab = f'{{pool="0",segment="{name}"}}'
        for line in (f"blocktable_prefix_cache_hits_total{lab} 1.0",
                     f"blocktable_prefix_cache_queries_total{lab} 2.0",
                     f"blocktable_prefix_cache_stored_total{lab} 4.0",
                     f"blocktable_prefix_cache_evicted_total{lab} 0.0",
                     f"blocktable_blocks_cached{lab} 4.0", f"blocktable_blocks_used{lab} 2.0",
                     f"blocktable_blocks_free{lab} 57.0"):
            assert line in text.splitlines(), (line, text[-3000:])
        # the engine dies: its cache entries and blocks go with it
        p.kill()
        p.wait()
        wait_for(lambda: d.request("clients", {"segment": name})["clients"] == [], 10,
                 "recovery of the engine")
        [pool] = d.request("pools", {"segment": name})["pools"]
        assert (pool["used"], pool["cached"], pool["free"], pool["keys"]) == (0, 0, 63, 0), pool
        assert pool["owner_pid"] is None
        assert d.ctl_json("fsck", "--segment", name)["ok"] is True
        # a new engine takes the pool at once
        p = python_child(CACHE_CLIENT, name, d.socket, json.dumps(ask),
                         stderr=subprocess.PIPE)
        line = p.stdout.readline()
        assert line.strip(), p.stderr.read()
        [pool] = d.request("pools", {"segment": name})["pools"]
        assert pool["owner_pid"] == p.pid and pool["cached"] == 4
        p.kill()
        p.wait()
    finally:
        d.cleanup()
        unlink_quietly(name)


def test_a_scribbled_client_state_is_reported_not_fatal(daemon):
    """An attached process that flips a client slot's state word to a value
    no libbt writes (0x80000001) must not crash btd's tick or its replies:
    the slot is counted as invalid and btd keeps serving and recovering."""
    import mmap
    import struct
    cl = blocktable.connect(daemon.segment, socket=daemon.socket)
    try:
        with open(f"/dev/shm/bt.{daemon.segment}", "r+b") as f:
            mem = mmap.mmap(f.fileno(), 0)
        # the client slots' region: off[] in the header (see test_corruption)
        off_at = 32 + blocktable.ffi.sizeof("bt_config")
        clients = struct.unpack_from("<Q", mem, off_at + 8 * 8)[0]   # 9th region: clients
        slot = clients + (cl.id - 1) * 128
        assert struct.unpack_from("<I", mem, slot)[0] == 1          # active: the right place
        struct.pack_into("<I", mem, slot, 0x80000001)
        t0 = daemon.request("status")["uptime_s"]
        # two ticks of btd's own clock after the scribble, each publishing a summary
        wait_for(lambda: daemon.request("status")["uptime_s"] > t0 + 1.2, timeout=20,
                 what="two btd ticks after the scribble")
        assert daemon.proc.poll() is None, daemon.log()
        segs = daemon.request("status")["segments"]
        [s] = [x for x in segs if x["name"] == daemon.segment]
        assert s["clients"].get("invalid") == 1, s["clients"]
        rows = {r["slot"]: r for r in daemon.request("clients")["clients"]}
        assert rows[cl.id]["state"] == "invalid(0x80000001)", rows[cl.id]
        struct.pack_into("<I", mem, slot, 1)                         # put it back
        mem.close()
    finally:
        cl.close()
