"""Helpers that start real servers for integration tests and benchmarks.

What your own consumer tests may use is documented in docs/testing.md (the public part);
``example_project`` and the IRC script server need a checkout of this repository, and the DNS
fake of the email tests lives in ``tests/support/`` (not installed).

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
* :mod:`core.testing.irc`       :class:`ScriptedIrcServer`: a hostile IRC server whose
  connections run a test's script (:class:`IrcSession`: raw lines, floods)
* :mod:`core.testing.worker`    :class:`DjangoWorker`: a real ``manage.py runworker``
* :mod:`core.testing.smtp`      :class:`SmtpSink`: the far side of ``email.send``
* :mod:`core.testing.clock`     :class:`ManualClock`: an injectable clock that moves on demand
* :mod:`core.testing.slack`     :class:`~core.testing.slack.FakeSlack`: Slack's Web API and
  Socket Mode on a loopback port, and a signing Events API client (import from that module)
* :mod:`core.testing.harness`   :func:`run_gateway` (in this process), :class:`GatewayProcess`
  (a child ``python -m gateways.<proto>.cli``), :func:`command`, :func:`receive`,
  :func:`until`, :func:`metric`, :func:`http_get`, :func:`inject_undecodable`
* :mod:`core.testing.example`   :func:`example_project`: ``examples/`` on a layer with a fresh,
  migrated database, and the gateways and workers that share its environment

Nothing here imports pytest: the fixtures live in ``tests/conftest.py`` (one per server, and
``project``: :func:`example_project` on the test's Redis).
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
from core.testing.example import EXAMPLES, ROOT, ExampleProject, example_project
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
from core.testing.irc import IrcSession, ScriptedIrcServer
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
    "EXAMPLES",
    "HOST",
    "INSTALL_HINT",
    "OUTPUT_LINES",
    "READY_LINE",
    "ROOT",
    "STARTED_LINE",
    "WAIT",
    "Certs",
    "DjangoWorker",
    "ExampleProject",
    "GatewayProcess",
    "InspircdServer",
    "IrcLines",
    "IrcSession",
    "ManualClock",
    "MosquittoServer",
    "NgircdServer",
    "RedisClusterServers",
    "RedisServer",
    "ReplicatedRedis",
    "ScriptedIrcServer",
    "Server",
    "ServerError",
    "ServiceMissing",
    "SmtpSink",
    "command",
    "example_project",
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
