"""A btd under test: started as a subprocess with its own socket, a unique
segment and a NOTIFY_SOCKET of ours, so that "started" means READY=1 was
sent -- the same signal systemd waits for. Used by the tests and by
bench/bench_recovery.py. Every wait is bounded and names what it waited for.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Callable, Mapping, Sequence, TypeVar

import blocktable

import blocktable_daemon

from blocktable.connect import request

_T = TypeVar("_T")


def wait_for(cond: Callable[[], _T | None], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.002) -> _T:
    """Poll cond() until truthy (returned) or raise TimeoutError after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def stack_of(pid: int) -> str:
    """The C and Python stacks of a live process, for a failure message: gdb
    when it is installed, else /proc's kernel stack and wait channel."""
    import shutil
    out = []
    if shutil.which("gdb"):
        r = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                           capture_output=True, text=True, timeout=60)
        out.append(r.stdout[-6000:])
    for f in ("wchan", "stat"):
        try:
            with open(f"/proc/{pid}/{f}") as fh:
                out.append(f"{f}: {fh.read().strip()}")
        except OSError:
            pass
    return "\n".join(out)


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ, with the folders of blocktable and btd on PYTHONPATH (so a
    source checkout works without an install)."""
    env = dict(os.environ)
    dirs = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__)))
            for m in (blocktable_daemon, blocktable)]
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(dirs + ([old] if old else [])))
    env.pop("NOTIFY_SOCKET", None)
    env.pop("BT_SOCKET", None)
    env.update(extra or {})
    return env


class DaemonProcess:
    """btd in a subprocess. `segment` is unique per instance unless given;
    the segment is unlinked by cleanup()."""

    def __init__(self, workdir: str | os.PathLike[str], segment: str | None = None,
                 args: Sequence[str] = (), sizes: Mapping[str, int] | None = None,
                 nofile: int | None = None) -> None:
        self.dir = str(workdir)
        os.makedirs(self.dir, exist_ok=True)
        self.segment = segment or unique_name()
        self.socket = os.path.join(self.dir, "btd.sock")
        self.notify_path = os.path.join(self.dir, "notify.sock")
        self.log_path = os.path.join(self.dir, "btd.log")
        self.args = list(args)
        for k, v in (sizes or {}).items():
            self.args += ["--" + k.replace("_", "-"), str(v)]
        self.nofile = nofile            # RLIMIT_NOFILE (soft = hard) btd starts under
        self.proc = None
        self.notices = []

    def start(self, timeout: float = 30.0, extra_env: Mapping[str, str] | None = None,
              ready: bool = True) -> DaemonProcess:
        """Start (or restart, after stop/kill) and wait for READY=1."""
        self._close_files()
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(self.notify_path)
        self._notify.settimeout(0.05)
        env = child_env({"NOTIFY_SOCKET": self.notify_path, **(extra_env or {})})
        cmd = [sys.executable, "-m", "blocktable_daemon.server", "--socket", self.socket,
               "--segment", self.segment, *self.args]
        self._log = open(self.log_path, "ab")
        limit = None
        if self.nofile is not None:
            import resource

            def limit():
                resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=limit)
        if ready:
            self.wait_notice("READY=1", timeout)
        return self

    def wait_notice(self, line: str, timeout: float = 30.0) -> str:
        """Wait for a sd_notify datagram holding `line`; returns the datagram."""
        def got():
            for n in self.notices:
                if line in n.splitlines():
                    self.notices.remove(n)
                    return n
            try:
                self.notices.append(self._notify.recv(4096).decode())
            except socket.timeout:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"btd exited ({self.proc.returncode}) before {line}:\n"
                                   + self.log())
            return None
        return wait_for(got, timeout, f"btd to send {line}", interval=0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def request(self, cmd: str, args: Mapping[str, Any] | None = None,
                timeout: float = 10.0) -> Any:
        return request(cmd, args, socket=self.socket, timeout=timeout)

    def ctl(self, *argv: str, timeout: float = 60.0,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run bt-ctl against this daemon; a CompletedProcess (text)."""
        return subprocess.run([sys.executable, "-m", "blocktable_daemon.ctl", "--socket", self.socket, *argv],
                              env=child_env(env), capture_output=True, text=True,
                              timeout=timeout)

    def ctl_json(self, *argv: str) -> Any:
        r = self.ctl("--json", *argv)
        assert r.returncode == 0, (r.returncode, r.stderr)
        return json.loads(r.stdout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Signal btd and wait; its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> int | None:
        return self.stop(signal.SIGKILL)

    def _close_files(self) -> None:
        for f in (getattr(self, "_log", None), getattr(self, "_notify", None)):
            if f is not None:
                f.close()
        self.notices = []

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            self._close_files()
            try:
                blocktable.Segment.unlink(self.segment)
            except OSError:
                pass
