"""btd: the blocktable daemon, and bt-ctl, its command line.

btd creates or adopts named segments, registers clients over a Unix socket
(their pid taken from the peer credentials), watches each client process with
a pidfd, and recovers what a dead client held. The data path never goes
through the daemon: clients call libbt on the shared mapping directly.

Modules, one job each: server (the loop: ticks, signals, the daemon's
public methods the commands call), conns (control-socket I/O and connection
caps), model (segments served, slots, watches, counters, summaries),
recovery (the recovery state machine), watching (pidfds, the slot scan),
segments (create / adopt / repair at adoption), clib (the one door to libbt's
cffi library), procfs (/proc readers), commands (each control command: its
server side and its rendering), config (flags + TOML), protocol
(newline-delimited JSON), metrics (Prometheus), sdnotify, logs, ctl (bt-ctl),
testing (a daemon harness for tests and benchmarks).
"""
from blocktable import __version__

__all__ = ["__version__"]
