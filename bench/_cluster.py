"""A throw-away local Redis Cluster for the benchmarks (bench/fleet.py's cluster rows).

Six ``redis-server --cluster-enabled yes`` on free loopback ports, each with its own directory
and an explicit ``--cluster-port`` (the default, port + 10,000, would not fit above 55,535),
joined by ``redis-cli --cluster create … --cluster-replicas 1 --cluster-yes``: three masters,
one replica each, as /work/shared/SERVICES.md §6 and the Redis docs describe. Ready once every
node reports ``cluster_state:ok``. Stopped by PID (SIGTERM, SIGKILL after a timeout).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from core.testing import free_ports

__all__ = ["LocalCluster"]

HOST = "127.0.0.1"
NODES = 6
READY_TIMEOUT = 60.0


class LocalCluster:
    """Six cluster-enabled ``redis-server`` processes made into one cluster (3 masters, 3
    replicas). Use as a context manager; :attr:`url` is the layer path."""

    def __init__(self, node_timeout_ms: int = 2000) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmpdir: Path | None = None

    @property
    def url(self) -> str:
        """``redis+cluster://`` naming the three first nodes (any node finds the rest)."""
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports[:3]) + "/"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> LocalCluster:
        for binary in ("redis-server", "redis-cli"):
            if shutil.which(binary) is None:
                raise RuntimeError(f"{binary} is not installed (apt-get install redis-server)")
        self.tmpdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
        ports = free_ports(2 * NODES)
        self.ports, buses = ports[:NODES], ports[NODES:]
        try:
            for port, bus in zip(self.ports, buses, strict=True):
                self._start_node(port, bus)
            for port in self.ports:
                self._wait(port, "PONG", "ping")
            nodes = [f"{HOST}:{p}" for p in self.ports]
            replicas = ["--cluster-replicas", "1", "--cluster-yes"]
            done = subprocess.run(
                ["redis-cli", "--cluster", "create", *nodes, *replicas],
                capture_output=True,
                text=True,
                timeout=READY_TIMEOUT,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout[-2000:]}")
            for port in self.ports:
                self._wait(port, "cluster_state:ok", "cluster", "info")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, port: int, bus: int) -> None:
        assert self.tmpdir is not None
        directory = self.tmpdir / str(port)
        directory.mkdir()
        argv = ["redis-server", "--port", str(port), "--bind", HOST, "--cluster-enabled", "yes"]
        argv += ["--cluster-port", str(bus), "--cluster-config-file", "nodes.conf"]
        argv += ["--cluster-node-timeout", str(self.node_timeout_ms)]
        argv += ["--appendonly", "no", "--save", "", "--dir", str(directory)]
        with (directory / "redis.log").open("wb") as log:
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))

    @staticmethod
    def _cli(port: int, *command: str) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            done = subprocess.run(
                ["redis-cli", "-h", HOST, "-p", str(port), *command],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            return done.stdout.strip()
        return ""

    def _wait(self, port: int, needle: str, *command: str) -> None:
        """Until ``redis-cli -p port command…`` prints ``needle``."""
        what = f"node {port} answers {' '.join(command)} with {needle}"
        deadline = time.monotonic() + READY_TIMEOUT
        while needle not in self._cli(port, *command):
            exited = [p for p in self.procs if p.poll() is not None]
            if exited:
                code = exited[0].returncode
                raise RuntimeError(f"a cluster node exited ({code}); see {self.tmpdir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting until {what}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
