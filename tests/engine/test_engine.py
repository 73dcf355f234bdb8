"""blocktable inside a real vLLM engine (issue 9, items 5 and 6).

The tiny Llama (dummy weights) runs in vLLM's CPU build, stock and with the blocktable plugin
(BLOCKTABLE_VLLM=<segment>), at TP=1 and TP=2, with prefix caching on, prompts sharing
prefixes and a KV pool small enough to preempt. Asserted:
- token-identical outputs, and vLLM's own counters (prefix-cache queries and hits,
  preemptions) identical to stock, with hits and preemptions actually happening;
- the workers built their block tables from the segment's rows (stats files: rows read > 0)
  and, with BLOCKTABLE_VLLM_CHECK=1, every gathered row equalled vLLM's own ids;
- while the engine lives, btd shows it: its processes as clients, its cache pool (used,
  cached, prefix-cache counters) in `pools` and the metrics, its live requests in `rows`;
- when the engine stops, every block is back (pool free == total, fsck clean);
- SIGKILL of the EngineCore mid-generation: btd recovers all it held (fsck clean, every
  block free) and a new engine starts on the same segment at once.

Each engine runs in its own process (tests/engine/engine.py); btd is ours, on a temp socket.
Run by `make test-vllm` in .venv-vllm (BT_VLLM_REQUIRED=1 there: vLLM failing to import is
an error); elsewhere the module skips, saying why.
"""
import importlib.metadata
import json
import os
import random
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

if os.environ.get("BT_VLLM_UNAVAILABLE"):
    pytest.skip("vLLM's CPU build cannot be installed here: "
                + os.environ["BT_VLLM_UNAVAILABLE"], allow_module_level=True)
from conftest import real_vllm  # noqa: E402  (tests/conftest.py)

if not real_vllm():
    if os.environ.get("BT_VLLM_REQUIRED"):
        raise ImportError("vllm is not installed in this Python (BT_VLLM_REQUIRED=1)")
    pytest.skip("vllm is not installed in this environment; the engine test runs in "
                ".venv-vllm: make test-vllm", allow_module_level=True)

import psutil

from blocktable_daemon.testing import DaemonProcess, child_env, unique_name, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE = os.path.join(HERE, "engine.py")
sys.path.insert(0, HERE)
from engine import tiny_llama  # noqa: E402

# The workload: 3 shared prefixes of 70 tokens (2 full blocks of 32 each), a warm-up batch
# that caches them, then 12 requests that hit them; 24 blocks of KV for up to 8 requests of
# up to 5 blocks each, so the scheduler preempts.
BLOCKS, MAX_SEQS, MAX_LEN, MAX_TOKENS = 24, 8, 256, 40
STOCK_ONLY = os.environ.get("BT_VLLM_STOCK_ONLY") == "1"     # developing the harness alone


def workload():
    rng = random.Random(7)
    prefixes = [[rng.randrange(3, 1000) for _ in range(70)] for _ in range(3)]

    def prompts(n):
        return [prefixes[i % 3] + [rng.randrange(3, 1000) for _ in range(5 + (i * 7) % 30)]
                for i in range(n)]
    batches = [prompts(3), prompts(12)]
    kill_batch = prompts(32)
    return batches, kill_batch


def plugin_installed():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    return any(ep.name == "blocktable" for ep in eps)


# ---- running an engine ----------------------------------------------------------------------
class Engine:
    """One engine run (tests/engine/engine.py) in its own process. The markers come back on a
    pipe of their own; vLLM's logs go to a file, shown when something fails."""

    def __init__(self, tmp, tag, tp, model, daemon=None, segment=None, hold=False,
                 kill_batch=None):
        self.tag, self.tp, self.segment = tag, tp, segment
        self.dir = os.path.join(tmp, tag)
        os.makedirs(self.dir, exist_ok=True)
        self.stats_dir = os.path.join(self.dir, "stats")
        os.makedirs(self.stats_dir, exist_ok=True)
        batches, _ = workload()
        spec = {"model": model, "tp": tp, "blocks": BLOCKS, "max_num_seqs": MAX_SEQS,
                "max_model_len": MAX_LEN, "max_tokens": MAX_TOKENS, "batches": batches,
                "out": os.path.join(self.dir, "result.json"), "hold": hold,
                "kill_batch": kill_batch, "kill_max_tokens": MAX_LEN - 110}
        self.spec_path = os.path.join(self.dir, "spec.json")
        with open(self.spec_path, "w") as f:
            json.dump(spec, f)
        env = {"VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": "0" if tp == 1 else "0|1"}
        env.pop("BLOCKTABLE_VLLM", None)
        if segment:
            env.update({"BLOCKTABLE_VLLM": segment, "BT_SOCKET": daemon.socket,
                        "BLOCKTABLE_VLLM_STATS_DIR": self.stats_dir,
                        "BLOCKTABLE_VLLM_CHECK": "1"})
        full = child_env(env)
        if not segment:
            full.pop("BLOCKTABLE_VLLM", None)
        self.log_path = os.path.join(self.dir, "engine.log")
        self._log = open(self.log_path, "wb")
        r, w = os.pipe()
        full["BT_ENGINE_CTL_FD"] = str(w)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, ENGINE, self.spec_path], env=full,
                                     stdin=subprocess.PIPE, stdout=self._log,
                                     stderr=subprocess.STDOUT, pass_fds=(w,))
        os.close(w)
        self._ctl = os.fdopen(r, "rb", buffering=0)
        self._buf = b""

    def log(self, n=6000):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def wait_marker(self, word, timeout):
        """Wait for a marker line from the driver; fail with its log if it exits first."""
        sel = selectors.DefaultSelector()
        sel.register(self._ctl, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while True:
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    if line.decode().strip() == word:
                        return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.tag}: no {word} in {timeout} s\n{self.log()}")
                if sel.select(min(left, 1.0)):
                    chunk = self._ctl.read(4096)
                    if not chunk:
                        self.proc.wait(30)
                        raise AssertionError(f"{self.tag}: the engine exited "
                                             f"({self.proc.returncode}) before {word}:\n"
                                             f"{self.log()}")
                    self._buf += chunk
        finally:
            sel.close()

    def early_end(self):
        """A marker saying the kill batch already ended (finished or failed), if one came:
        read without blocking."""
        sel = selectors.DefaultSelector()
        sel.register(self._ctl, selectors.EVENT_READ)
        try:
            while sel.select(0):
                chunk = self._ctl.read(4096)
                if not chunk:
                    break
                self._buf += chunk
        finally:
            sel.close()
        for line in self._buf.decode(errors="replace").splitlines():
            if line.startswith(("GENERATED", "GENERATE_FAILED")):
                return line
        return None

    def result(self):
        with open(os.path.join(self.dir, "result.json")) as f:
            return json.load(f)

    def release(self):
        """Let a held driver go on (shut down, or exit after a kill)."""
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()

    def finish(self, timeout=120):
        rc = self.proc.wait(timeout)
        self.seconds = time.monotonic() - self.t0
        self._log.close()
        self._ctl.close()
        return rc

    def worker_stats(self):
        out = []
        for fn in sorted(os.listdir(self.stats_dir)):
            with open(os.path.join(self.stats_dir, fn)) as f:
                out.append(json.load(f))
        return out

    def kill(self):
        """After a failure: SIGKILL the driver and the engine processes it started (an
        orphaned EngineCore would hold the segment's cache pool against the next engine)."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(kids, timeout=30)


def run_plain(tmp, tag, tp, model, **kw):
    """Start, generate, stop; the driver's result (and the Engine)."""
    e = Engine(tmp, tag, tp, model, **kw)
    try:
        e.wait_marker("DONE", 300)
        assert e.finish() == 0, e.log()
        return e.result(), e
    finally:
        e.kill()


def engine_pids(result):
    return {int(p): t.strip() for p, t in result["engine_pids"].items()
            if "VLLM::" in t}


def core_pid(result):
    [pid] = [p for p, t in engine_pids(result).items() if "EngineCore" in t]
    return pid


def gone(pids):
    """Every pid exited (a zombie counts: libbt and btd treat it as dead)."""
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


# ---- btd views -------------------------------------------------------------------------
def pools(daemon, segment):
    return [p for p in daemon.request("pools", {"segment": segment})["pools"]]


def cache_pool(daemon, segment):
    [p] = [p for p in pools(daemon, segment) if p["kind"] == "cache" and p["pool"] == 0]
    return p


def all_blocks_back(daemon, segment):
    """Every block of the segment free (no cache entries left), no client, fsck clean."""
    for p in pools(daemon, segment):
        if p["used"] or p["cached"] or p["free"] != p["blocks"]:
            return False
    return daemon.request("clients", {"segment": segment})["clients"] == []


def fsck_clean(daemon, segment):
    r = daemon.request("fsck", {"segment": segment})
    [s] = r["segments"]
    return s["ok"] and not s["problems"], s


def metrics_text(daemon):
    addr = daemon.request("status")["metrics"]
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as f:
        return f.read().decode()


def metric(text, name, **labels):
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None



# libbt with cache pools (vLLM's BlockPool and prefix cache in the segment). Before they
# were built (branch `cache`), the engine's blocks were not in the segment to look at.
import blocktable  # noqa: E402
HAS_CACHE_POOLS = "cache_pools" in blocktable.SegmentConfig.__dataclass_fields__


def check_cache_pool_view(daemon, segment, core):
    """The engine's block pool, as operators see it: bt-ctl pools and the metrics."""
    cp = cache_pool(daemon, segment)
    assert cp["owner_pid"] == core and cp["cached"] > 0, cp
    assert cp["used"] + cp["cached"] + cp["free"] == cp["blocks"]
    assert cp["cache"]["queries"] > 0 and cp["cache"]["hits"] > 0, cp
    text = daemon.ctl("pools", "--segment", segment).stdout
    assert "cache" in text and str(core) in text, text
    # the metrics endpoint publishes btd's snapshot of the next tick
    # The engine is idle (held after generate): the endpoint must come to show exactly what
    # the pool holds now (btd publishes a snapshot each tick).
    now = cache_pool(daemon, segment)
    want = {"blocktable_prefix_cache_hits_total": now["cache"]["hits"],
            "blocktable_prefix_cache_queries_total": now["cache"]["queries"],
            "blocktable_prefix_cache_evicted_total": now["cache"]["evicted"],
            "blocktable_prefix_cache_blocks_evicted_total": now["cache"]["blocks_evicted"],
            "blocktable_blocks_cached": now["cached"], "blocktable_blocks_used": now["used"],
            "blocktable_blocks_free": now["free"]}

    last = {}

    def scrape():
        t = metrics_text(daemon)
        last.update({k: metric(t, k, segment=segment, pool=0) for k in want})
        return dict(last) if last == want else None
    try:
        got = wait_for(scrape, 10, "the metrics to show the engine's pool", interval=0.1)
    except TimeoutError:
        raise AssertionError(f"metrics {last} != pool {want}") from None
    assert got["blocktable_prefix_cache_hits_total"] > 0 and got["blocktable_blocks_cached"] > 0, got


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tmp(request):
    """A folder of our own: pytest's shared basetemp keeps only its last 3 sessions, and
    other test sessions on this machine would remove ours while the engines run. Kept
    (and named) when a test failed: the engines' logs are there."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="bt-vllm-test-")
    failed = request.session.testsfailed
    yield d
    if request.session.testsfailed == failed:
        shutil.rmtree(d, ignore_errors=True)
    else:
        print(f"\nengine test: logs kept in {d}")


@pytest.fixture(scope="module")
def model(tmp):
    return tiny_llama(os.path.join(tmp, "tiny-llama"))


@pytest.fixture(scope="module")
def daemon(tmp):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    d = DaemonProcess(os.path.join(tmp, "btd"), args=["--metrics", f"127.0.0.1:{port}"],
                      sizes={"blocks_per_pool": 64, "num_rows": 8, "row_width": 8}).start()
    yield d
    d.cleanup()


@pytest.fixture(scope="module")
def segment():
    name = unique_name("vllm")
    yield name
    try:
        import blocktable
        blocktable.Segment.unlink(name)
    except OSError:
        pass


@pytest.fixture(scope="module")
def timings():
    """Seconds per engine run; printed (pytest -s) with the identity results, and written as
    JSON to $BT_VLLM_REPORT when set."""
    t = {}
    yield t
    rep = {"timings_s": {k: round(v, 1) for k, v in t.items()}, "identity": IDENTITY,
           "plugin_stats": STATS}
    print("\nengine test: " + json.dumps(rep))
    if os.environ.get("BT_VLLM_REPORT"):
        with open(os.environ["BT_VLLM_REPORT"], "w") as f:
            json.dump(rep, f, indent=2)


def need_plugin():
    if STOCK_ONLY:
        pytest.skip("BT_VLLM_STOCK_ONLY=1: the blocktable runs are skipped")
    assert plugin_installed(), ("the blocktable.vllm plugin is not installed in this "
                                "environment (entry point vllm.general_plugins: blocktable)")


def assert_same_engine(stock, bt, tp):
    """Items 5: token-identical, same prefix hits and queries, same preemptions."""
    n = sum(len(b) for b in workload()[0])
    assert len(stock["outputs"]) == len(bt["outputs"]) == n
    diff = [i for i, (a, b) in enumerate(zip(stock["outputs"], bt["outputs"])) if a != b]
    assert not diff, f"TP={tp}: requests {diff} differ from stock vLLM"
    sm, bm = stock["metrics"], bt["metrics"]
    for k in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions",
              "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success"):
        assert bm.get(k) == sm.get(k), f"TP={tp}: {k}: blocktable {bm.get(k)}, stock {sm.get(k)}"
    IDENTITY[f"tp{tp}"] = {"requests": n, "identical_outputs": True,
                           **{k.split(":")[1]: int(sm[k]) for k in sm}}


# ---- the tests ------------------------------------------------------------------------------
RESULTS = {}
IDENTITY = {}       # what was asserted identical, per TP (printed at the end; the note)
STATS = {}          # the plugin's counters per blocktable run


def test_tp1_stock_workload_hits_and_preempts(tmp, model, timings):
    r, e = run_plain(tmp, "stock-tp1", 1, model)
    timings["stock_tp1"] = e.seconds
    RESULTS["stock1"] = r
    m = r["metrics"]
    assert m["vllm:prefix_cache_hits"] > 0 and m["vllm:num_preemptions"] > 0, m
    assert m["vllm:generation_tokens"] == sum(len(b) for b in workload()[0]) * MAX_TOKENS


def test_tp1_blocktable_identical_visible_then_sigkill_recovered(tmp, model, daemon, segment,
                                                                 timings):
    need_plugin()
    stock = RESULTS.get("stock1") or pytest.fail("the stock TP=1 run failed")
    e = Engine(tmp, "bt-tp1", 1, model, daemon=daemon, segment=segment, hold=True,
               kill_batch=workload()[1])
    try:
        e.wait_marker("HOLD", 300)
        timings["bt_tp1_to_hold"] = time.monotonic() - e.t0
        r = e.result()
        assert_same_engine(stock, r, 1)
        pids = engine_pids(r)
        core = core_pid(r)
        # ---- btd sees the engine (after generate, before shutdown) ----
        st = {s["name"]: s for s in daemon.request("status")["segments"]}
        assert segment in st and st[segment]["origin"] == "create", st.keys()
        clients = daemon.request("clients", {"segment": segment})["clients"]
        assert {c["pid"] for c in clients} == set(pids), (clients, pids)
        assert all(c["watched"] and c["state"] == "active" for c in clients)
        assert {c["process"].split()[0] for c in clients} >= {"VLLM::EngineCore"}, clients
        if HAS_CACHE_POOLS:
            check_cache_pool_view(daemon, segment, core)
        ok, rep = fsck_clean(daemon, segment)
        assert ok, rep
        # the stats the idle engine flushed (the EngineCore is SIGKILLed below)
        wait_for(lambda: len(e.worker_stats()) >= 2, 10, "the engine's stats files")
        check_stats(e, segment, ranks=[0], tokens=r["metrics"]["vllm:generation_tokens"])
        # ---- mid-generation: the live requests are rows; then SIGKILL the EngineCore ----
        e.release()                     # the kill batch starts
        e.wait_marker("GENERATING", 30)
        def live_rows():
            rows = daemon.request("rows", {"segment": segment})["rows"]
            end = None if rows else e.early_end()
            assert end is None, f"the batch ended before its rows were seen: {end}\n{e.log()}"
            return rows
        rows = wait_for(live_rows, 60, "the engine's request rows", interval=0.005)
        assert all(x["kind"] == "raw" and x["pid"] == core and
                   x["process"].startswith("VLLM::EngineCore") for x in rows), rows
        assert len({x["key"] for x in rows}) == len(rows) and len(rows) <= MAX_SEQS
        text = daemon.ctl("rows", "--segment", segment).stdout
        assert "raw" in text and str(core) in text, text
        print("\nbt-ctl rows, mid-generation:\n" + text)
        print("bt-ctl pools, mid-generation:\n" + daemon.ctl("pools", "--segment", segment).stdout)
        os.kill(core, signal.SIGKILL)
        t_kill = time.monotonic()
        e.release()
        assert e.finish(60) == 0, e.log()
        wait_for(lambda: gone(pids), 60, "the engine's processes to exit", interval=0.05)
        wait_for(lambda: all_blocks_back(daemon, segment), 30,
                 "btd to recover every block of the killed engine", interval=0.01)
        timings["recovery_after_kill"] = time.monotonic() - t_kill
        if HAS_CACHE_POOLS:
            cp = cache_pool(daemon, segment)
            assert cp["owner_pid"] is None and cp["keys"] == 0, cp
        ok, rep = fsck_clean(daemon, segment)
        assert ok, rep
        rec = daemon.request("stats")["recoveries"]
        assert sum(v for k, v in rec.items() if k.startswith(segment + ":")) >= 1, rec
        RESULTS["killed_at"] = time.monotonic()
    finally:
        e.kill()


def test_tp2_blocktable_starts_at_once_on_same_segment_identical_blocks_back(
        tmp, model, daemon, segment, timings):
    need_plugin()
    regs = daemon.request("stats")["registrations"].get(segment, 0)
    e = Engine(tmp, "bt-tp2", 2, model, daemon=daemon, segment=segment)
    try:
        e.wait_marker("DONE", 300)
        assert e.finish() == 0, e.log()
    finally:
        e.kill()
    timings["bt_tp2"] = e.seconds
    r = e.result()
    RESULTS["bt2"] = r
    pids = engine_pids(r)
    # the same segment (not a new one), registered into again
    st = {s["name"]: s for s in daemon.request("status")["segments"]}
    assert st[segment]["origin"] == "create"
    assert daemon.request("stats")["registrations"][segment] >= regs + 3   # core + 2 workers
    # stopped: every block back, fsck clean
    wait_for(lambda: gone(pids), 60, "the engine's processes to exit", interval=0.05)
    wait_for(lambda: all_blocks_back(daemon, segment), 30, "every block back after the stop",
             interval=0.01)
    ok, rep = fsck_clean(daemon, segment)
    assert ok, rep
    check_stats(e, segment, ranks=[0, 1], tokens=r["metrics"]["vllm:generation_tokens"])


def check_stats(e, segment, ranks, tokens):
    """The workers read their block tables from the rows (one row per request per step:
    at least one per generated token), and with BLOCKTABLE_VLLM_CHECK=1 every row they
    gathered equalled the ids vLLM sent; the scheduler wrote the rows."""
    stats = e.worker_stats()
    workers = [s for s in stats if s["role"] == "worker"]
    assert sorted(s["rank"] for s in workers) == ranks, stats
    for s in workers:
        assert s["segment"] == segment and s["rows_read"] >= tokens > 0, (tokens, s)
        assert s["checked_rows"] == s["rows_read"], s
        assert s["check_mismatches"] == 0, s
    [sched] = [s for s in stats if s["role"] == "scheduler"]
    assert sched["segment"] == segment and sched["rows_written"] > 0 and sched["allocs"] > 0, \
        sched
    STATS[e.tag] = {"workers": [{k: s[k] for k in ("rank", "steps", "rows_read", "checked_rows",
                                                   "check_mismatches")} for s in workers],
                    "scheduler": {k: v for k, v in sched.items() if k not in ("role", "pid")}}


def test_tp2_stock_identical(tmp, model, timings):
    r, e = run_plain(tmp, "stock-tp2", 2, model)
    timings["stock_tp2"] = e.seconds
    m = r["metrics"]
    assert m["vllm:prefix_cache_hits"] > 0 and m["vllm:num_preemptions"] > 0, m
    if STOCK_ONLY:
        return
    bt = RESULTS.get("bt2") or pytest.fail("the blocktable TP=2 run failed")
    assert_same_engine(r, bt, 2)
