"""Child processes of the local mode and of the test harness: spawn with a log file, wait until ready,
stop the whole process group.

One implementation because every server here (MLflow, the prediction service, etcd, the API server,
the operator, Prometheus) needs the same three things: its own session (so a stop reaches the workers
it forks), a readiness wait that fails at once when the process dies instead of timing out, and a
failure message carrying the end of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT_SECONDS = 20.0
_PR_SET_PDEATHSIG = 1


class ProcessExitedError(RuntimeError):
    """A child process died while something was waiting for it; the message carries its log tail."""


def free_ports(count: int, address: str = LOOPBACK) -> list[int]:
    """`count` distinct ports the kernel just handed out on `address` (held open together, so none
    repeats); free unless someone else races for them."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((address, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port(address: str = LOOPBACK) -> int:
    return free_ports(1, address)[0]


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """Polls `predicate` until it returns something truthy, which is returned; TimeoutError naming
    `what` after `timeout` seconds. Exceptions from the predicate propagate at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether `url` answers 200 now; any connection failure is simply "not yet"."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _die_with_parent() -> None:
    # If the parent is killed outright its finalizers never run; the kernel's parent-death signal
    # keeps etcd, the API server and friends from outliving it.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ChildProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float

    @classmethod
    def spawn(
        cls,
        name: str,
        command: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        append_log: bool = False,
        die_with_parent: bool = False,
    ) -> ChildProcess:
        """Starts `command` in its own session, stdout and stderr into `log_path`.

        `die_with_parent` is for short-lived harness components (a test's API server); a server the user
        started (the demo's MLflow) must not depend on how its parent ends."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab" if append_log else "wb") as log:
            popen = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,  # noqa: PLW1509 - prctl only
            )
        return cls(name, popen, log_path, time.monotonic())

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def is_running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"<cannot read {self.log_path}: {error}>"

    def check_running(self, what: str = "it was ready") -> None:
        """Raises ProcessExitedError (with the log tail) if the process has exited."""
        if self.popen.poll() is not None:
            raise ProcessExitedError(
                f"{self.name} exited with code {self.popen.returncode} before {what}; "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )

    def wait_ready(
        self, probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25
    ) -> T:
        """Polls `probe` until truthy; fails at once if the process exits, and on a timeout says what
        was awaited and shows the log tail."""

        def check() -> T | None:
            self.check_running(what)
            return probe()

        try:
            return wait_until(check, timeout, what, interval)
        except TimeoutError as error:
            raise TimeoutError(
                f"{self.name}: {error}; last lines of {self.log_path}:\n{self.log_tail()}"
            ) from error

    def signal_group(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signum)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """SIGTERM to the whole group (servers fork workers), SIGKILL after `timeout`; the exit code, or
        None if it had to be killed."""
        if self.popen.poll() is not None:
            return self.popen.returncode
        self.signal_group(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.popen.wait(STOP_TIMEOUT_SECONDS)


@dataclass
class LoopbackServer:
    """A child process serving HTTP on a loopback port: what MLflow and the prediction service are here."""

    child: ChildProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.child.popen

    @property
    def log_path(self) -> Path:
        return self.child.log_path

    def is_running(self) -> bool:
        return self.child.is_running()

    def log_tail(self, lines: int = 40) -> str:
        return self.child.log_tail(lines)
