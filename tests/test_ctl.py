"""bt-ctl: every command in both output modes, and its exit codes
(0 ok, 1 error, 2 usage, 3 btd not running)."""
import json
import subprocess
import sys

import pytest

from blocktable import Segment

from blocktable_daemon import commands
from blocktable_daemon.testing import DaemonProcess, child_env

SMALL = {"blocks_per_pool": 512, "num_rows": 16, "row_width": 8, "max_clients": 8,
         "hand_size": 32}

HOLDER = """
import sys
from blocktable.connect import connect
cl = connect(sys.argv[1], socket=sys.argv[2])
r = cl.claim_row(key=77)
cl.alloc_append(r, 5)
print(r, flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A daemon with one client holding a row of 5 blocks."""
    d = DaemonProcess(tmp_path_factory.mktemp("ctl"), sizes=SMALL).start()
    p = subprocess.Popen([sys.executable, "-c", HOLDER, d.segment, d.socket], env=child_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    row = int(p.stdout.readline())
    yield d, p, row
    p.kill()
    p.wait()
    d.cleanup()


def test_every_command_has_rendering():
    assert set(commands.CLI) == {"status", "clients", "pools", "rows", "row", "stats", "fsck",
                                 "reload"}


@pytest.mark.parametrize("argv,expect", [
    (["status"], ["SEGMENT", "socket", "CLIENTS"]),
    (["clients"], ["SLOT", "active"]),
    (["pools"], ["POOL", "USED%", "511"]),
    (["rows"], ["ROW", "managed"]),
    (["stats"], ["registrations", "requests"]),
    (["fsck"], ["clean"]),
])
def test_human_tables(served, argv, expect):
    d, p, row = served
    r = d.ctl(*argv)
    assert r.returncode == 0, r.stderr
    for word in expect:
        assert word in r.stdout, (word, r.stdout)
    header = r.stdout.splitlines()[0]
    assert header == header.rstrip()


def test_tables_are_aligned(served):
    d, p, row = served
    lines = d.ctl("pools").stdout.splitlines()
    assert len({len(x) for x in lines}) == 1                 # numbers right-aligned to the header


def test_json_modes_have_stable_keys(served):
    d, p, row = served
    s = d.ctl_json("status")
    assert {"version", "pid", "socket", "uptime_s", "metrics", "recoveries", "segments"} <= set(s)
    seg = s["segments"][0]
    assert {"name", "shm", "size", "generation", "config", "pools", "blocks_free", "blocks_used",
            "rows_used", "clients", "pending_recoveries", "stuck"} <= set(seg)
    assert seg["blocks_used"] == 5 and seg["rows_used"] == 1
    [c] = d.ctl_json("clients")["clients"]
    assert c["pid"] == p.pid and c["rows"] == 1 and c["state"] == "active"
    [pool] = d.ctl_json("pools")["pools"]
    assert {k: pool[k] for k in ("segment", "pool", "blocks", "free", "used", "cached", "kind",
                                 "cache")} == \
        {"segment": d.segment, "pool": 0, "blocks": 511, "free": 506, "used": 5, "cached": 0,
         "kind": "stack", "cache": None}
    rows = d.ctl_json("rows")
    assert [x["row"] for x in rows["rows"]] == [row] and rows["truncated"] is False
    assert rows["rows"][0]["pid"] == p.pid and rows["rows"][0]["key"] == 77
    assert d.ctl_json("rows", "--owner", str(p.pid))["rows"][0]["row"] == row
    assert d.ctl_json("rows", "--owner", "1")["rows"] == []
    one = d.ctl_json("row", str(row))
    assert one["num_blocks"] == 5 and len(one["blocks"]) == 5 and one["pid"] == p.pid
    st = d.ctl_json("stats")
    assert st["registrations"][d.segment] == 1 and "pause_ms" in st
    f = d.ctl_json("fsck")
    assert f["ok"] and f["segments"][0]["report"]["blocks_held"] == 5
    f = d.ctl_json("fsck", "--repair")
    assert f["ok"] and f["segments"][0]["repaired"]


def test_row_human(served):
    d, p, row = served
    r = d.ctl("row", str(row))
    assert r.returncode == 0 and f"pid {p.pid}" in r.stdout and "blocks   5" in r.stdout


def test_watch_counts(served):
    d, p, row = served
    r = d.ctl("watch", "--count", "2", "--interval", "0.05")
    assert r.returncode == 0 and r.stdout.count("SEGMENT") == 4   # status + clients, twice
    r = d.ctl("--json", "watch", "--count", "2", "--interval", "0.05")
    frames = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(frames) == 2 and frames[0]["clients"][0]["pid"] == p.pid


def test_reload_without_file(served):
    d, p, row = served
    r = d.ctl("reload")
    assert r.returncode == 0 and "changed: nothing" in r.stdout


def test_exit_codes(served, tmp_path):
    d, p, row = served
    r = d.ctl("row", "999")
    assert r.returncode == 1 and "ENOENT" in r.stderr
    r = d.ctl("rows", "--segment", "nope")
    assert r.returncode == 1 and "no segment" in r.stderr
    r = d.ctl("bogus-command")
    assert r.returncode == 2
    r = d.ctl("row")
    assert r.returncode == 2
    r = subprocess.run([sys.executable, "-m", "blocktable_daemon.ctl", "--socket", str(tmp_path / "none.sock"),
                        "status"], env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "not running" in r.stderr
    # $BT_SOCKET picks the daemon when --socket is not given.
    r = subprocess.run([sys.executable, "-m", "blocktable_daemon.ctl", "--json", "status"],
                       env=child_env({"BT_SOCKET": d.socket}), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["socket"] == d.socket


def test_fsck_problems_exit_1(tmp_path):
    """A leaked block (popped from the raw pool, held by nobody) is a problem
    fsck reports with exit code 1; --repair frees it and exits 0."""
    d = DaemonProcess(tmp_path, sizes=SMALL).start()
    try:
        seg = Segment.attach(d.segment)
        seg.pool_pop(0, 3)
        r = d.ctl("fsck")
        assert r.returncode == 1 and "PROBLEMS" in r.stdout and "leaked=3" in r.stdout
        r = d.ctl("fsck", "--repair")
        assert r.returncode == 0 and "repaired" in r.stdout
        assert d.ctl("fsck").returncode == 0
        seg.close()
    finally:
        d.cleanup()


def test_usage_errors_and_version(served):
    """A negative or zero timeout, refresh interval, count or limit is a usage
    error (exit 2) naming the value, not an odd result; --version answers."""
    d, p, row = served
    for argv in (["--timeout", "-1", "status"], ["--timeout", "0", "status"],
                 ["watch", "-n", "-0.5", "--count", "1"], ["watch", "--count", "-2"],
                 ["rows", "--limit", "0"], ["--timeout", "abc", "status"]):
        r = d.ctl(*argv)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert "must be" in r.stderr or "not a number" in r.stderr, (argv, r.stderr)
    r = d.ctl("--version")
    assert r.returncode == 0 and r.stdout.startswith("bt-ctl (blocktable) "), r
    assert "exit codes" in d.ctl("--help").stdout


def test_stats_without_recoveries_says_so(served):
    d, p, row = served
    r = d.ctl("stats")
    assert r.returncode == 0 and "None" not in r.stdout, r.stdout


def test_row_kinds():
    """Paged rows are shown as paged (they were shown as managed)."""
    assert commands.row_kind(0) == "managed"
    assert commands.row_kind(1) == "raw"
    assert commands.row_kind(2) == "paged managed"
    assert commands.row_kind(3) == "paged raw"


def test_a_path_that_is_not_a_socket_is_named(served, tmp_path):
    """--socket pointing at a regular file says so (it said "not running")."""
    f = tmp_path / "plain"
    f.write_text("x")
    r = subprocess.run([sys.executable, "-m", "blocktable_daemon.ctl", "--socket", str(f), "status"],
                       env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is not a socket" in r.stderr, (r.returncode, r.stderr)


def test_errors_under_json_are_json(served, tmp_path):
    d, p, row = served
    r = d.ctl("--json", "row", "999")
    assert r.returncode == 1, r
    err = json.loads(r.stdout)["error"]
    assert err["name"] == "ENOENT" and "999" in err["message"], err
    r = subprocess.run([sys.executable, "-m", "blocktable_daemon.ctl", "--json", "--socket",
                        str(tmp_path / "none.sock"), "status"], env=child_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and json.loads(r.stdout)["error"]["name"] == "ENOTRUNNING", r
