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
    for name, cmd in commands.CLI.items():
        assert type(cmd).render is not commands.Command.render, name


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
    """watch stops after --count samples; the first has no rates yet, the next ones do;
    each pool is drawn (a bar now, a sparkline over the samples)."""
    d, p, row = served
    r = d.ctl("watch", "--count", "3", "--interval", "0.05")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(f"segment {d.segment}: 1 clients") == 3, r.stdout
    assert r.stdout.count("rates from the next sample on") == 1, r.stdout
    assert r.stdout.count("blocks taken 0.0/s  returned 0.0/s") == 2, r.stdout
    assert "[" + "." * 30 + "]" in r.stdout          # 5 of 511 blocks used: under half a cell
    assert "USED% OVER THE LAST 3 SAMPLES" in r.stdout
    r = d.ctl("--json", "watch", "--count", "2", "--interval", "0.05")
    frames = [json.loads(x) for x in r.stdout.splitlines()]
    assert [f["sample"] for f in frames] == [1, 2]
    [s0], [s1] = frames[0]["segments"], frames[1]["segments"]
    assert s0["deltas"]["calls"] is None and s1["deltas"]["taken"] == 0
    assert s1["pools"][0]["used_history"] == [round(5 / 511, 4)] * 2
    assert s1["clients"] == 1 and frames[1]["dt_s"] > 0


WORKER = """
import sys
from blocktable.connect import connect
cl = connect(sys.argv[1], socket=sys.argv[2])
r = cl.claim_row(key=5)
print("ready", flush=True)
for line in sys.stdin:
    cmd, n = line.split()
    if cmd == "alloc":
        cl.alloc_append(r, int(n))
    elif cmd == "truncate":
        cl.truncate(r, int(n))
    print("done", flush=True)
"""


def test_watch_rates_from_two_real_snapshots(tmp_path):
    """Rates come from the change between two real samples of btd, with a client that
    allocates (and then frees) in between: blocks taken / returned are exact, calls and
    registrations counted, and each rate is the change over the samples' interval."""
    from blocktable_daemon.ctl import Watch
    d = DaemonProcess(tmp_path, sizes=SMALL).start()
    p = subprocess.Popen([sys.executable, "-c", WORKER, d.segment, d.socket], env=child_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"

        def do(cmd):
            p.stdin.write(cmd + "\n")
            p.stdin.flush()
            assert p.stdout.readline() == "done\n"
        w = Watch(history=4)
        first = w.step(Watch.sample(d.request))
        assert first["segments"][0]["deltas"] == dict.fromkeys(
            ["calls", "taken", "returned", "registrations", "recoveries"])
        do("alloc 5")
        do("alloc 2")
        f = w.step(Watch.sample(d.request))
        [s] = f["segments"]
        assert s["deltas"]["taken"] == 7 and s["deltas"]["returned"] == 0, s
        assert s["deltas"]["calls"] >= 2 and s["deltas"]["registrations"] == 0, s
        assert s["rates"]["taken_per_s"] == pytest.approx(7 / f["dt_s"])
        assert s["pools"][0]["used"] == 7
        assert s["pools"][0]["used_history"] == [0.0, round(7 / 511, 4)]
        do("truncate 3")                         # keeps 3 blocks: 4 returned
        q = subprocess.run([sys.executable, "-c", "import sys; from blocktable.connect import "
                            "connect; connect(sys.argv[1], socket=sys.argv[2]).close()",
                            d.segment, d.socket], env=child_env(), timeout=60)
        assert q.returncode == 0
        f = w.step(Watch.sample(d.request))
        [s] = f["segments"]
        assert (s["deltas"]["taken"], s["deltas"]["returned"]) == (0, 4), s
        assert s["deltas"]["registrations"] == 1 and s["deltas"]["calls"] >= 1, s
        assert s["rates"]["returned_per_s"] == pytest.approx(4 / f["dt_s"])
    finally:
        p.kill()
        p.wait()
        d.cleanup()


def test_global_flags_anywhere(served):
    """--json, --socket and --timeout go before or after the command; one given before
    the command is not reset by the command's own default."""
    from blocktable_daemon.ctl import parser
    d, p, row = served
    for argv in (["--json", "status"], ["status", "--json"]):
        ns = parser().parse_args(argv)
        assert ns.json is True and ns.timeout == 10.0 and ns.socket is None, (argv, ns)
    ns = parser().parse_args(["--socket", "/a", "--timeout", "3", "rows", "--limit", "2"])
    assert (ns.socket, ns.timeout, ns.limit) == ("/a", 3.0, 2)
    assert parser().parse_args(["rows", "-s", "/b", "--timeout", "4"]).socket == "/b"
    for argv in (["status", "--json", "--socket", d.socket],
                 ["--json", "pools", "--socket", d.socket],
                 ["rows", "--socket", d.socket, "--json", "--timeout", "5"]):
        r = subprocess.run([sys.executable, "-m", "blocktable_daemon.ctl", *argv],
                           env=child_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (argv, r.stderr)
        json.loads(r.stdout)
    r = d.ctl("status", "--timeout", "-1")
    assert r.returncode == 2 and "must be" in r.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_names_every_command(shell):
    """bt-ctl completion SHELL prints a script (made by shtab from the parser) that
    names every subcommand and the global flags; bash parses it."""
    import shutil
    from blocktable_daemon.ctl import subcommands
    r = subprocess.run([sys.executable, "-m", "blocktable_daemon.ctl", "completion", shell],
                       env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for name in subcommands():
        assert name in r.stdout, (name, shell)
    assert "--socket" in r.stdout and "--json" in r.stdout
    assert set(subcommands()) >= {"status", "watch", "orphans", "completion"}
    if shell == "bash" and shutil.which("bash"):
        script = r.stdout + "\ndeclare -p _shtab_bt_ctl_subparsers\n"
        b = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert b.returncode == 0 and "orphans" in b.stdout, b.stderr


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
