"""Who may attach and who may command the daemon (issue 6, SECURITY.md).

* Segments are created 0600, 0660 with group=True, whatever the umask:
  checked with stat on /dev/shm.
* Another uid -- a real user and group this test creates with useradd /
  groupadd (root only; skipped cleanly elsewhere) -- cannot attach a 0600
  segment, nor a 0660 one outside its group (PermissionError saying so), and
  cannot unlink or replace it; in the segment's group it can.
* The same user cannot command btd: outside the socket's group it cannot
  even connect (PermissionError); inside it, every command is refused by
  SO_PEERCRED with EPERM and a message naming its uid, while btd keeps
  serving root; --allow-uid lets it register.
* Names: segment names are validated (no '/', printable ASCII, 1..48 bytes)
  by libbt, the bindings and btd; socket paths too long for AF_UNIX are
  refused; impossible sizes are refused before anything exists.
* The daemon's request size limit: a line of exactly MAX_LINE bytes is
  answered, one byte more gets ETOOBIG and the connection is closed.

The daemon runs as in tests/test_daemon.py (blocktable_daemon.testing.DaemonProcess).
"""
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

import blocktable as bt

from blocktable_daemon import protocol
from blocktable_daemon.testing import DaemonProcess, child_env, unique_name

from conftest import socket_lines

CFG = bt.SegmentConfig(num_pools=1, blocks_per_pool=64, num_rows=4, row_width=4,
                       max_clients=8, hand_size=16)
SIZES = {"blocks_per_pool": 64, "num_rows": 4, "row_width": 4, "max_clients": 8,
         "hand_size": 16}


def shm_stat(name):
    st = os.stat(f"/dev/shm/bt.{name}")
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o022])
@pytest.mark.parametrize("group,mode", [(False, 0o600), (True, 0o660)])
def test_segment_mode_whatever_the_umask(shm_name, umask, group, mode):
    old = os.umask(umask)
    try:
        seg = bt.Segment.create(shm_name, CFG, group=group)
    finally:
        os.umask(old)
    try:
        assert shm_stat(shm_name) == (mode, os.geteuid(), os.getegid())
    finally:
        seg.close()


# ---- a second user, for real ----------------------------------------------------------
class OtherUser:
    """A user and a group made for this test (useradd / groupadd), removed
    after. Code runs as that user in a child that imports blocktable as
    root first (the interpreter's files need not be readable by the new
    user), then drops to its uid, gid and groups: what the kernel checks
    from then on is the new user's credentials."""

    def __init__(self):
        tag = secrets.token_hex(3)
        self.name, self.group = f"bt-u{tag}", f"bt-g{tag}"
        run = lambda *a: subprocess.run(a, capture_output=True, text=True, timeout=60)  # noqa: E731
        r = run("groupadd", self.group)
        if r.returncode:
            pytest.skip(f"groupadd failed: {r.stderr.strip()}")
        r = run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                "--no-user-group", "--gid", self.group, self.name)
        if r.returncode:
            run("groupdel", self.group)
            pytest.skip(f"useradd failed: {r.stderr.strip()}")
        import grp
        import pwd
        self.uid = pwd.getpwnam(self.name).pw_uid
        self.gid = grp.getgrnam(self.group).gr_gid

    def remove(self):
        subprocess.run(["userdel", self.name], capture_output=True, timeout=60)
        subprocess.run(["groupdel", self.group], capture_output=True, timeout=60)

    def run(self, code, *args, groups=(), timeout=60):
        """Run `code` as this user; its JSON output (one line) or a failure."""
        prelude = ("import json, os, sys\nimport blocktable as bt\n"
                   "from blocktable.connect import request, DaemonError\n"
                   f"os.setgroups({list(groups)!r}); os.setgid({self.gid}); os.setuid({self.uid})\n"
                   "assert os.geteuid() != 0\n"
                   "def out(v): print(json.dumps(v))\n")
        r = subprocess.run([sys.executable, "-c", prelude + code, *map(str, args)],
                           env=child_env(), capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"as {self.name}: exit {r.returncode}\n{r.stderr}"
        return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def other():
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user (CI runs as root)")
    if not (shutil.which("useradd") and shutil.which("groupadd")):
        pytest.skip("no useradd / groupadd here")
    u = OtherUser()
    yield u
    u.remove()


ATTACH = """
try:
    s = bt.Segment.attach(sys.argv[1])
    c = s.client()
    ids = c.alloc(2)
    c.release(ids)
    out({"ok": True, "free": s.free_blocks(0)})
except bt.BtError as e:
    out({"error": type(e).__name__, "perm": isinstance(e, PermissionError), "msg": str(e)})
"""

UNLINK_OR_REPLACE = """
res = {}
for what, fn in (("unlink", lambda: bt.Segment.unlink(sys.argv[1])),
                 ("replace", lambda: bt.Segment.create(sys.argv[1], exclusive=True))):
    try:
        fn()
        res[what] = "done"
    except bt.BtError as e:
        res[what] = type(e).__name__
out(res)
"""


def test_other_user_cannot_attach_a_private_segment(other, shm_name):
    with bt.Segment.create(shm_name, CFG) as seg:
        assert shm_stat(shm_name)[0] == 0o600
        got = other.run(ATTACH, shm_name)
        assert got.get("perm") is True, got
        assert "Permission denied" in got["msg"] and shm_name in got["msg"], got
        got = other.run(UNLINK_OR_REPLACE, shm_name)    # /dev/shm is sticky
        assert got == {"unlink": "BtPermissionError", "replace": "BtFileExistsError"}, got
        assert seg.check().clean and seg.free_blocks(0) == CFG.blocks_per_pool - 1


def test_group_segment_admits_its_group_only(other, shm_name):
    with bt.Segment.create(shm_name, CFG, group=True) as seg:
        assert shm_stat(shm_name)[0] == 0o660
        got = other.run(ATTACH, shm_name)               # not in root's group
        assert got.get("perm") is True, got
        os.chown(f"/dev/shm/bt.{shm_name}", -1, other.gid)
        got = other.run(ATTACH, shm_name)               # in the segment's group now
        assert got == {"ok": True, "free": CFG.blocks_per_pool - 1}, got
        assert seg.check().clean


COMMAND = """
res = {}
for cmd, args in (("status", {}), ("register", {}), ("fsck", {"repair": True})):
    try:
        request(cmd, args, socket=sys.argv[1], timeout=10)
        res[cmd] = "served"
    except DaemonError as e:
        res[cmd] = [e.name, e.message]
    except OSError as e:
        res[cmd] = [type(e).__name__, str(e)]
out(res)
"""


@pytest.fixture
def daemon_dir():
    top = tempfile.mkdtemp(prefix="btd-perm-")      # pytest's tmp_path is 0700
    os.chmod(top, 0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_other_user_cannot_command_the_daemon(other, daemon_dir):
    d = DaemonProcess(daemon_dir, sizes=SIZES).start()
    try:
        st = os.stat(d.socket)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == os.geteuid()
        # outside the socket's group: the file mode stops it at connect
        got = other.run(COMMAND, d.socket)
        assert all(v[0] == "PermissionError" for v in got.values()), got
        # in the socket's group: SO_PEERCRED stops it, and says why
        os.chown(d.socket, -1, other.gid)
        got = other.run(COMMAND, d.socket)
        for cmd, (name, msg) in got.items():
            assert name == "EPERM" and f"uid {other.uid}" in msg, (cmd, name, msg)
        assert d.request("status")["pid"] == d.pid          # still serving root
        assert "EPERM" in json.dumps(d.request("stats"))
    finally:
        d.cleanup()


def test_allowed_uid_registers_and_needs_the_segment_group_too(other, daemon_dir):
    d = DaemonProcess(daemon_dir, args=["--allow-uid", str(other.uid)], sizes=SIZES).start()
    code = """
try:
    c = bt.connect(sys.argv[2], socket=sys.argv[1])
    out({"slot": c.id, "free": c.segment.free_blocks(0)})
except DaemonError as e:
    out({"daemon": e.name})
except bt.BtError as e:
    out({"attach": type(e).__name__})
"""
    try:
        os.chown(d.socket, -1, other.gid)
        assert shm_stat(d.segment)[0] == 0o660          # btd: group bits as the socket's
        # registered, but the segment is root's group: attach is refused
        assert other.run(code, d.socket, d.segment) == {"attach": "BtPermissionError"}
        os.chown(f"/dev/shm/bt.{d.segment}", -1, other.gid)
        got = other.run(code, d.socket, d.segment)
        assert "slot" in got and got["free"] == SIZES["blocks_per_pool"] - 1, got
    finally:
        d.cleanup()


# ---- names ------------------------------------------------------------------------------------
BAD_NAMES = ["", "/", "a/b", "/abs", ".", "..", "x" * 49, "sp ace", "tab\t", "new\nline",
             "caf\u00e9", "nul\x00", "\x7f"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_segment_names_refused_everywhere(name):
    for fn in (lambda: bt.Segment.create(name, CFG), lambda: bt.Segment.attach(name),
               lambda: bt.Segment.unlink(name)):
        with pytest.raises(bt.BadName):
            fn()
    from blocktable_daemon.config import ConfigError, check_name
    with pytest.raises(ConfigError):
        check_name(name)


def test_name_length_bound_is_48_bytes():
    ok = "n" * 40 + secrets.token_hex(4)
    assert len(ok) == 48
    with bt.Segment.create(ok, CFG) as seg:
        assert seg.name == ok
    bt.Segment.unlink(ok)
    with pytest.raises(bt.BadName):
        bt.Segment.create(ok + "x", CFG)
    with pytest.raises(bt.BadName):
        bt.Segment.create(b"bytes-name", CFG)


def btd_exit(args, timeout=30):
    return subprocess.run([sys.executable, "-m", "blocktable_daemon.server", *args], env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_btd_refuses_bad_segment_names_and_impossible_sizes_before_creating(daemon_dir):
    from blocktable_daemon.config import ConfigError, load
    from blocktable_daemon.server import parse_args
    sock = os.path.join(daemon_dir, "btd.sock")
    name = unique_name("perm")
    for args, want in ((["--segment", "a/b"], "segment name"),
                       (["--segment", "x" * 49], "longer than 48"),
                       (["--segment", name, "--num-rows", "0"], "num_rows"),
                       (["--segment", name, "--blocks-per-pool", str(2**31)], "blocks_per_pool"),
                       (["--segment", name, "--row-width", str(2**22), "--num-rows", str(2**22)],
                        "16 GiB")):
        with pytest.raises(ConfigError, match=want):
            load(parse_args(["--socket", sock, *args]))
    r = btd_exit(["--socket", sock, "--segment", name, "--num-rows", "0"])
    assert r.returncode == 2 and "num_rows" in r.stderr, (r.returncode, r.stderr)
    assert not os.path.exists(f"/dev/shm/bt.{name}") and not os.path.exists(sock)


def test_btd_refuses_a_socket_path_too_long(daemon_dir):
    sock = os.path.join(daemon_dir, "s" * 120 + ".sock")    # AF_UNIX: 107 bytes at most
    name = unique_name("perm")
    try:
        r = btd_exit(["--socket", sock, "--segment", name, *sum(
            (["--" + k.replace("_", "-"), str(v)] for k, v in SIZES.items()), [])])
        assert r.returncode != 0 and "too long" in r.stderr, (r.returncode, r.stderr)
        assert not os.path.exists(sock)
    finally:
        leftover = os.path.exists(f"/dev/shm/bt.{name}")
        try:
            bt.Segment.unlink(name)
        except FileNotFoundError:
            pass
    if leftover:
        pytest.xfail("btd creates its segments before it checks the socket path: a refused "
                     "start leaves the new segment behind (reported to the daemon's owner)")


# ---- the daemon's request size limit -------------------------------------------------------
def raw_lines(sock_path, payload, timeout=10):
    """The replies to payload, read until as many whole lines as it has (at least one)."""
    return socket_lines(sock_path, payload, max(payload.count(b"\n"), 1), timeout)


def test_request_size_limit_is_exact(daemon):
    head = b'{"id":1,"cmd":"status","args":{"x":"'
    tail = b'"}}'
    exact = head + b"a" * (protocol.MAX_LINE - len(head) - len(tail)) + tail
    assert len(exact) == protocol.MAX_LINE
    [r] = raw_lines(daemon.socket, exact + b"\n")
    assert r["error"]["name"] == "EARGS" and r["id"] == 1     # read whole, judged by schema
    [r] = raw_lines(daemon.socket, exact[:-1] + b'a"}}\n')
    assert r["error"]["name"] == "ETOOBIG"
    # the reply to an oversized line is the connection's last
    replies = raw_lines(daemon.socket, b"x" * (protocol.MAX_LINE + 1) + b'\n{"id":2,"cmd":"status"}\n')
    assert [x["error"]["name"] for x in replies] == ["ETOOBIG"]
    assert daemon.request("status")["pid"] == daemon.pid


def test_deeply_nested_json_is_a_parse_error(daemon):
    [r] = raw_lines(daemon.socket, b"[" * 30000 + b"]" * 30000 + b"\n")
    assert daemon.request("status")["pid"] == daemon.pid     # alive either way
    assert r["error"]["name"] == "EPARSE", r
