"""btd's configuration: defaults, then a TOML file (--config), then flags.

With nothing given btd serves one segment, "default", of bt_config_default's
size. A file can name several:

    socket = "/run/blocktable/btd.sock"    # default: see choose_socket_path
    socket_mode = "0660"                   # 0660 or stricter
    allow_uids = [1001]                    # besides btd's own uid and root
    allow_groups = ["blocktable"]          # peers in these groups (any of theirs)
    log_level = "info"
    log_target = "auto"                    # journal (native protocol, structured fields),
                                           # stderr, or auto: journal under systemd
    metrics = "127.0.0.1:9464"             # opt-in Prometheus endpoint
    unlink_on_exit = false
    tick_ms = 500                          # slot scan / retry period
    recovery_wait_ms = 50                  # how long a repair waits for live clients

    [segments.default]                     # any bt_config field; the rest default
    blocks_per_pool = 1048576
    [segments.gpu4]
    num_pools = 4

Unknown keys are errors (a typo must not silently mean "default"). What HUP
reloads: allow_uids, allow_groups, log_level, metrics, tick_ms,
recovery_wait_ms, and new segments; the socket and existing segments' sizes
need a restart.
"""
from __future__ import annotations

import argparse
import grp
import os
import tomllib
from typing import Any, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace

from blocktable import SegmentConfig
from blocktable.connect import SOCKET_NAME, socket_candidates

NAME_MAX = 48                               # BT_NAME_MAX
SEG_FIELDS = tuple(f.name for f in fields(SegmentConfig))
RELOADABLE = ("allow_uids", "allow_groups", "log_level", "metrics", "tick_ms",
              "recovery_wait_ms")


class ConfigError(ValueError):
    """The configuration is wrong: btd refuses to start (exit code 2)."""


@dataclass
class Config:
    segments: dict = field(default_factory=dict)    # name -> SegmentConfig
    socket: str = ""                                # "" = choose_socket_path()
    socket_mode: int = 0o660
    allow_uids: tuple = ()
    allow_groups: tuple = ()                        # gids
    log_level: str = "info"
    log_target: str = "auto"                        # auto, journal or stderr (logs.TARGETS)
    metrics: str = ""                               # "" = off, else "host:port"
    unlink_on_exit: bool = False
    tick_ms: int = 500
    recovery_wait_ms: int = 50
    path: str = ""                                  # the TOML file, if any

    def summary(self) -> dict[str, Any]:
        """A JSON-able view (status, --print-config)."""
        return {"socket": self.socket, "socket_mode": f"{self.socket_mode:04o}",
                "allow_uids": list(self.allow_uids), "allow_gids": list(self.allow_groups),
                "log_level": self.log_level,
                "log_target": self.log_target, "metrics": self.metrics or None,
                "unlink_on_exit": self.unlink_on_exit, "tick_ms": self.tick_ms,
                "recovery_wait_ms": self.recovery_wait_ms, "config_file": self.path or None,
                "segments": {n: {**{f: getattr(c, f) for f in SEG_FIELDS},
                                 "size_bytes": c.size}   # bt_config_size: what /dev/shm must hold
                             for n, c in self.segments.items()}}


def check_name(name: str) -> str:
    """A segment name libbt accepts: 1..48 printable ASCII bytes, no '/'."""
    if not isinstance(name, str) or not name:
        raise ConfigError("a segment name must be a non-empty string")
    b = name.encode("utf-8", "replace")
    if len(b) > NAME_MAX:
        raise ConfigError(f"segment name {name!r} is longer than {NAME_MAX} bytes")
    if "/" in name or name in (".", "..") or any(c < 0x21 or c > 0x7e for c in b):
        raise ConfigError(f"segment name {name!r}: printable ASCII without '/' or spaces")
    return name


def _int(v: Any, what: str, lo: int = 0, hi: int = 2**32 - 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{what} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def segment_config(name: str, table: Mapping[str, int],
                   base: SegmentConfig | None = None) -> SegmentConfig:
    """A checked SegmentConfig from a TOML table (or flag values)."""
    unknown = set(table) - set(SEG_FIELDS)
    if unknown:
        raise ConfigError(f"segment {name!r}: unknown keys {sorted(unknown)} "
                          f"(known: {', '.join(SEG_FIELDS)})")
    vals = {k: _int(v, f"segments.{name}.{k}") for k, v in table.items()}
    cfg = replace(base or SegmentConfig(), **vals)
    try:
        cfg.check()
    except ValueError as e:
        raise ConfigError(f"segment {name!r}: {e}") from None
    return cfg


def _mode(v: int | str) -> int:
    if isinstance(v, str):
        try:
            v = int(v, 8)
        except ValueError:
            raise ConfigError(f"socket_mode {v!r} is not octal") from None
    v = _int(v, "socket_mode", 0, 0o777)
    if v & ~0o660:
        raise ConfigError(f"socket_mode {v:04o} must be 0660 or stricter (no x, no other)")
    return v


def _gids(groups: Iterable[int | str]) -> tuple[int, ...]:
    out = []
    for g in groups:
        if isinstance(g, int) and not isinstance(g, bool):
            out.append(g)
            continue
        try:
            out.append(grp.getgrnam(str(g)).gr_gid)
        except KeyError:
            raise ConfigError(f"allow_groups: no group named {g!r}") from None
    return tuple(out)


def parse_metrics(addr: str) -> tuple[str, int]:
    """"host:port", "[v6]:port", ":port" or "port" (host 127.0.0.1) ->
    (host, port). Raises ConfigError."""
    addr = str(addr).strip()
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    host = host.strip("[]") or "127.0.0.1"
    try:
        return host, _int(int(port), "metrics port", 1, 65535)
    except ValueError:
        raise ConfigError(f"metrics {addr!r}: expected HOST:PORT") from None


def _apply_file(cfg: Config, data: Mapping[str, Any]) -> None:
    data = dict(data)
    segs = data.pop("segments", {})
    if not isinstance(segs, dict):
        raise ConfigError("[segments] must be a table of tables")
    for name, table in segs.items():
        if not isinstance(table, dict):
            raise ConfigError(f"segments.{name} must be a table")
        cfg.segments[check_name(name)] = segment_config(name, table)
    simple = {"socket": str, "log_level": str, "log_target": str, "metrics": str,
              "unlink_on_exit": bool}
    for key, val in data.items():
        if key in simple:
            if not isinstance(val, simple[key]):
                raise ConfigError(f"{key} must be a {simple[key].__name__}, got {val!r}")
            setattr(cfg, key, val)
        elif key == "socket_mode":
            cfg.socket_mode = _mode(val)
        elif key == "allow_uids":
            cfg.allow_uids = tuple(_int(u, "allow_uids[]") for u in _list(val, key))
        elif key == "allow_groups":
            cfg.allow_groups = _gids(_list(val, key))
        elif key in ("tick_ms", "recovery_wait_ms"):
            setattr(cfg, key, _int(val, key, 1, 600_000))
        else:
            raise ConfigError(f"unknown key {key!r} in the config file")


def _list(v: Any, key: str) -> list[Any]:
    if not isinstance(v, list):
        raise ConfigError(f"{key} must be a list")
    return v


def load(args: argparse.Namespace) -> Config:
    """The Config for parsed btd flags (see server.parse_args)."""
    cfg = Config()
    if args.config:
        try:
            with open(args.config, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read {args.config}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{args.config}: {e}") from None
        cfg.path = os.path.abspath(args.config)
        _apply_file(cfg, data)
    sizes = {k: getattr(args, k) for k in SEG_FIELDS if getattr(args, k, None) is not None}
    named = [check_name(n) for n in (args.segment or [])]
    if not named and not cfg.segments:
        named = ["default"]
    for name in named:
        cfg.segments[name] = segment_config(name, sizes, cfg.segments.get(name))
    if sizes and not args.segment and args.config:
        # Size flags with a file and no --segment resize every file segment.
        for name in list(cfg.segments):
            cfg.segments[name] = segment_config(name, sizes, cfg.segments[name])
    if args.socket:
        cfg.socket = args.socket
    if args.socket_mode is not None:
        cfg.socket_mode = _mode(args.socket_mode)
    if args.allow_uid:
        cfg.allow_uids = tuple(dict.fromkeys(cfg.allow_uids + tuple(args.allow_uid)))
    if args.allow_group:
        cfg.allow_groups = tuple(dict.fromkeys(cfg.allow_groups + _gids(args.allow_group)))
    for key in ("log_level", "log_target", "metrics", "tick_ms", "recovery_wait_ms"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.unlink_on_exit:
        cfg.unlink_on_exit = True
    if cfg.metrics:
        parse_metrics(cfg.metrics)
    from .logs import TARGETS, parse_level
    try:
        parse_level(cfg.log_level)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.log_target not in TARGETS:
        raise ConfigError(f"log_target {cfg.log_target!r}: one of {', '.join(TARGETS)}")
    return cfg


def choose_socket_path(uid: int | None = None) -> str:
    """Where btd listens when not told: the first candidate folder that
    exists or can be made (0750) and is writable."""
    for path in socket_candidates():
        d = os.path.dirname(path)
        try:
            os.makedirs(d, mode=0o750, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK | os.X_OK):
            return path
    raise ConfigError(f"no writable folder for the socket ({SOCKET_NAME}); use --socket")
