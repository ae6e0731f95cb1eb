"""Redis set-ups of several servers: a Redis Cluster, and a master with a replica.

* :class:`RedisClusterServers`: ``masters * (1 + replicas)`` ``redis-server
  --cluster-enabled yes`` on free ports, joined by ``redis-cli --cluster create``, ready once
  every node reports ``cluster_state:ok``. ``cluster-node-timeout`` is low (1 s) so a killed
  master's replica takes over in a few seconds.
* :class:`ReplicatedRedis`: a master and one replica (``--replicaof``), and :meth:`promote`
  (``REPLICAOF NO ONE``), for failover tests without Sentinel; with ``sentinel=True`` also a
  ``redis-sentinel`` (quorum 1, ``down-after-milliseconds`` :data:`SENTINEL_DOWN_AFTER_MS`)
  that fails over by itself: :attr:`sentinel_host` is the layer's host for it, master name
  ``main``; :meth:`failed_over_to` says when its failover finished, and :meth:`rejoin` brings a
  killed server back the way docs/redis.md tells operators to (as a replica of the master
  Sentinel names, never as an empty master).

Both are built on :class:`core.testing.services.RedisServer` (its life cycle: ``kill()``,
``restart()``, ``stop()``), and ``stop()`` stops every server.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Self

from core.testing.base import (
    HOST,
    WAIT,
    Server,
    _make_tmpdir,
    _remove_tmpdir,
    free_port,
    require_binary,
)
from core.testing.services import RedisServer

__all__ = ["RedisClusterServers", "ReplicatedRedis"]


def _cli(port: int, *args: str, timeout: float = 30.0) -> str:
    done = subprocess.run(
        [require_binary("redis-cli"), "-h", HOST, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli -p {port} {' '.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout


#: a replica's first sync starts at once (the default waits 5 s for more replicas to come)
_FAST_SYNC = ("--repl-diskless-sync-delay", "0")

#: Sentinel's ``down-after-milliseconds``: well above the 1 s in which Sentinel reconnects to an
#: instance at most once (``SENTINEL_PING_PERIOD``). After a failover Sentinel keeps the link it
#: had to the dead master for the promoted one, and that link may only reconnect a second after
#: its last attempt; with 1000 here Sentinel judged the master it had just promoted down (no
#: PING answered within 1 s) and failed over again, to the old master restarted empty (issue 24;
#: docs/redis.md, Sentinel section).
SENTINEL_DOWN_AFTER_MS = 3000


def _port(fields: list[str]) -> int:
    """The client port of a ``cluster nodes`` line (``ip:port@cport[,hostname]``)."""
    return int(fields[1].split("@")[0].rsplit(":", 1)[1])


def _linked(port: int) -> bool:
    """A replica whose link to its master is up (a master: True)."""
    info = _cli(port, "info", "replication", timeout=5)
    return "role:master" in info or "master_link_status:up" in info


def _until(check: object, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if callable(check) and check():
                return
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class _ClusterNode(RedisServer):
    """A cluster node: its bus on a free port of its own (``--cluster-port``; the default,
    port + 10000, is out of range for most free ports)."""

    port_count = 2

    def _argv(self, path: str) -> list[str]:
        return [*super()._argv(path), "--cluster-port", str(self._ports[1])]


class RedisClusterServers:
    """A local Redis Cluster; see the module docstring."""

    binary = "redis-server"

    def __init__(self, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            # a replica that lost its master for a while still takes over (tests kill masters)
            "--cluster-replica-validity-factor",
            "0",
            *_FAST_SYNC,
        ]
        self.masters = masters
        self.replicas = replicas
        count = masters * (1 + replicas)
        self.servers: list[RedisServer] = [_ClusterNode(extra_args=args) for _ in range(count)]

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…/``: a layer path for the cluster."""
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports) + "/"

    def start(self) -> Self:
        require_binary("redis-cli")
        try:
            for server in self.servers:
                server.start()
            nodes = [f"{HOST}:{port}" for port in self.ports]
            _cli(
                self.ports[0],
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = WAIT) -> None:
        """Wait until every running node says ``cluster_state:ok`` and knows every replica."""

        def ok() -> bool:
            for server in self.servers:
                if not server.alive:
                    continue
                if "cluster_state:ok" not in _cli(server.port, "cluster", "info", timeout=5):
                    return False
                if not _linked(server.port):
                    return False
            return True

        _until(ok, "cluster_state:ok and replicas linked on every node", timeout)

    def master_of(self, key: str) -> RedisServer:
        """The server that is master of ``key``'s hash slot now."""
        for server in self.servers:
            if not server.alive:
                continue
            slot = int(_cli(server.port, "cluster", "keyslot", key, timeout=5).strip())
            for line in _cli(server.port, "cluster", "nodes", timeout=5).splitlines():
                fields = line.split()
                if "master" not in fields[2] or "fail" in fields[2]:
                    continue
                for span in fields[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return next(s for s in self.servers if s.port == _port(fields))
        raise RuntimeError(f"no master serves {key!r}")

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The servers that replicate ``master`` now: each running server that says so of
        itself (its own ``myself`` line is current at once; the master learns it by gossip, so
        its view may still miss a replica), and those the master names."""
        own = self._myself(master.port)[0]
        lines = _cli(master.port, "cluster", "nodes", timeout=5).splitlines()
        ports = {_port(line.split()) for line in lines if line.split()[3] == own}
        for server in self.servers:
            if server is not master and server.alive:
                fields = self._myself(server.port)
                if "slave" in fields[2].split(",") and fields[3] == own:
                    ports.add(server.port)
        return [server for server in self.servers if server.port in ports]

    @staticmethod
    def _myself(port: int) -> list[str]:
        """The fields of the ``cluster nodes`` line the server on ``port`` has of itself."""
        lines = _cli(port, "cluster", "nodes", timeout=5).splitlines()
        return next(line.split() for line in lines if "myself" in line.split()[2].split(","))

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class ReplicatedRedis:
    """A master and one replica on free ports; see the module docstring."""

    binary = "redis-server"

    def __init__(self, *, sentinel: bool = False) -> None:
        self.master = RedisServer(extra_args=_FAST_SYNC)
        self.replica = RedisServer(extra_args=_FAST_SYNC)
        self.with_sentinel = sentinel
        self.sentinel_port = free_port()
        self.sentinel: Server | None = None
        self._sentinel_dir: Path | None = None

    @property
    def sentinel_host(self) -> dict[str, Any]:
        """The streams layer's host entry for the Sentinel (``hosts=[…]``)."""
        return {"sentinels": [(HOST, self.sentinel_port)], "master_name": "main"}

    def start(self) -> Self:
        try:
            self.master.start()
            self.replica.extra_args = [*_FAST_SYNC, "--replicaof", HOST, str(self.master.port)]
            self.replica.start()
            _until(self.in_sync, "the replica to sync with its master")
            if self.with_sentinel:
                self._start_sentinel()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self) -> None:
        binary = shutil.which("redis-sentinel") or require_binary("redis-server")
        self._sentinel_dir = _make_tmpdir("cgw-redis-sentinel-")
        conf = self._sentinel_dir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind {HOST}\ndir {self._sentinel_dir}\n"
            f"sentinel monitor main {HOST} {self.master.port} 1\n"
            f"sentinel down-after-milliseconds main {SENTINEL_DOWN_AFTER_MS}\n"
            "sentinel failover-timeout main 5000\n"
        )
        self.sentinel = Server([binary, str(conf), "--sentinel"], "Sentinel ID", name="sentinel")

    def in_sync(self) -> bool:
        info = _cli(self.master.port, "info", "replication", timeout=5)
        online = "connected_slaves:1" in info and "state=online" in info
        return online and _linked(self.replica.port)

    def promote(self) -> None:
        """Make the replica a master (what Sentinel does after the master died)."""
        _cli(self.replica.port, "replicaof", "no", "one", timeout=5)

    def sentinel_master_port(self) -> int:
        """The port of the master the Sentinel names now (``get-master-addr-by-name``: during a
        failover already the promoted replica's, see :meth:`failed_over_to`)."""
        reply = _cli(self.sentinel_port, "sentinel", "get-master-addr-by-name", "main", timeout=5)
        return int(reply.split()[1])

    def failed_over_to(self, port: int) -> bool:
        """Sentinel's failover to the server on ``port`` is over: ``SENTINEL MASTER`` (what
        redis-py's Sentinel client reads) names it, without ``failover_in_progress``.

        ``get-master-addr-by-name`` names the promoted replica earlier, from the moment it
        answered as a master, while Sentinel still reconfigures the others."""
        lines = _cli(self.sentinel_port, "sentinel", "master", "main", timeout=5).splitlines()
        state = dict(zip(lines[::2], lines[1::2], strict=False))
        flags = state.get("flags", "").split(",")
        return state.get("port") == str(port) and "failover_in_progress" not in flags

    def rejoin(self, server: RedisServer) -> None:
        """Start ``server`` (killed, no persistence) again as a replica of the master Sentinel
        names now, and wait until it is in sync: what docs/redis.md tells operators to do with
        a failed master. Restarted as it was configured, it would come back an empty master,
        and if Sentinel ever promoted it again (it is in Sentinel's list of replicas) the
        replica holding the data would resynchronise from it and lose everything."""
        master = self.sentinel_master_port()
        server.extra_args = [*_FAST_SYNC, "--replicaof", HOST, str(master)]
        server.start()
        _until(lambda: _linked(server.port), "the old master to sync as a replica")

    def stop(self) -> None:
        if self.sentinel is not None:
            self.sentinel.stop()
            self.sentinel = None
        if self._sentinel_dir is not None:
            _remove_tmpdir(self._sentinel_dir)
            self._sentinel_dir = None
        self.replica.stop()
        self.master.stop()
