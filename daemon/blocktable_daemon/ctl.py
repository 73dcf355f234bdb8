"""bt-ctl: the operator's command line for btd.

    bt-ctl COMMAND [ARGS] [--socket PATH] [--json] [--timeout S]

Commands come from blocktable_daemon.commands (each holds its request and its rendering),
plus three of bt-ctl's own: `watch` (rates and pool use over time, from btd's status and
stats), `orphans` (segments in /dev/shm that nobody serves, listed or removed; local, no
btd needed) and `completion` (a shell completion script). The global flags go before or
after the command. Human tables by default; --json prints the result object with stable
keys. Exit codes: 0 ok, 1 error (an error reply, fsck found problems, an orphan not
removed), 2 usage, 3 btd not running. $BT_SOCKET picks the daemon when --socket is not given.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from typing import Any, Callable, Deque, Dict, List, Optional, TextIO

from blocktable.connect import (DaemonDisconnected, DaemonError, DaemonNotRunning,
                                default_socket_path, request)

from . import commands, orphans

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
EPILOG = "exit codes: 0 ok, 1 error (or fsck found problems), 2 usage, 3 btd not running"

POSITIVE, NON_NEGATIVE_INT = commands.number(float, 0, False), commands.number(int, 0, True)
POSITIVE_INT = commands.number(int, 1, True)
SHELLS = ("bash", "zsh", "tcsh")
# bt-ctl's own commands: they run here, not as a request to btd.
LOCAL = ("watch", "orphans", "completion")


def _global_flags(p: argparse.ArgumentParser, defaults: bool) -> None:
    """--socket, --json, --timeout. The top-level parser holds the defaults; each
    subcommand repeats the flags with SUPPRESS as default, so `bt-ctl status --json`
    works and a subcommand never overwrites a flag given before it (`bt-ctl --json status`)."""
    def d(v: Any) -> Any:
        return v if defaults else argparse.SUPPRESS
    a = p.add_argument("--socket", "-s", default=d(None), metavar="PATH",
                       help="btd's socket (default: $BT_SOCKET, then the standard places)")
    setattr(a, "complete", {"bash": "_shtab_compgen_files", "zsh": "_files",  # shtab.FILE
                            "tcsh": "f"})
    p.add_argument("--json", action="store_true", default=d(False),
                   help="print the result as JSON")
    p.add_argument("--timeout", type=POSITIVE, default=d(10.0), metavar="S",
                   help="seconds to wait for btd (10)")


def parser() -> argparse.ArgumentParser:
    """bt-ctl's argument parser (also what the completion scripts are made from)."""
    from blocktable import __version__
    p = argparse.ArgumentParser(prog="bt-ctl", description="Talk to btd, the blocktable daemon.",
                                epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"bt-ctl (blocktable) {__version__}")
    _global_flags(p, True)
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, False)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def add(name: str, help: str, description: Optional[str] = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description or help,
                              parents=[common], epilog=EPILOG)
    for name, cmd in commands.CLI.items():
        cmd.add_arguments(add(name, cmd.help))
    w = add("watch", "rates and pool use over time",
            "every --interval seconds: data-path calls, blocks taken and returned, "
            "registrations and recoveries per second since the last sample, and each pool's "
            "use now and over the last --history samples")
    w.add_argument("--interval", "-n", type=POSITIVE, default=1.0, metavar="S",
                   help="seconds between samples (1)")
    w.add_argument("--count", type=NON_NEGATIVE_INT, default=0,
                   help="stop after N samples (0: never)")
    w.add_argument("--history", type=POSITIVE_INT, default=30, metavar="N",
                   help="samples kept for the picture of pool use (30)")
    w.add_argument("--segment", "-S", help="only this segment")
    o = add("orphans", "segments in /dev/shm that no live process owns (local; no btd needed)",
            "list /dev/shm/bt.* segments whose owner (the btd or process that created or "
            "adopted it) is dead, with who still maps them; --remove unlinks them")
    o.add_argument("--remove", action="store_true",
                   help="unlink them: the orphans named, or every orphan when none is named; "
                   "a segment whose owner lives or which a live process maps is refused")
    o.add_argument("names", nargs="*", metavar="NAME", help="segment names (without bt.)")
    c = add("completion", "print a shell completion script (bash, zsh, tcsh)",
            "print a completion script for SHELL, e.g. bt-ctl completion bash > "
            "/etc/bash_completion.d/bt-ctl, or eval \"$(bt-ctl completion bash)\" in ~/.bashrc")
    c.add_argument("shell", choices=SHELLS)
    return p


def subcommands() -> List[str]:
    """Every command bt-ctl offers, in --help's order."""
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def call(ns: argparse.Namespace, name: str, args: Dict[str, Any]) -> Dict[str, Any]:
    return request(name, args, socket=ns.socket, timeout=ns.timeout)


def run_one(ns: argparse.Namespace, out: TextIO) -> int:
    cmd = commands.CLI[ns.cmd]
    result = call(ns, ns.cmd, cmd.request_args(ns))
    if ns.json:
        out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        out.write(cmd.render(result, ns) + "\n")
    return cmd.exit_code(result)


# ---- watch ---------------------------------------------------------------------------------
SPARK = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-:=+*#"


class Watch:
    """Turns successive samples of btd's `status` and `stats` into frames: per segment the
    counters' change since the previous sample and its rate per second, and per pool the
    blocks used / cached / free now and the used fraction over the last `history` samples.

    What is counted: `calls` are the clients' data-path calls (each slot's ops counter,
    those of freed slots included); `taken` and `returned` are the net change of each pool's
    used blocks between two samples (a block taken and returned in between is not seen);
    `registrations` and `recoveries` are btd's counters. A frame with no previous sample,
    or after btd restarted (counters went back), has None for every change and rate.
    Not thread-safe (one per bt-ctl)."""

    def __init__(self, history: int = 30, segment: Optional[str] = None) -> None:
        self.history = history
        self.segment = segment
        self.prev: Optional[Dict[str, Any]] = None
        self.used: Dict[Any, Deque[float]] = {}
        self.n = 0

    @staticmethod
    def sample(fetch: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
        """One sample: fetch(name) returns the result of btd's command `name`."""
        t = time.monotonic()
        status, stats = fetch("status"), fetch("stats")
        return {"t": (t + time.monotonic()) / 2, "time": time.time(), "status": status,
                "stats": stats}

    def step(self, cur: Dict[str, Any]) -> Dict[str, Any]:
        """The frame for sample `cur`, against the previous sample given to step()."""
        prev = self.prev
        if prev is not None and prev["status"]["pid"] != cur["status"]["pid"]:
            prev = None                     # btd restarted: its counters started again
        dt = cur["t"] - prev["t"] if prev else None
        old = {s["name"]: s for s in prev["status"]["segments"]} if prev else {}
        segs = []
        for s in cur["status"]["segments"]:
            if self.segment is not None and s["name"] != self.segment:
                continue
            segs.append(self._segment(s, old.get(s["name"]), cur, prev, dt))
        self.prev = cur
        self.n += 1
        st = cur["status"]
        return {"time": cur["time"], "sample": self.n, "dt_s": dt, "btd_pid": st["pid"],
                "version": st["version"], "segments": segs}

    def _segment(self, s: Dict[str, Any], o: Optional[Dict[str, Any]], cur: Dict[str, Any],
                 prev: Optional[Dict[str, Any]], dt: Optional[float]) -> Dict[str, Any]:
        name = s["name"]
        counters = {"calls": s.get("client_ops", 0),
                    "registrations": cur["stats"].get("registrations", {}).get(name, 0),
                    "recoveries": _recoveries(cur["stats"], name)}
        deltas: Dict[str, Optional[int]] = dict.fromkeys(
            ["calls", "taken", "returned", "registrations", "recoveries"])
        if o is not None and prev is not None:
            before = {"calls": o.get("client_ops", 0),
                      "registrations": prev["stats"].get("registrations", {}).get(name, 0),
                      "recoveries": _recoveries(prev["stats"], name)}
            d = {k: counters[k] - before[k] for k in counters}
            if all(v >= 0 for v in d.values()):
                net = [p["used"] - q["used"] for p, q in zip(s["pools"], o["pools"])]
                deltas = {**d, "taken": sum(x for x in net if x > 0),
                          "returned": sum(-x for x in net if x < 0)}
        rates = {k + "_per_s": (None if v is None or not dt else v / dt)
                 for k, v in deltas.items()}
        live = s["clients"].get("active", 0) + s["clients"].get("reserved", 0)
        pools = []
        old_pools = {p["pool"]: p for p in (o["pools"] if o else [])}
        for p in s["pools"]:
            h = self.used.setdefault((name, p["pool"]),
                                     collections.deque(maxlen=self.history))
            frac = p["used"] / p["blocks"] if p["blocks"] else 0.0
            h.append(round(frac, 4))
            pool = {k: p.get(k) for k in ("pool", "kind", "blocks", "used", "cached", "free")}
            pool["used_history"] = list(h)
            q = old_pools.get(p["pool"])
            if p.get("cache") and q is not None and q.get("cache") and deltas["calls"] is not None:
                pool["lookups"] = p["cache"]["queries"] - q["cache"]["queries"]
                pool["hits"] = p["cache"]["hits"] - q["cache"]["hits"]
            pools.append(pool)
        return {"name": name, "clients": live, "counters": counters, "deltas": deltas,
                "rates": rates, "pools": pools}


def _recoveries(stats: Dict[str, Any], seg: str) -> int:
    return sum(v for k, v in stats.get("recoveries", {}).items() if k.rsplit(":", 1)[0] == seg)


def bar(p: Dict[str, Any], width: int = 30) -> str:
    """One pool now: '#' used, '~' cached (free, holding a prefix), '.' free."""
    n = max(p["blocks"], 1)
    u = round(p["used"] / n * width)
    c = round((p["used"] + (p["cached"] or 0)) / n * width) - u
    return "[" + "#" * u + "~" * c + "." * (width - u - c) + "]"


def sparkline(values: List[float], chars: str = SPARK) -> str:
    """Fractions 0..1 as one character each, on a fixed scale (0 lowest, 1 full)."""
    top = len(chars) - 1
    return "".join(chars[min(top, max(0, round(v * top)))] for v in values)


def _rate(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}/s"


def render_frame(f: Dict[str, Any], interval: float, chars: str = SPARK) -> str:
    head = (time.strftime("%H:%M:%S", time.localtime(f["time"])) +
            f"  btd {f['version']} pid {f['btd_pid']}  sample {f['sample']}, every {interval:g} s")
    lines = [head]
    if not f["segments"]:
        lines.append("no segments")
    for s in f["segments"]:
        r, d = s["rates"], s["deltas"]
        lines.append(f"segment {s['name']}: {s['clients']} clients")
        if f["dt_s"] is None or d["calls"] is None:
            lines.append("  rates from the next sample on")
        else:
            lines.append(f"  calls {_rate(r['calls_per_s'])}  blocks taken "
                         f"{_rate(r['taken_per_s'])}  returned {_rate(r['returned_per_s'])}  "
                         f"registrations +{d['registrations']}  recoveries +{d['recoveries']}"
                         f"  (last {f['dt_s']:.2f} s)")
        rows = []
        for p in s["pools"]:
            hit = (f"{100.0 * p['hits'] / p['lookups']:.0f}% of {p['lookups']}"
                   if p.get("lookups") else None)
            rows.append([p["pool"], p["kind"], p["used"], p["cached"], p["free"], bar(p),
                         f"{100.0 * p['used'] / max(p['blocks'], 1):.1f}",
                         sparkline(p["used_history"], chars)] + ([hit] if any(
                             q.get("kind") == "cache" for q in s["pools"]) else []))
        heads = ["POOL", "KIND", "USED", "CACHED", "FREE", "NOW (#used ~cached .free)",
                 "USED%", f"USED% OVER THE LAST {len(s['pools'][0]['used_history'])} SAMPLES"
                 if s["pools"] else "HISTORY"]
        if any(q.get("kind") == "cache" for q in s["pools"]):
            heads.append("HITS")
        lines.append(_indent(commands.table(heads, rows)))
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + x for x in text.splitlines())


def watch(ns: argparse.Namespace, out: TextIO) -> int:
    w = Watch(ns.history, ns.segment)
    clear = out.isatty() and not ns.json
    enc = (getattr(out, "encoding", None) or "").lower().replace("-", "")
    chars = SPARK if enc.startswith("utf8") else SPARK_ASCII
    while True:
        f = w.step(Watch.sample(lambda name: call(ns, name, {})))
        if ns.segment is not None and not f["segments"]:
            raise DaemonError(0, "ENOENT", f"btd serves no segment {ns.segment!r}")
        if ns.json:
            out.write(json.dumps(f, sort_keys=True) + "\n")
        else:
            if clear:
                out.write("\x1b[H\x1b[2J")
            out.write(render_frame(f, ns.interval, chars) + "\n")
            if not clear:
                out.write("\n")
        out.flush()
        if ns.count and w.n >= ns.count:
            return EXIT_OK
        time.sleep(ns.interval)


# ---- completion, orphans ------------------------------------------------------------------
def completion(ns: argparse.Namespace, out: TextIO) -> int:
    """A static script made by shtab from this parser: Tab never starts Python."""
    try:
        import shtab
    except ImportError:
        raise OSError("bt-ctl completion needs shtab: pip install 'blocktable[daemon]'") \
            from None
    out.write(shtab.complete(parser(), shell=ns.shell))
    return EXIT_OK


def orphans_cmd(ns: argparse.Namespace, out: TextIO) -> int:
    found = orphans.scan()
    if not ns.remove:
        if ns.names:
            found = [o for o in found if o["name"] in ns.names]
        result: Dict[str, Any] = {"segments": found}
        if ns.json:
            out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        else:
            out.write(orphans.render(found) + "\n")
        return EXIT_OK
    result = orphans.remove(ns.names or None, found)
    if ns.json:
        out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        out.write(orphans.render_removal(result) + "\n")
    return EXIT_OK if not result["refused"] else EXIT_ERROR


def fail(ns: argparse.Namespace, status: int, name: str, message: str) -> int:
    """An error: one line on stderr, or with --json a JSON object on stdout
    ({"error": {"name", "message"}}) so that scripts read one format."""
    if ns.json:
        print(json.dumps({"error": {"name": name, "message": message}}, sort_keys=True))
    else:
        print(f"bt-ctl: {message}", file=sys.stderr)
    return status


def main(argv: Optional[List[str]] = None) -> int:
    ns = parser().parse_args(argv)
    if ns.socket is None:
        ns.socket = default_socket_path()
    try:
        if ns.cmd == "watch":
            return watch(ns, sys.stdout)
        if ns.cmd == "completion":
            return completion(ns, sys.stdout)
        if ns.cmd == "orphans":
            return orphans_cmd(ns, sys.stdout)
        return run_one(ns, sys.stdout)
    except DaemonNotRunning as e:
        return fail(ns, EXIT_NOT_RUNNING, "ENOTRUNNING", e.strerror or str(e))
    except DaemonError as e:
        return fail(ns, EXIT_ERROR, e.name, f"{ns.cmd}: {e}")
    except DaemonDisconnected as e:
        return fail(ns, EXIT_ERROR, "EDISCONNECTED", f"{ns.cmd}: {e.strerror}; try again")
    except (OSError, ValueError) as e:
        return fail(ns, EXIT_ERROR, type(e).__name__, f"{ns.cmd}: {e}")
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
