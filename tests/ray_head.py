"""A real Ray head on free loopback ports for tests, and stopping exactly that head (never `ray stop`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from tests.conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def head_env() -> dict[str, str]:
    # A loopback test head without token auth, so clients with another HOME need no token file.
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@contextmanager
def ray_head(num_cpus: int = 2, env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """Start `ray start --head` in its own session and temp dir; yield its addresses; stop only it.
    `env`: variables the cluster's processes see (a job's driver and workers inherit the head's)."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = {name: free_port() for name in ("gcs", "dashboard", "client", "node_manager", "object_manager",
                                             "agent_listen", "agent_grpc", "runtime_env", "metrics")}
    cmd = [RAY, "start", "--head", "--disable-usage-stats", f"--temp-dir={temp_dir}", f"--port={ports['gcs']}",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={300 * 1024**2}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
           f"--ray-client-server-port={ports['client']}", f"--node-manager-port={ports['node_manager']}",
           f"--object-manager-port={ports['object_manager']}", f"--dashboard-agent-listen-port={ports['agent_listen']}",
           f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--runtime-env-agent-port={ports['runtime_env']}",
           f"--metrics-export-port={ports['metrics']}", "--node-ip-address=127.0.0.1"]
    started = subprocess.run(cmd, env={**head_env(), **(env or {})}, capture_output=True, text=True, timeout=180,
                             start_new_session=True)
    info = {"gcs": f"127.0.0.1:{ports['gcs']}", "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
            "temp_dir": temp_dir, "client_port": str(ports["client"])}
    try:
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
        _wait_for_dashboard(info["dashboard"])
        yield info
    finally:
        stop_head(temp_dir, ports["client"])


def _wait_for_dashboard(url: str, timeout: float = 90) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the Ray dashboard at {url} did not answer within {timeout} s")


def stop_head(temp_dir: str, client_port: int) -> None:
    """SIGTERM raylet → dashboard → the rest → gcs_server, then SIGKILL what is left: only this head's."""
    mine: list[psutil.Process] = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if temp_dir in cmdline or f"--port={client_port}" in cmdline or f"--ray-client-server-port={client_port}" in cmdline:
            mine.append(proc)
    family = {p.pid: p for p in mine}
    for p in mine:
        try:
            family.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass

    def rank(p: psutil.Process) -> int:
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            return 9
        return 0 if "raylet" in line else 1 if "dashboard" in line else 3 if "gcs_server" in line else 2

    for p in sorted(family.values(), key=rank):
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(family.values()), timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
