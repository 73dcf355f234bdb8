"""The control commands, one class each: its arguments, its server side
(execute, run by btd's loop) and its rendering (bt-ctl's table). The result
of execute is what `bt-ctl CMD --json` prints: its keys are stable.

Arguments are checked by type before execute runs (EARGS otherwise); bool
is not an int here, and unknown arguments are refused.
"""
import argparse

from . import clib
from .model import PROBLEM_KEYS, row_dict as _row_dict, row_kind, slot_pids  # noqa: F401
from .procfs import proc_title
from .protocol import RequestError

REQUIRED = object()
SERVER = {}         # name -> Command, what btd answers
CLI = {}            # name -> Command, what bt-ctl offers


def command(cls):
    inst = cls()
    if cls.server:
        SERVER[cls.name] = inst
    if cls.cli:
        CLI[cls.name] = inst
    return cls


class Command:
    name = ""
    help = ""
    server = True
    cli = True
    args = {}           # name -> (type, default or REQUIRED)

    def check_args(self, args):
        unknown = set(args) - set(self.args)
        if unknown:
            raise RequestError("EARGS", f"{self.name}: unknown arguments {sorted(unknown)} "
                                        f"(takes {', '.join(self.args) or 'none'})")
        out = {}
        for key, (typ, default) in self.args.items():
            if key not in args or (args[key] is None and default is not REQUIRED):
                if default is REQUIRED:
                    raise RequestError("EARGS", f"{self.name}: {key} is required")
                out[key] = default
                continue
            v = args[key]
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise RequestError("EARGS", f"{self.name}: {key} must be {typ.__name__}, "
                                            f"got {type(v).__name__}")
            out[key] = v
        return out

    def execute(self, daemon, conn, args):
        raise NotImplementedError

    # ---- bt-ctl side ----
    def add_arguments(self, parser):
        pass

    def request_args(self, ns):
        return {}

    def render(self, result, ns):
        raise NotImplementedError

    def exit_code(self, result):
        return 0


def _seg_arg(parser):
    parser.add_argument("--segment", "-S", help="only this segment")


class SegmentCommand(Command):
    """A bt-ctl command about one served segment (--segment) or all of them; subclasses
    add their own arguments after these."""
    args: dict[str, tuple[type, object]] = {"segment": (str, None)}

    def add_arguments(self, p):
        _seg_arg(p)

    def request_args(self, ns):
        return {"segment": ns.segment}


# ---- rendering helpers ----------------------------------------------------------------
def table(headers, rows):
    """Aligned columns; numbers right-aligned."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    num = [bool(rows) and all(_numeric(r[i]) for r in rows) for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if n else v.ljust(w)
                         for v, w, n in zip(vals, widths, num)).rstrip()
    return "\n".join([line(headers)] + [line(r) for r in cells])


def _numeric(v):
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    try:
        float(v)
        return isinstance(v, str)
    except (TypeError, ValueError):
        return False


def _cell(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _ms(ns):
    return round(ns / 1e6, 3)


# ---- argument types (bt-ctl) --------------------------------------------------------------
def number(kind, low, inclusive):
    """An argparse type: a number >= low (> low unless inclusive), else a usage error."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if v < low or (v == low and not inclusive):
            raise argparse.ArgumentTypeError(
                f"{text} must be {'at least' if inclusive else 'more than'} {low}")
        return v
    return parse


# ---- the commands --------------------------------------------------------------------------
@command
class Register(Command):
    name = "register"
    help = "reserve a client slot for the calling process (blocktable.connect)"
    cli = False
    args = {"segment": (str, None)}

    def execute(self, daemon, conn, args):
        m = daemon.segment(args["segment"])
        slot = daemon.register(conn, m)
        return {"segment": m.name, "slot": slot, "pid": conn.pid, "shm": "/dev/shm" + m.shm_path}


@command
class Create(Command):
    """Serve segment `segment`, creating it from `config` (bt_config fields; the rest default)
    if btd does not serve it yet. An engine calls this at start (blocktable.connect(...,
    create=...)) so that its segment is sized from its own KV-cache configuration. A created
    segment is owned, watched, recovered and shown like a configured one until btd stops (it is
    not written to btd's config file; a reload leaves it served).

    If btd serves the name already: created=false, unless the segment is too small for what is
    asked (blocks_per_pool, num_rows, row_width below it) or differs in block_size or lacks the
    cache pools asked for: then BT_ECONFIG naming both sizes; nothing changes."""
    name = "create"
    help = "serve a segment, creating it with this config if it is not served yet"
    cli = False
    args = {"segment": (str, REQUIRED), "config": (dict, REQUIRED)}

    def execute(self, daemon, conn, args):
        from . import config as config_mod
        name, asked = args["segment"], args["config"]
        try:
            config_mod.check_name(name)
            scfg = config_mod.segment_config(name, asked)
        except (config_mod.ConfigError, ValueError) as e:
            raise RequestError("BT_ECONFIG", str(e), code=int(clib.ECONFIG)) from None
        m = daemon.find_segment(name)
        created = m is None
        if created:
            m = daemon.create_segment(name, scfg)
            short = too_small(name, m.seg.config, asked)
            if short:                   # an adopted leftover smaller than asked
                daemon.drop_segment(m)
                raise RequestError("BT_ECONFIG", short, code=int(clib.ECONFIG))
            created = m.created
        else:
            short = too_small(name, m.seg.config, asked)
            if short:
                raise RequestError("BT_ECONFIG", short, code=int(clib.ECONFIG))
        return {"segment": name, "created": created,
                "config": {k: getattr(m.seg.config, k) for k in clib.CFG_KEYS}}


# What an engine's ask is compared on: at least this many ...
_AT_LEAST = ("blocks_per_pool", "num_rows", "row_width", "num_pools")
# ... and exactly this (the KV layout the engine computes with).
_EQUAL = ("block_size",)


def too_small(name, have, asked):
    """None if segment `name` of config `have` serves what `asked` (a dict) asks, else the
    BT_ECONFIG message naming both sizes."""
    bad = [k for k in _AT_LEAST if k in asked and getattr(have, k) < asked[k]]
    bad += [k for k in _EQUAL if k in asked and getattr(have, k) != asked[k]]
    if asked.get("cache_pools") and getattr(have, "cache_pools", 0) < asked["cache_pools"]:
        bad.append("cache_pools")
    if not bad:
        return None
    keys = [k for k in (*_AT_LEAST, *_EQUAL, "cache_pools") if k in asked]
    hs = ", ".join(f"{k}={getattr(have, k, 0)}" for k in keys)
    ws = ", ".join(f"{k}={asked[k]}" for k in keys)
    return (f"segment {name!r} has {hs}; the engine needs {ws} "
            f"(too small or different: {', '.join(bad)}); use another segment name, or stop "
            f"its users and remove it so that it is created anew")


@command
class Status(Command):
    name = "status"
    help = "the daemon and its segments"

    def execute(self, daemon, conn, args):
        return daemon.status()

    def render(self, r, ns):
        head = [f"btd {r['version']}  pid {r['pid']}  up {r['uptime_s']:.0f} s",
                f"socket   {r['socket']}",
                f"metrics  {r['metrics'] or 'off'}",
                f"recovered clients  {r['recoveries']}"]
        cs = r.get("connections")
        if cs:
            head.append(f"connections  {cs['open']} open, at most {cs['cap']} ({cs['per_uid_cap']} "
                        f"per uid; {cs['fd_limit']} descriptors); {cs['evicted']} closed to make "
                        f"room, {cs['refused']} refused")
        head.append("")
        rows = []
        for s in r["segments"]:
            c = s["config"]
            live = s["clients"]["active"] + s["clients"]["reserved"]
            rows.append([s["name"], s["shm"], s["size"], c["num_pools"], s["blocks_used"],
                         s.get("blocks_cached", 0), s["blocks_free"],
                         f"{s['rows_used']}/{s['rows_total']}", live,
                         s["generation"], s["pending_recoveries"], len(s["stuck"])])
        out = "\n".join(head) + table(["SEGMENT", "SHM", "BYTES", "POOLS", "USED", "CACHED",
                                       "FREE", "ROWS", "CLIENTS", "GEN", "RECOVERING", "STUCK"],
                                      rows)
        for s in r["segments"]:
            for st in s["stuck"]:
                out += (f"\nwarning: segment {s['name']}: client {st['slot']} (pid {st['pid']}, "
                        f"state {st['proc_state']}) is stuck inside a call; the recovery of "
                        f"client {st['blocking_slot']} waits for it")
        return out


@command
class Clients(SegmentCommand):
    name = "clients"
    help = "client slots in use"

    def execute(self, daemon, conn, args):
        return {"clients": [c for m in daemon.served(args["segment"]) for c in daemon.clients(m)]}

    def render(self, r, ns):
        return table(["SEGMENT", "SLOT", "STATE", "PID", "PROCESS", "PROC", "IN_OP", "HAND",
                      "ROWS", "OPS", "NOTE"],
                     [[c["segment"], c["slot"], c["state"], c["pid"], c.get("process"),
                       c["proc_state"], c["in_op"], c["hand"], c["rows"], c["ops"], c["note"]]
                      for c in r["clients"]])


@command
class Pools(SegmentCommand):
    name = "pools"
    help = "blocks per pool: used, cached (free, holding a prefix) and free"

    def execute(self, daemon, conn, args):
        out = []
        for m in daemon.served(args["segment"]):
            for p in daemon.summary(m)["pools"]:
                out.append({"segment": m.name, **p})
        return {"pools": out}

    def render(self, r, ns):
        rows = []
        for p in r["pools"]:
            cache = p.get("cache")
            hit = (f'{100.0 * cache["hits"] / cache["queries"]:.1f}'
                   if cache and cache["queries"] else None)
            kind = p.get("kind", "stack") + (f' ({p["error"]})' if p.get("error") else "")
            rows.append([p["segment"], p["pool"], kind, p["blocks"], p["used"],
                         p["cached"] if cache else None, p["free"],
                         f'{100.0 * p["used"] / max(p["blocks"], 1):.1f}',
                         p.get("owner_pid"), cache["queries"] if cache else None,
                         cache["hits"] if cache else None, hit,
                         cache["blocks_evicted"] if cache else None])
        heads = ["SEGMENT", "POOL", "KIND", "BLOCKS", "USED", "CACHED", "FREE", "USED%",
                 "ENGINE", "QUERIES", "HITS", "HIT%", "EVICTED"]
        if not any(p.get("kind") == "cache" for p in r["pools"]):   # no cache pool: plain
            keep = [0, 1, 3, 4, 6, 7]
            heads = [heads[i] for i in keep]
            rows = [[x[i] for i in keep] for x in rows]
        return table(heads, rows)


@command
class Rows(SegmentCommand):
    name = "rows"
    help = "claimed rows"
    args = {**SegmentCommand.args, "owner": (int, None), "limit": (int, 10000)}

    def add_arguments(self, p):
        super().add_arguments(p)
        p.add_argument("--owner", type=int, metavar="PID", help="only rows of this process")
        p.add_argument("--limit", type=number(int, 1, True), default=10000,
                       help="at most this many (10000)")

    def request_args(self, ns):
        return {**super().request_args(ns), "owner": ns.owner, "limit": ns.limit}

    def execute(self, daemon, conn, args):
        out, truncated, titles = [], False, {}
        for m in daemon.served(args["segment"]):
            pids = slot_pids(m)
            for row in range(m.seg.config.num_rows):
                info = m.seg.row_info(row)
                if info.owner == 0:
                    continue
                pid = pids.get(info.owner)
                if args["owner"] is not None and pid != args["owner"]:
                    continue
                if len(out) >= args["limit"]:
                    truncated = True
                    break
                if pid not in titles:
                    titles[pid] = proc_title(pid) if pid else None
                out.append({**_row_dict(m.name, row, info, pid), "process": titles[pid]})
        return {"rows": out, "truncated": truncated}

    def render(self, r, ns):
        # A raw row's key is the writer's request key (an engine hashes its request id into
        # 64 bits): hex, fixed width, reads better than 20 decimal digits.
        out = table(["SEGMENT", "ROW", "SLOT", "PID", "PROCESS", "KEY", "KIND", "BLOCKS",
                     "TOKENS", "GEN"],
                    [[x["segment"], x["row"], x["slot"], x["pid"], x.get("process"),
                      f'{x["key"]:#018x}' if x["kind"] == "raw" else x["key"], x["kind"],
                      x["num_blocks"], x["num_tokens"], x["generation"]] for x in r["rows"]])
        return out + ("\n(truncated: --limit)" if r["truncated"] else "")


@command
class Row(SegmentCommand):
    name = "row"
    help = "one row and its block ids"
    args = {**SegmentCommand.args, "row": (int, REQUIRED)}

    def add_arguments(self, p):
        super().add_arguments(p)
        p.add_argument("row", type=int, metavar="N")

    def request_args(self, ns):
        return {**super().request_args(ns), "row": ns.row}

    def execute(self, daemon, conn, args):
        m = daemon.segment(args["segment"])
        n = args["row"]
        if not 0 <= n < m.seg.config.num_rows:
            raise RequestError("ENOENT", f"row {n} is out of range [0, {m.seg.config.num_rows})")
        ids, info = m.seg.read_row(n)
        pid = m.slot(info.owner).pid if info.owner else None
        return {**_row_dict(m.name, n, info, pid), "blocks": [int(x) for x in ids]}

    def render(self, r, ns):
        head = [f"segment {r['segment']}  row {r['row']}  generation {r['generation']}",
                f"owner    {'slot %d, pid %s' % (r['slot'], r['pid']) if r['slot'] else 'free'}",
                f"key      {r['key']}  ({r['kind']})",
                f"blocks   {r['num_blocks']}   tokens {r['num_tokens']}"]
        ids = r["blocks"]
        for i in range(0, len(ids), 16):
            head.append(f"  [{i:5d}] " + " ".join(str(x) for x in ids[i:i + 16]))
        return "\n".join(head)


@command
class Stats(Command):
    name = "stats"
    help = "requests, registrations, recoveries and their pauses"

    def execute(self, daemon, conn, args):
        return daemon.stats_report()

    def render(self, r, ns):
        lines = [f"recoveries       {r['recoveries_total']}"]
        for k, v in sorted(r["recoveries"].items()):
            lines.append(f"  {k:<28} {v}")
        for k, v in sorted(r["recovery_failures"].items()):
            lines.append(f"  retried {k:<20} {v}")
        for what in ("pause_ms", "latency_ms"):
            d = r[what]
            if not d["n"]:
                lines.append(f"{what:<16} n=0 (" + ("no recoveries yet)" if not r["recoveries_total"]
                                                    or what != "pause_ms" else
                                                    "no recovery has paused clients)"))
            else:
                lines.append(f"{what:<16} n={d['n']} p50={d['p50']} p99={d['p99']} "
                             f"max={d['max']} (last 256 recoveries)")
        lines.append("client ops       " + ", ".join(f"{k}={v}" for k, v in r["client_ops"].items()))
        lines.append("registrations    " + (", ".join(f"{k}={v}" for k, v in
                                                     r["registrations"].items()) or "0"))
        lines.append("requests         " + ", ".join(f"{k}={v}" for k, v in
                                                     sorted(r["requests"].items())))
        if r["request_errors"]:
            lines.append("request errors   " + ", ".join(f"{k}={v}" for k, v in
                                                         sorted(r["request_errors"].items())))
        return "\n".join(lines)


@command
class Fsck(SegmentCommand):
    name = "fsck"
    help = "check a segment exactly (a short freeze); --repair rebuilds counts and lists"
    args = {**SegmentCommand.args, "repair": (bool, False), "wait_ms": (int, 1000)}

    def add_arguments(self, p):
        super().add_arguments(p)
        p.add_argument("--repair", action="store_true",
                       help="rebuild counts and free lists, reap dead clients")
        p.add_argument("--wait-ms", type=int, default=1000,
                       help="how long to wait for clients inside a call (1000)")

    def request_args(self, ns):
        return {**super().request_args(ns), "repair": ns.repair, "wait_ms": ns.wait_ms}

    def execute(self, daemon, conn, args):
        out = []
        for m in daemon.served(args["segment"]):
            rc, r = daemon.fsck(m, args["repair"], max(0, args["wait_ms"]))
            problems = {k: r[k] for k in PROBLEM_KEYS if r[k]}
            out.append({"segment": m.name, "ok": rc == 0 and not (problems and not args["repair"]),
                        "error": None if rc == 0 else clib.errname(rc),
                        "repaired": bool(args["repair"] and rc == 0), "problems": problems,
                        "report": r})
        return {"segments": out, "ok": all(s["ok"] for s in out)}

    def render(self, r, ns):
        rows = []
        for s in r["segments"]:
            rep = s["report"]
            if s["error"]:
                verdict = f"not checked: {s['error']}"
                if rep["stuck_client"]:
                    verdict += f" (client {rep['stuck_client']} stuck inside a call)"
            elif s["problems"]:
                fixed = ", ".join(f"{k}={v}" for k, v in s["problems"].items())
                verdict = ("repaired: " if s["repaired"] else "PROBLEMS: ") + fixed
            else:
                verdict = "clean" + (" (repaired)" if s["repaired"] else "")
            rows.append([s["segment"], rep["blocks_free"], rep["blocks_held"],
                         rep["clients_reaped"], _ms(rep["pause_ns"]), verdict])
        return table(["SEGMENT", "FREE", "HELD", "REAPED", "PAUSE_MS", "VERDICT"], rows)

    def exit_code(self, result):
        return 0 if result["ok"] else 1


@command
class Reload(Command):
    name = "reload"
    help = "re-read the config file (as SIGHUP does)"

    def execute(self, daemon, conn, args):
        return daemon.reload()

    def render(self, r, ns):
        if r.get("error"):
            return f"reload failed: {r['error']}"
        return (f"changed: {', '.join(r['changed']) or 'nothing'}; new segments: "
                f"{', '.join(r.get('segments_added') or []) or 'none'}")

    def exit_code(self, result):
        return 1 if result.get("error") else 0
