"""Prometheus metrics (opt-in: --metrics HOST:PORT; needs prometheus-client).

Conventions: every series is named blocktable_* (process_* come from
prometheus_client's ProcessCollector), carries a `segment` label (btd may
serve several; a control request not about one segment has segment=""),
except blocktable_build_info (value 1; version, build id and the ABI
fingerprint as labels).

The daemon's state is the one source of truth: the main loop publishes a
plain snapshot (Daemon.publish) after each tick and event, and the
SnapshotCollector renders the latest one at scrape time, on
prometheus-client's HTTP thread; that thread never touches a segment or the
loop's structures. The recovery histograms are prometheus_client Histograms,
observed by the loop as recoveries finish (they are thread-safe); a recovery
that froze nothing (lock-free) records no pause.
"""
import logging

log = logging.getLogger("btd")

# Histogram bounds, seconds: recovery pauses are micro- to milliseconds.
PAUSE_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.5, 1.0)
LATENCY_BUCKETS = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)
PACKAGE_HINT = ("--metrics needs the prometheus-client package, which is not installed: "
                "pip install 'blocktable[daemon]' (or pip install prometheus-client)")

# prometheus-client adds _total to each counter's name.
CACHE_DOCS = {"queries": "Prefix-cache lookups (block hashes looked up)",
              "hits": "Prefix-cache lookups that found a cached block",
              "stored": "Block hashes stored in the prefix cache",
              "evicted": "Block hashes evicted (their block taken for new data)",
              "blocks_evicted": "Cached blocks evicted",
              "resets": "Cache pool resets (its engine stopped or died, or reset_prefix_cache)"}


def available():
    """True if prometheus_client imports."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class SnapshotCollector:
    """Renders the latest snapshot; see server.Daemon.snapshot for its keys."""

    def __init__(self):
        self.snap = {}

    def describe(self):
        return []

    def collect(self):
        s = self.snap
        if not s:
            return
        yield _build_info(s)
        yield from _segment_families(s["segments"])
        yield from _daemon_families(s)


def _build_info(s):
    from prometheus_client.core import GaugeMetricFamily
    fam = GaugeMetricFamily("blocktable_build_info", "btd's version, the build id of its "
                            "libbt and the ABI fingerprint of the segments it serves",
                            labels=["version", "build_id", "abi"])
    fam.add_metric([s["version"], s["build_id"], s["abi"]], 1)
    return fam


def _segment_families(segments):
    from prometheus_client.core import CounterMetricFamily as C, GaugeMetricFamily as G
    sp, sg = ["segment", "pool"], ["segment"]
    free = G("blocktable_blocks_free", "Free blocks per pool (not counting cached ones)",
             labels=sp)
    used = G("blocktable_blocks_used", "Allocated blocks per pool", labels=sp)
    # Cache pools (an engine's BlockPool and prefix cache in the segment): blocks that are
    # free but still hold a prefix, and the prefix-cache counters, per segment and pool.
    cached = G("blocktable_blocks_cached", "Free blocks that still hold a cached prefix "
               "(cache pools)", labels=sp)
    cache_c = {k: C("blocktable_prefix_cache_" + k, doc, labels=sp)
               for k, doc in CACHE_DOCS.items()}
    rows = G("blocktable_rows_used", "Claimed rows", labels=sg)
    clients = G("blocktable_clients", "Client slots by state", labels=["segment", "state"])
    stuck = G("blocktable_stuck_clients", "Live clients stuck inside a call, holding up a "
              "repair", labels=sg)
    pending = G("blocktable_pending_recoveries", "Dead clients not yet fully recovered",
                labels=sg)
    ops = C("blocktable_client_ops", "Data-path calls made by clients (from their slots)",
            labels=sg)
    for seg in segments:
        name = seg["name"]
        for p in seg["pools"]:
            lab = [name, str(p["pool"])]
            free.add_metric(lab, p["free"])
            used.add_metric(lab, p["used"])
            if p.get("cache"):
                cached.add_metric(lab, p["cached"])
                for k, fam in cache_c.items():
                    fam.add_metric(lab, p["cache"][k])
        rows.add_metric([name], seg["rows_used"])
        for state, n in seg["clients"].items():
            clients.add_metric([name, state], n)
        stuck.add_metric([name], len(seg["stuck"]))
        pending.add_metric([name], seg["pending_recoveries"])
        ops.add_metric([name], seg["client_ops"])
    yield from (free, used, cached, rows, clients, stuck, pending, ops, *cache_c.values())


def _daemon_families(s):
    from prometheus_client.core import CounterMetricFamily as C
    fams = (("blocktable_requests", "Control requests", ["cmd", "segment"], "requests"),
            ("blocktable_request_errors", "Control requests answered with an error",
             ["cmd", "error", "segment"], "request_errors"),
            ("blocktable_recoveries", "Dead clients recovered", ["segment", "kind"],
             "recoveries"),
            ("blocktable_recovery_failures", "Recovery attempts that had to be retried",
             ["segment", "reason"], "recovery_failures"),
            ("blocktable_registrations", "Clients registered over the socket", ["segment"],
             "registrations"))
    for name, doc, labels, key in fams:
        fam = C(name, doc, labels=labels)
        for lab, n in s[key].items():
            fam.add_metric(list(lab) if isinstance(lab, tuple) else [lab], n)
        yield fam


class Metrics:
    """The registry (the snapshot's collector, the process collector, the recovery
    histograms) and its
    HTTP endpoint; start/stop follow the config (HUP can move it). Errors: the
    constructor raises ImportError without prometheus-client; start raises
    OSError (address in use...). observe_recovery is thread-safe."""

    def __init__(self, collector):
        from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        self.pause = Histogram("blocktable_recovery_pause_seconds",
                               "How long a recovery froze the segment (recoveries that froze "
                               "it only)", ["segment"], buckets=PAUSE_BUCKETS,
                               registry=self.registry)
        self.latency = Histogram("blocktable_recovery_latency_seconds",
                                 "From a client's death noticed to its holdings free",
                                 ["segment"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.addr = None
        self._srv = None

    def observe_recovery(self, segment, kind, pause, latency):
        """A recovery finished; pause (seconds) is 0 when it froze nothing."""
        if pause > 0:
            self.pause.labels(segment).observe(pause)
        self.latency.labels(segment).observe(latency)

    def start(self, host, port):
        from prometheus_client import start_http_server
        self._srv, _thread = start_http_server(port, host, registry=self.registry)
        self.addr = (host, self._srv.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]",
                 self.addr[1])

    def stop(self):
        if self._srv is not None:
            srv, self._srv = self._srv, None
            srv.shutdown()              # waits up to serve_forever's poll (0.5 s)
            srv.server_close()
            self.addr = None
