"""btd's Prometheus endpoint follows the conventions an operator's dashboards
rely on: a blocktable_ prefix, blocktable_build_info, the process metrics, a
segment label on every blocktable series (btd serves several segments),
prometheus_client's own histograms with no pause recorded for a recovery
that froze nothing; and --metrics without prometheus-client refuses to start."""
import re
import subprocess
import sys
import urllib.request

import pytest

import blocktable

from blocktable_daemon.testing import DaemonProcess, child_env, unique_name, wait_for

from conftest import free_port

SMALL = {"blocks_per_pool": 1024, "num_rows": 32, "row_width": 16, "max_clients": 16,
         "hand_size": 64}

HOLD_CLIENT = r"""
import sys
from blocktable import connect
c = connect(sys.argv[1], socket=sys.argv[2])
row = c.claim_row()
c.alloc_append(row, 3)
print(c.id, flush=True)
sys.stdin.readline()
"""


def scrape(port):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def samples(text):
    """(name, {label: value}, value) of each sample line."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        assert m, line
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m[2] or ""))
        out.append((m[1], labels, float(m[3])))
    return out


def value(text, name, **labels):
    got = [v for n, lab, v in samples(text)
           if n == name and all(lab.get(k) == str(x) for k, x in labels.items())]
    return got[0] if got else None


def scrape_until(port, name, **labels):
    """The endpoint's text once it has a nonzero sample `name` with these labels."""
    def got():
        t = scrape(port)
        return t if value(t, name, **labels) else None
    return wait_for(got, 10, f"{name} {labels} in the metrics", interval=0.1)


@pytest.fixture
def two_segments(tmp_path):
    port = free_port()
    other = unique_name("m2")
    d = DaemonProcess(tmp_path, args=["--metrics", f"127.0.0.1:{port}", "--segment", other],
                      sizes=SMALL).start()
    yield d, other, port
    d.cleanup()
    try:
        blocktable.Segment.unlink(other)
    except OSError:
        pass


def kill_a_client(d, segment):
    """A client of `segment` that holds a row and 3 blocks, killed outside a call."""
    p = subprocess.Popen([sys.executable, "-c", HOLD_CLIENT, segment, d.socket],
                         env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    int(p.stdout.readline())
    p.kill()
    p.wait()
    return p.pid


def test_prefix_build_info_process_metrics_and_a_segment_label_everywhere(two_segments):
    d, other, port = two_segments
    kill_a_client(d, other)
    wait_for(lambda: d.request("stats")["recoveries_total"] == 1, 10, "a recovery")
    text = scrape_until(port, "blocktable_recoveries_total", segment=other)
    ss = samples(text)
    names = {n for n, _, _ in ss}
    # no series left under the old prefix
    assert not [n for n in names if n.startswith("bt_")], sorted(names)
    # build info: value 1, version and build id (ABI fingerprint) as labels
    [(_, info, one)] = [s for s in ss if s[0] == "blocktable_build_info"]
    assert one == 1.0 and info["version"] == blocktable.__version__
    assert info["build_id"] == blocktable.BUILD_ID and info["abi"].startswith("0x"), info
    # the process collector
    assert {"process_cpu_seconds_total", "process_open_fds",
            "process_resident_memory_bytes"} <= names, sorted(names)
    # a segment label on every blocktable series but the build info
    unlabelled = sorted({n for n, lab, _ in ss if n.startswith("blocktable_")
                         and n != "blocktable_build_info" and "segment" not in lab})
    assert not unlabelled, unlabelled
    # each segment has its own series
    for seg in (d.segment, other):
        assert value(text, "blocktable_blocks_free", segment=seg, pool=0) is not None
        assert value(text, "blocktable_clients", segment=seg, state="active") is not None
    assert value(text, "blocktable_recoveries_total", segment=other, kind="lockfree") == 1.0
    assert value(text, "blocktable_recoveries_total", segment=d.segment) is None
    assert value(text, "blocktable_registrations_total", segment=other) == 1.0
    assert value(text, "blocktable_requests_total", cmd="register", segment=other) == 1.0
    assert value(text, "blocktable_blocks_free", segment=other, pool=0) == 1023.0


def test_a_lockfree_recovery_records_no_pause(two_segments):
    """A client that died outside a call is released without freezing anything:
    its recovery counts in the latency histogram, not as a zero-length pause."""
    d, other, port = two_segments
    kill_a_client(d, other)
    wait_for(lambda: d.request("stats")["recoveries_total"] == 1, 10, "a recovery")
    text = scrape_until(port, "blocktable_recovery_latency_seconds_count", segment=other)
    assert value(text, "blocktable_recoveries_total", segment=other, kind="lockfree") == 1.0
    assert value(text, "blocktable_recovery_latency_seconds_count", segment=other) == 1.0
    assert not value(text, "blocktable_recovery_pause_seconds_count", segment=other), \
        [s for s in samples(text) if s[0].startswith("blocktable_recovery_pause")]
    # prometheus_client's histogram: _bucket with le, _count, _sum
    assert value(text, "blocktable_recovery_latency_seconds_bucket", segment=other,
                 le="+Inf") == 1.0


def test_metrics_without_prometheus_client_refuses_to_start(tmp_path):
    """sys.modules[name] = None is how Python itself spells "this module is not
    installed" to the import system: `import prometheus_client` raises
    ImportError, as in an environment without the package."""
    code = ("import sys; sys.modules['prometheus_client'] = None; "
            "from blocktable_daemon.server import main; sys.exit(main(sys.argv[1:]))")
    seg = unique_name("nom")
    sock = str(tmp_path / "btd.sock")
    r = subprocess.run([sys.executable, "-c", code, "--socket", sock, "--segment", seg,
                        "--metrics", f"127.0.0.1:{free_port()}"], env=child_env(),
                       capture_output=True, text=True, timeout=30)
    try:
        assert r.returncode != 0, (r.stdout, r.stderr)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1, r.stderr
        assert "prometheus-client" in err[0] and "pip install" in err[0], err[0]
        # refused before anything was created
        import os
        assert not os.path.exists(f"/dev/shm/bt.{seg}") and not os.path.exists(sock)
    finally:
        try:
            blocktable.Segment.unlink(seg)
        except OSError:
            pass


def test_segment_names_a_peer_sends_never_become_series(two_segments):
    """Requests naming segments btd does not serve are counted under segment="":
    a peer's strings as label values would each be a new series, kept for good."""
    d, other, port = two_segments
    for i in range(30):
        with pytest.raises(Exception):
            d.request("clients", {"segment": f"junk{i}"})
    d.request("clients", {"segment": other})
    text = scrape_until(port, "blocktable_request_errors_total", cmd="clients")
    segs = {lab.get("segment") for n, lab, _ in samples(text) if n.startswith("blocktable_")}
    assert segs <= {d.segment, other, "", None}, segs
    assert value(text, "blocktable_request_errors_total", cmd="clients", error="ENOENT",
                 segment="") == 30.0
    assert value(text, "blocktable_requests_total", cmd="clients", segment=other) == 1.0
