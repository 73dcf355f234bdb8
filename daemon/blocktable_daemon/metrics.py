"""Prometheus metrics (opt-in: --metrics HOST:PORT).

The daemon's state is the one source of truth: the main loop publishes a
plain snapshot (Stats.publish) after each tick and event, and this collector
renders the latest one at scrape time, on prometheus-client's HTTP thread.
That thread never touches a segment or the loop's own structures.
"""
import bisect
import logging

log = logging.getLogger("btd")

# Histogram bounds, seconds: recovery pauses are micro- to milliseconds.
PAUSE_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.5, 1.0)
LATENCY_BUCKETS = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)


# prometheus-client adds _total to each counter's name.
CACHE_DOCS = {"queries": "Prefix-cache lookups (block hashes looked up)",
              "hits": "Prefix-cache lookups that found a cached block",
              "stored": "Block hashes stored in the prefix cache",
              "evicted": "Block hashes evicted (their block taken for new data)",
              "blocks_evicted": "Cached blocks evicted",
              "resets": "Cache pool resets (its engine stopped or died, or reset_prefix_cache)"}


class Hist:
    """Cumulative bucket counts, like a Prometheus histogram."""

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v):
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.n += 1

    def buckets(self):
        out, acc = [], 0
        for bound, c in zip([*map(str, self.bounds), "+Inf"], self.counts):
            acc += c
            out.append((bound, acc))
        return out


class Collector:
    """Renders the latest snapshot; see server.Daemon.snapshot for its keys."""

    def __init__(self):
        self.snap = {}

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        s = self.snap
        if not s:
            return
        free = GaugeMetricFamily("bt_blocks_free", "Free blocks per pool (not counting cached ones)", labels=["segment", "pool"])
        used = GaugeMetricFamily("bt_blocks_used", "Allocated blocks per pool", labels=["segment", "pool"])
        rows = GaugeMetricFamily("bt_rows_used", "Claimed rows", labels=["segment"])
        clients = GaugeMetricFamily("bt_clients", "Client slots by state", labels=["segment", "state"])
        stuck = GaugeMetricFamily("bt_stuck_clients", "Live clients stuck inside a call, holding up a repair",
                                  labels=["segment"])
        pending = GaugeMetricFamily("bt_pending_recoveries", "Dead clients not yet fully recovered",
                                    labels=["segment"])
        ops = CounterMetricFamily("bt_client_ops", "Data-path calls made by clients (from their slots)",
                                  labels=["segment"])
        # Cache pools (an engine's BlockPool and prefix cache in the segment): blocks that are
        # free but still hold a prefix, and the prefix-cache counters, per segment and pool.
        cached = GaugeMetricFamily("bt_blocks_cached", "Free blocks that still hold a cached "
                                   "prefix (cache pools)", labels=["segment", "pool"])
        cache_c = {k: CounterMetricFamily("bt_prefix_cache_" + k, doc, labels=["segment", "pool"])
                   for k, doc in CACHE_DOCS.items()}
        for seg in s["segments"]:
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

        reqs = CounterMetricFamily("bt_requests", "Control requests", labels=["cmd"])
        for cmd, n in s["requests"].items():
            reqs.add_metric([cmd], n)
        errs = CounterMetricFamily("bt_request_errors", "Control requests answered with an error",
                                   labels=["cmd", "error"])
        for (cmd, name), n in s["request_errors"].items():
            errs.add_metric([cmd, name], n)
        recs = CounterMetricFamily("bt_recoveries", "Dead clients recovered", labels=["segment", "kind"])
        for (seg, kind), n in s["recoveries"].items():
            recs.add_metric([seg, kind], n)
        fails = CounterMetricFamily("bt_recovery_failures", "Recovery attempts that had to be retried",
                                    labels=["segment", "reason"])
        for (seg, reason), n in s["recovery_failures"].items():
            fails.add_metric([seg, reason], n)
        regs = CounterMetricFamily("bt_registrations", "Clients registered over the socket",
                                   labels=["segment"])
        for seg, n in s["registrations"].items():
            regs.add_metric([seg], n)
        yield from (reqs, errs, recs, fails, regs)
        for name, doc, h in (("bt_recovery_pause_seconds", "How long a recovery froze the segment",
                              s["pause_hist"]),
                             ("bt_recovery_latency_seconds", "From a client's death noticed to its "
                              "holdings free", s["latency_hist"])):
            fam = HistogramMetricFamily(name, doc)
            fam.add_metric([], h["buckets"], h["sum"])
            yield fam


class Server:
    """The HTTP endpoint; start/stop follow the config (HUP can move it)."""

    def __init__(self, collector):
        from prometheus_client import CollectorRegistry
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.addr = None
        self._srv = None

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
