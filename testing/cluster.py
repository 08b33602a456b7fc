"""`make cluster-up` / `make cluster-down`: the end-to-end tier's single-node cluster, for a person.

    python -m testing.cluster up      # builds what is missing, starts the node, prints KUBECONFIG
    python -m testing.cluster down    # stops every part and removes its pods, routes and rules
    python -m testing.cluster status

`up` starts a supervisor process in the background that owns the cluster (the same
:class:`~testing.node.NodeCluster` the tests use) and returns once the node is Ready; `down` asks
the supervisor to stop it. The state directory holds the supervisor's pid, its log and a copy of
the admin kubeconfig.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from local_mode.processes import ChildProcess, ProcessExitedError

DEFAULT_STATE_DIR = Path(__file__).resolve().parent.parent / ".state" / "cluster"
UP_TIMEOUT_SECONDS = 90 * 60.0
DOWN_TIMEOUT_SECONDS = 120.0


def _pid(state_dir: Path) -> int | None:
    try:
        pid = int((state_dir / "pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def serve(state_dir: Path) -> int:
    """Runs in the supervisor: start, publish the kubeconfig, wait for SIGTERM, stop."""
    from testing.node import NodeCluster

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    cluster = NodeCluster.start()
    try:
        shutil.copyfile(cluster.kubeconfig_path, state_dir / "kubeconfig")
        os.chmod(state_dir / "kubeconfig", 0o600)
        ready = {
            "kubeconfig": str(state_dir / "kubeconfig"),
            "bin_dir": str(cluster.plane.bin_dir),
            "images": cluster.images,
            "startup_seconds": round(cluster.startup_seconds, 1),
        }
        (state_dir / "ready.json").write_text(json.dumps(ready, indent=2))
        stop.wait()
    finally:
        cluster.stop()
        with contextlib.suppress(FileNotFoundError):
            (state_dir / "ready.json").unlink()
    return 0


def up(state_dir: Path) -> int:
    if _pid(state_dir) is not None:
        print(f"already running; KUBECONFIG={state_dir / 'kubeconfig'}")
        return 0
    state_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("ready.json", "pid"):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / stale).unlink()
    started = time.monotonic()
    # Not tied to this process's life: the supervisor outlives `make cluster-up` by design.
    supervisor = ChildProcess.spawn(
        "the cluster supervisor",
        [sys.executable, "-m", "testing.cluster", "serve", "--state-dir", str(state_dir)],
        state_dir / "supervisor.log",
    )
    (state_dir / "pid").write_text(str(supervisor.pid))
    try:
        supervisor.wait_ready(
            (state_dir / "ready.json").exists,
            max(started + UP_TIMEOUT_SECONDS - time.monotonic(), 0.0),
            "the cluster was ready",
            interval=0.5,
        )
    except (ProcessExitedError, TimeoutError) as error:
        supervisor.stop()
        print(f"the cluster did not start: {error}", file=sys.stderr)
        return 1
    ready = json.loads((state_dir / "ready.json").read_text())
    print(f"cluster up in {time.monotonic() - started:.1f}s; images: {', '.join(ready['images'].values())}")
    print(f"export KUBECONFIG={ready['kubeconfig']} PATH={ready['bin_dir']}:$PATH")
    return 0


def down(state_dir: Path) -> int:
    pid = _pid(state_dir)
    if pid is None:
        print("no cluster is running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DOWN_TIMEOUT_SECONDS
    while _pid(state_dir) is not None:
        if time.monotonic() > deadline:
            print(
                f"the supervisor (pid {pid}) did not stop; see {state_dir / 'supervisor.log'}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.5)
    (state_dir / "pid").unlink(missing_ok=True)
    print("cluster down")
    return 0


def status(state_dir: Path) -> int:
    if _pid(state_dir) is None or not (state_dir / "ready.json").exists():
        print("no cluster is running")
        return 1
    print((state_dir / "ready.json").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testing.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "serve"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    args = parser.parse_args(argv)
    command = {"up": up, "down": down, "status": status, "serve": serve}[args.command]
    return command(args.state_dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
