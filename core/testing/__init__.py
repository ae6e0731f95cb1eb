"""Helpers that start real servers for integration tests and benchmarks.

What your own consumer tests may use is documented in docs/testing.md (the public part). What
only this repository's own tests use lives in ``tests/support/`` (not installed):
``example_project`` (it needs the checkout's ``examples/``), the scripted hostile IRC server and
the DNS fake of the email tests.

Every server runs in the foreground on free loopback ports, keeps its state in a fresh temporary
directory, and is stopped by PID. The recipes (arguments, config files, ready lines) are the
tested ones the "Services the tests start" section of docs/development.md lists (``.ci/run``
installs them).

Life cycle shared by every service class (:class:`RedisServer`, :class:`MosquittoServer`,
:class:`NgircdServer`, :class:`InspircdServer`):

* ``start()`` starts the process (creating the temporary directory on first use) and returns once
  the server printed its ready line.
* ``kill()`` sends SIGKILL (the crash case) and ``terminate()`` sends SIGTERM (a clean shutdown);
  both keep the directory and the ports, so ``restart()`` or ``start()`` brings the same server
  back with its data.
* ``restart()`` stops the process if it is running (SIGTERM, or SIGKILL with ``kill=True``) and
  starts it again on the same ports in the same directory.
* ``stop()`` is final: SIGTERM (SIGKILL after a timeout), then the directory is removed. It is
  idempotent and never hangs.

Processes and directories that are still alive when the interpreter exits are killed and removed
by an :mod:`atexit` handler, so an interrupted test run leaves no orphans behind.

The package, one module per concern (import from ``core.testing``; the names are re-exported):

* :mod:`core.testing.base`      free ports, :func:`require_binary`, :class:`Server` (one child
  process with its output), :class:`ManagedProcess` (what every restartable helper below
  shares: output across restarts, ``alive``, ``pid``, ``tail``, ``wait_for``, ``kill``, a
  ``with`` block), last-resort cleanup
* :mod:`core.testing.certs`     a throw-away CA and server certificates
* :mod:`core.testing.services`  :class:`RedisServer`, :class:`MosquittoServer`,
  :class:`NgircdServer`, :class:`InspircdServer` (IRC with SASL), :class:`IrcLines`
* :mod:`core.testing.redis_cluster` :class:`RedisClusterServers` (a local Redis Cluster),
  :class:`ReplicatedRedis` (a master and a replica, for failover tests)
* :mod:`core.testing.worker`    :class:`DjangoWorker`: a real ``manage.py runworker``
* :mod:`core.testing.smtp`      :class:`SmtpSink`: the far side of ``email.send``
* :mod:`core.testing.clock`     :class:`ManualClock`: an injectable clock that moves on demand
* :mod:`core.testing.slack`     :class:`~core.testing.slack.FakeSlack`: Slack's Web API and
  Socket Mode on a loopback port, and a signing Events API client (import from that module)
* :mod:`core.testing.harness`   :func:`run_gateway` (in this process), :class:`GatewayProcess`
  (a child ``python -m gateways.<proto>.cli``), :func:`command`, :func:`receive`,
  :func:`until`, :func:`metric`, :func:`http_get`, :func:`inject_undecodable`

Nothing here imports pytest: the fixtures live in ``tests/conftest.py`` (one per server, and
``project``: ``tests.support.example.example_project`` on the test's Redis).
"""

from __future__ import annotations

from core.testing.base import (
    HOST,
    INSTALL_HINT,
    OUTPUT_LINES,
    WAIT,
    Server,
    ServerError,
    ServiceMissing,
    free_port,
    free_ports,
    require_binary,
)
from core.testing.certs import Certs, make_certs
from core.testing.clock import ManualClock
from core.testing.harness import (
    READY_LINE,
    STARTED_LINE,
    GatewayProcess,
    command,
    http_get,
    inject_undecodable,
    metric,
    metric_from_text,
    receive,
    run_gateway,
    until,
)
from core.testing.redis_cluster import RedisClusterServers, ReplicatedRedis
from core.testing.services import (
    InspircdServer,
    IrcLines,
    MosquittoServer,
    NgircdServer,
    RedisServer,
)
from core.testing.smtp import SmtpSink
from core.testing.worker import DjangoWorker

__all__ = [
    "HOST",
    "INSTALL_HINT",
    "OUTPUT_LINES",
    "READY_LINE",
    "STARTED_LINE",
    "WAIT",
    "Certs",
    "DjangoWorker",
    "GatewayProcess",
    "InspircdServer",
    "IrcLines",
    "ManualClock",
    "MosquittoServer",
    "NgircdServer",
    "RedisClusterServers",
    "RedisServer",
    "ReplicatedRedis",
    "Server",
    "ServerError",
    "ServiceMissing",
    "SmtpSink",
    "command",
    "free_port",
    "free_ports",
    "http_get",
    "inject_undecodable",
    "make_certs",
    "metric",
    "metric_from_text",
    "receive",
    "require_binary",
    "run_gateway",
    "until",
]
