"""bt-ctl orphans: segments whose owner died are listed and removed; a segment whose
owner lives, or which a live process maps, is refused. Real segments, real processes
killed with SIGKILL, no btd needed (the point is that btd is gone)."""
import json
import os
import signal
import subprocess
import sys

import pytest

from blocktable_daemon import orphans
from blocktable_daemon.testing import DaemonProcess, child_env, unique_name

CREATE = """
import sys
import blocktable as bt
cfg = bt.SegmentConfig(blocks_per_pool=64, num_pools=1, num_rows=4, row_width=8,
                       max_clients=4, hand_size=8)
seg = bt.Segment.create(sys.argv[1], cfg)
print("ready", flush=True)
sys.stdin.readline()
"""
ATTACH = """
import sys
import blocktable as bt
seg = bt.Segment.attach(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
"""


def spawn(script, name):
    p = subprocess.Popen([sys.executable, "-c", script, name], env=child_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    return p


def sigkill(p):
    p.send_signal(signal.SIGKILL)
    p.wait()


def ctl(*argv):
    return subprocess.run([sys.executable, "-m", "blocktable_daemon.ctl", "orphans", *argv],
                          env=child_env(), capture_output=True, text=True, timeout=120)


@pytest.fixture
def names():
    made = []

    def new():
        made.append(unique_name("orph"))
        return made[-1]
    yield new
    for n in made:
        try:
            os.unlink(f"/dev/shm/bt.{n}")
        except FileNotFoundError:
            pass


def listed(r, which):
    assert r.returncode == 0, r.stderr
    return {s["name"]: s for s in json.loads(r.stdout)["segments"] if s["name"] in which}


def test_orphans_listed_and_removed(names):
    dead, alive, mapped = names(), names(), names()
    killed = spawn(CREATE, dead)
    owner = spawn(CREATE, alive)
    creator = spawn(CREATE, mapped)
    sigkill(killed)
    reader = spawn(ATTACH, mapped)             # maps it, owner then killed
    sigkill(creator)
    procs = [owner, reader]
    try:
        got = listed(ctl("--json"), {dead, alive, mapped})
        assert set(got) == {dead, alive, mapped}
        assert got[dead]["orphan"] and got[dead]["removable"]
        assert got[dead]["owner_pid"] == killed.pid and not got[dead]["owner_alive"]
        assert not got[alive]["orphan"] and got[alive]["owner_alive"]
        assert got[alive]["owner_pid"] == owner.pid and got[alive]["mapped_by"] == [owner.pid]
        assert got[mapped]["orphan"] and not got[mapped]["removable"]
        assert got[mapped]["mapped_by"] == [reader.pid]

        human = ctl()
        assert human.returncode == 0
        assert dead in human.stdout and mapped in human.stdout and alive not in human.stdout

        # The live owner's segment and the mapped one are refused, saying why (exit 1).
        r = ctl("--remove", alive, mapped)
        assert r.returncode == 1, r
        assert f"refused {alive}: not an orphan: owned by live pid {owner.pid}" in r.stdout
        assert f"refused {mapped}: owner pid {creator.pid} is gone; mapped by live pid " \
               f"{reader.pid}" in r.stdout
        assert os.path.exists(f"/dev/shm/bt.{alive}") and os.path.exists(f"/dev/shm/bt.{mapped}")

        r = ctl("--remove", dead, "--json")
        assert r.returncode == 0, r
        res = json.loads(r.stdout)
        assert [s["name"] for s in res["removed"]] == [dead] and res["refused"] == []
        assert not os.path.exists(f"/dev/shm/bt.{dead}")

        # Once its last mapper is gone, the orphan can go; it is named in the output.
        sigkill(reader)
        r = ctl("--remove", mapped)
        assert r.returncode == 0 and f"removed /dev/shm/bt.{mapped}" in r.stdout, r
        r = ctl("--remove", "no-such-" + dead)
        assert r.returncode == 1 and "no segment" in r.stdout
    finally:
        for p in procs:
            if p.poll() is None:
                sigkill(p)


def test_a_killed_btd_leaves_an_orphan(tmp_path, names):
    """btd SIGKILLed: its segment stays (by design) and is now an orphan; the next btd
    adopting it makes it owned again, so it is no longer listed."""
    name = names()
    d = DaemonProcess(tmp_path, segment=name, sizes={"blocks_per_pool": 64, "num_rows": 4,
                                                       "row_width": 8, "max_clients": 4,
                                                       "hand_size": 8}).start()
    try:
        btd_pid = d.pid
        got = listed(ctl("--json"), {name})
        assert not got[name]["orphan"] and got[name]["owner_pid"] == btd_pid
        d.kill()
        got = listed(ctl("--json"), {name})
        assert got[name]["orphan"] and got[name]["removable"]
        assert got[name]["owner_pid"] == btd_pid
        d.start()                               # adopts it
        got = listed(ctl("--json"), {name})
        assert not got[name]["orphan"] and got[name]["owner_pid"] == d.pid
        r = ctl("--remove", name)
        assert r.returncode == 1 and "not an orphan" in r.stdout
    finally:
        d.cleanup()


def test_unformatted_leftover_and_remove_all(names):
    """An object whose creator died before writing the header (no creation lock held) is
    an orphan too; remove(None, ...) takes every removable orphan of the list given."""
    raw, dead = names(), names()
    with open(f"/dev/shm/bt.{raw}", "wb") as f:
        f.write(b"\0" * 4096)
    sigkill(spawn(CREATE, dead))
    found = [s for s in orphans.scan() if s["name"] in (raw, dead)]
    by = {s["name"]: s for s in found}
    assert by[raw]["state"] == "unformatted" and by[raw]["removable"]
    res = orphans.remove(None, found)
    assert sorted(s["name"] for s in res["removed"]) == sorted([raw, dead])
    assert not os.path.exists(f"/dev/shm/bt.{raw}") and not os.path.exists(f"/dev/shm/bt.{dead}")
