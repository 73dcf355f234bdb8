"""bt-ctl: the operator's command line for btd.

    bt-ctl [--socket PATH] [--json] COMMAND [ARGS]

Commands come from blocktable_daemon.commands (each holds its request and its rendering),
plus `watch`, which repeats `status` and `clients`. Human tables by default;
--json prints the result object with stable keys. Exit codes: 0 ok, 1 error
(an error reply, or fsck found problems), 2 usage, 3 btd not running.
$BT_SOCKET picks the daemon when --socket is not given.
"""
import argparse
import json
import sys
import time

from blocktable.connect import (DaemonDisconnected, DaemonError, DaemonNotRunning,
                                default_socket_path, request)

from . import commands

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3


POSITIVE, NON_NEGATIVE_INT = commands.number(float, 0, False), commands.number(int, 0, True)


def parser():
    from blocktable import __version__
    p = argparse.ArgumentParser(prog="bt-ctl", description="Talk to btd, the blocktable daemon.",
                                epilog="exit codes: 0 ok, 1 error (or fsck found problems), "
                                "2 usage, 3 btd not running")
    p.add_argument("--version", action="version", version=f"bt-ctl (blocktable) {__version__}")
    p.add_argument("--socket", "-s", help="btd's socket (default: $BT_SOCKET, then the "
                   "standard places)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--timeout", type=POSITIVE, default=10.0, help="seconds to wait for btd")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    for name, cmd in commands.CLI.items():
        cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.help))
    w = sub.add_parser("watch", help="status and clients, refreshed",
                       description="status and clients, refreshed every --interval seconds")
    w.add_argument("--interval", "-n", type=POSITIVE, default=1.0)
    w.add_argument("--count", type=NON_NEGATIVE_INT, default=0,
                   help="stop after N refreshes (0: never)")
    return p


def call(ns, name, args):
    return request(name, args, socket=ns.socket, timeout=ns.timeout)


def run_one(ns, out):
    cmd = commands.CLI[ns.cmd]
    result = call(ns, ns.cmd, cmd.request_args(ns))
    if ns.json:
        out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        out.write(cmd.render(result, ns) + "\n")
    return cmd.exit_code(result)


def watch(ns, out):
    n = 0
    clear = out.isatty() and not ns.json
    while True:
        status = call(ns, "status", {})
        clients = call(ns, "clients", {})
        if ns.json:
            out.write(json.dumps({"time": time.time(), "status": status, **clients},
                                 sort_keys=True) + "\n")
        else:
            if clear:
                out.write("\x1b[H\x1b[2J")
            out.write(time.strftime("%H:%M:%S  ") + commands.CLI["status"].render(status, ns)
                      + "\n\n" + commands.CLI["clients"].render(clients, ns) + "\n")
            if not clear:
                out.write("\n")
        out.flush()
        n += 1
        if ns.count and n >= ns.count:
            return EXIT_OK
        time.sleep(ns.interval)


def fail(ns, status, name, message):
    """An error: one line on stderr, or with --json a JSON object on stdout
    ({"error": {"name", "message"}}) so that scripts read one format."""
    if ns.json:
        print(json.dumps({"error": {"name": name, "message": message}}, sort_keys=True))
    else:
        print(f"bt-ctl: {message}", file=sys.stderr)
    return status


def main(argv=None):
    ns = parser().parse_args(argv)
    if ns.socket is None:
        ns.socket = default_socket_path()
    try:
        if ns.cmd == "watch":
            return watch(ns, sys.stdout)
        return run_one(ns, sys.stdout)
    except DaemonNotRunning as e:
        return fail(ns, EXIT_NOT_RUNNING, "ENOTRUNNING", e.strerror)
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
