"""Real local Ray clusters for the end-to-end tests: `ray start` processes on loopback with token
authentication, started in their own process groups and torn down completely."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """This environment without RAY_* variables (a test session may have its own), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _group_pids(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    out.append(int(d))
            except ProcessLookupError:
                pass
    return out


class LocalCluster:
    """A head node (dashboard for `ray job submit`) and optional worker nodes, all on 127.0.0.1."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="rsj", dir="/tmp"))  # short: unix socket paths are limited
        self.token = self.tmp / "token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token))
        self.gcs_port = free_port()
        self.dash_port = free_port()
        self.url = f"http://127.0.0.1:{self.dash_port}"
        self.procs: list[tuple[subprocess.Popen, object]] = []
        self.nodes = 0  # nodes started (and seen alive)

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        p = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", *args],
                             env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((p, log))
        return p

    def start_head(self, num_cpus: int = 4, resources: str | None = None) -> None:
        head = self._start([f"--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={self.dash_port}", f"--ray-client-server-port={free_port()}",
                            f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={num_cpus}",
                            f"--temp-dir={self.tmp}/ray", "--include-dashboard=true",
                            *([f"--resources={resources}"] if resources else [])], "head")
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError as e:  # 401: up, and asking for the token
                if e.code == 401:
                    break
                raise
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ray start --head failed:\n" + (self.tmp / "head.log").read_text()[-3000:])
                time.sleep(1)
        self._wait_nodes(1, head, "head", deadline)

    def _wait_nodes(self, n: int, proc: subprocess.Popen, name: str, deadline: float) -> None:
        while self.alive_nodes() < n:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"node {name} did not join:\n" + (self.tmp / f"{name}.log").read_text()[-3000:])
            time.sleep(1)
        self.nodes = n

    def add_node(self, num_cpus: int, resources: str | None = None, timeout: float = 120) -> None:
        """Start a worker node and wait until the cluster reports one more node."""
        n = len(self.procs)
        p = self._start([f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}",
                         f"--dashboard-agent-listen-port={free_port()}",
                         *([f"--resources={resources}"] if resources else [])], f"node{n}")
        self._wait_nodes(self.nodes + 1, p, f"node{n}", time.time() + timeout)

    def alive_nodes(self) -> int:
        p = subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{self.gcs_port}"], env=self.env,
                           capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            return 0
        active = p.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if "node_" in line)

    def submit(self, args: list[str], timeout: float = 480, wait: bool = True, env_vars: dict | None = None):
        """`ray job submit --working-dir . -- python ...` from the repository root; ``env_vars``: the
        job's runtime-env variables (its entrypoint, the driver, sees them)."""
        renv = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.url, "--working-dir", ".", *renv,
               *([] if wait else ["--no-wait"]), "--", "python", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=self.env)

    def stop(self) -> None:
        for p, _ in reversed(self.procs):
            p.send_signal(signal.SIGTERM)  # a --block process shuts its own node down ...
        for p, log in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for pid in _group_pids(p.pid):  # ... without waiting out the drain: the rest of its group
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait(timeout=30)
            log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
