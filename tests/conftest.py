"""Fixtures and helpers shared by the Python tests."""
import json
import os
import secrets
import socket

import numpy as np
import pytest

import blocktable as bt

# Hypothesis profiles. `make test` (and a plain pytest run) use "ci": the
# same examples on every run (derandomized, no example database), so a CI
# run fails only on what a change broke, never on a case it happened to draw
# for the first time. `make fuzz` uses "fuzz" (BT_HYPOTHESIS_PROFILE=fuzz):
# new random cases, many more of them, with a local database that replays
# what failed before. A case that ever failed becomes an explicit test (an
# @example, or a replay such as test_model.py's FOUND), so "ci" keeps it.
try:
    from hypothesis import settings as _hsettings
except ImportError:                 # the tests that need it import it themselves
    _hsettings = None
PROFILE = os.environ.get("BT_HYPOTHESIS_PROFILE", "ci")
if _hsettings is not None:
    _hsettings.register_profile("ci", derandomize=True, database=None, deadline=None,
                                print_blob=True)
    _hsettings.register_profile("fuzz", derandomize=False, deadline=None, print_blob=True,
                                max_examples=1000)
    if PROFILE not in ("ci", "fuzz"):
        raise RuntimeError(f"BT_HYPOTHESIS_PROFILE={PROFILE!r}: known profiles are ci, fuzz")
    _hsettings.load_profile(PROFILE)

SMALL = bt.SegmentConfig(blocks_per_pool=64, num_pools=2, num_rows=8, row_width=16,
                         max_clients=8, hand_size=64)


@pytest.fixture
def seg():
    """A small embedded segment."""
    with bt.Segment.create(None, SMALL) as s:
        yield s


@pytest.fixture
def client(seg):
    with seg.client() as c:
        yield c


def unique_name(tag="t"):
    return f"pytest-{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def unlink_quietly(name):
    """Unlink segment `name` if it is still there (test clean-up)."""
    try:
        bt.Segment.unlink(name)
    except OSError:
        pass


@pytest.fixture
def daemon(request, tmp_path):
    """A started btd serving the test module's SIZES (blocktable_daemon.testing's
    DaemonProcess); stopped and cleaned up after the test."""
    from blocktable_daemon.testing import DaemonProcess
    d = DaemonProcess(tmp_path, sizes=request.module.SIZES).start()
    yield d
    d.cleanup()


def free_port():
    """A local TCP port nobody listens on right now (for btd's --metrics)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def socket_lines(path, payload, lines=None, timeout=10):
    """Send raw bytes to the daemon's socket at `path`; the JSON lines read back once
    `lines` whole lines came (None: until the daemon closes or `timeout` passes)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(payload)
    out = b""
    try:
        while lines != 0:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            out += chunk
            if lines is not None and out.endswith(b"\n") and out.count(b"\n") >= lines:
                break
    except (socket.timeout, ConnectionResetError):
        pass
    s.close()
    return [json.loads(x) for x in out.splitlines()]


@pytest.fixture
def shm_name():
    """A fresh segment name, unlinked after the test whatever happened."""
    name = unique_name()
    yield name
    try:
        bt.Segment.unlink(name)
    except FileNotFoundError:
        pass


def gpu_exporter(name, ready, stop, device=0):
    """A spawned child's body: export segment `name`'s GPU mirror on `device`, put
    (index, generation, pid) on `ready`, serve until `stop` is set (60 s at most)."""
    from blocktable import gpu
    seg = bt.Segment.attach(name)
    ex = gpu.MirrorExporter(seg, device)
    ready.put((ex.index, ex.generation, os.getpid()))
    stop.wait(60)
    ex.close()


def random_requests(rng, num_rows, max_reqs, max_len, max_spare):
    """Random requests for the slot-mapping tests: (num_reqs, lens, qsl, total, out_len,
    rows) with up to max_reqs requests of up to max_len tokens on rows below num_rows,
    query_start_loc as int32 and an output up to max_spare entries longer than needed."""
    num_reqs = int(rng.integers(0, max_reqs))
    lens = rng.integers(0, max_len, num_reqs)
    qsl = np.zeros(num_reqs + 1, np.int32)
    qsl[1:] = np.cumsum(lens)
    total = int(qsl[-1])
    out_len = total + int(rng.integers(0, max_spare))
    rows = rng.integers(0, num_rows, num_reqs).astype(np.int32)
    return num_reqs, lens, qsl, total, out_len, rows


def snapshot(seg, clients=()):
    """Everything a rejected call must leave alone: the table, the counts,
    every block's reference count and owner, the free counts, the hands."""
    c = seg.config
    blocks = [(b.ref_count, b.owner) for b in
              (seg.block(i) for i in range(1, c.num_pools * c.blocks_per_pool))]
    return {
        "table": seg.table.copy(), "nblocks": seg.num_blocks.copy(),
        "ntokens": seg.num_tokens.copy(), "blocks": blocks,
        "free": [seg.free_blocks(p) for p in range(c.num_pools)],
        "rows": [seg.row_info(r) for r in range(c.num_rows)],
        "hands": [cl.slot().hand_count for cl in clients],
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def assert_rejected(seg, exc, fn, *args, clients=(), match=None, **kw):
    """fn(*args) raises exc (matching `match`) and changes nothing."""
    before = snapshot(seg, clients)
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kw)
    assert_same(before, snapshot(seg, clients))
    return info.value


# ---- tests/engine: the engine tests --------------------------------------------------------
# They run where vLLM's CPU build is installed: `make test-vllm` runs them in .venv-vllm with
# BT_VLLM_REQUIRED=1, where a vLLM that does not import is an error, never a skip. Elsewhere
# they are skipped, saying why (test_engine.py's module-level skip carries the reason; the
# other files there are not collected). The folder is not named vllm: pytest puts tests/ on
# sys.path, and a folder of that name would import as a namespace package "vllm".
def real_vllm():
    """True if `vllm` resolves to an installed package, not to a namespace folder."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin not in (None, "namespace")


if os.environ.get("BT_VLLM_REQUIRED") and not real_vllm():
    raise ImportError("BT_VLLM_REQUIRED=1 but vllm is not installed in this Python "
                      "(.venv-vllm is broken: rebuild it with `make venv-vllm`)")

if os.environ.get("BT_VLLM_UNAVAILABLE") or not real_vllm():
    collect_ignore_glob = ["engine/test_vllm_*.py"]
