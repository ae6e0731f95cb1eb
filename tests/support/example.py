"""The example Django project (``examples/``) set up for one test: settings, a fresh database.

:func:`example_project` gives an :class:`ExampleProject`: the environment that points the
project's settings (``example.settings``) at a layer and at a SQLite file in a temporary
directory, with that database migrated. Everything a test starts from it shares that
environment: :meth:`ExampleProject.worker` (``manage.py runworker``), :meth:`ExampleProject.gateway`
(a gateway on one of ``examples/*.yaml``), :meth:`ExampleProject.server` (any other command,
``gateways run …``), and :meth:`ExampleProject.rows` reads what the consumers stored.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.testing.base import WAIT, Server, free_port
from core.testing.harness import GatewayProcess
from core.testing.worker import DjangoWorker

#: the repository checkout core.testing runs from, and its example project
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

#: how long ``manage.py migrate`` may take on a loaded machine
MIGRATE_TIMEOUT = 120.0


@dataclass
class ExampleProject:
    """The example project's environment for one test (see :func:`example_project`)."""

    directory: Path
    env: dict[str, str]

    @property
    def db(self) -> Path:
        """The SQLite file (``EXAMPLE_DB``)."""
        return Path(self.env["EXAMPLE_DB"])

    @property
    def health_port(self) -> int:
        """``HEALTH_PORT``: the port ``examples/*.yaml`` serve /readyz and /metrics on."""
        return int(self.env["HEALTH_PORT"])

    def migrate(self) -> None:
        """``manage.py migrate`` on :attr:`db` (blocking; raises on a non-zero exit)."""
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
            cwd=EXAMPLES,
            env={**os.environ, **self.env},
            check=True,
            timeout=MIGRATE_TIMEOUT,
        )

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """The rows of ``sql`` on :attr:`db` (waits for a consumer's write lock, like Django)."""
        # closing(): a connection's own `with` commits but does not close (3.13 warns)
        with contextlib.closing(sqlite3.connect(self.db, timeout=30)) as db:
            return list(db.execute(sql, params))

    def execute(self, sql: str, *params: object) -> None:
        """Run one statement on :attr:`db` and commit it (test fixtures: a row to find)."""
        with contextlib.closing(sqlite3.connect(self.db, timeout=30)) as db, db:
            db.execute(sql, params)

    def worker(self, *channels: str) -> DjangoWorker:
        """``manage.py runworker CHANNEL…`` in the project, started (it has no ready line)."""
        return DjangoWorker(EXAMPLES, channels, self.env).start()

    def gateway(
        self, config: str, *, env: Mapping[str, str] | None = None, **options: Any
    ) -> GatewayProcess:
        """A :class:`GatewayProcess` on ``examples/<config>`` (not started yet).

        The example files read ``GATEWAYS_LAYER``, ``HEALTH_PORT`` and their ports from the
        environment: :attr:`env`, with ``env`` over it (a second gateway needs its own
        ``HEALTH_PORT``). ``options`` go to :class:`GatewayProcess` (``ready_line``,
        ``extra_args``); the working directory is the checkout.
        """
        path = EXAMPLES / config
        proto = str(yaml.safe_load(path.read_text())["gateway"])
        merged = {**self.env, **(env or {})}
        options.setdefault("cwd", ROOT)
        return GatewayProcess(
            path, int(merged["HEALTH_PORT"]), gateway=proto, env=merged, **options
        )

    def server(self, argv: Sequence[str], ready: str, *, name: str | None = None) -> Server:
        """Any other command (``gateways run …``) in the project's environment, from ``ROOT``."""
        return Server(
            argv,
            ready,
            WAIT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            name=name,
        )


def example_project(
    directory: Path,
    layer: str = "memory://",
    *,
    migrate: bool = True,
    env: Mapping[str, str] | None = None,
) -> ExampleProject:
    """The example project on ``layer`` with a fresh database in ``directory`` (blocking).

    ``layer`` (a layer path, e.g. a :class:`RedisServer`'s ``url``) becomes ``EXAMPLE_LAYER``,
    what the consumers use, and ``GATEWAYS_LAYER``, what ``examples/*.yaml`` use (the default
    ``memory://`` only works with everything in one process: ``gateways run``).
    ``HEALTH_PORT`` is a free port, ``ATTACHMENT_STORE`` a folder in ``directory``; ``env``
    adds or overrides keys (``SMTP_PORT``, ``MQTT_PORT``…). With ``migrate`` the database is
    migrated before it returns (a few seconds: call it in a thread from a coroutine).
    """

    project = ExampleProject(
        directory,
        {
            "DJANGO_SETTINGS_MODULE": "example.settings",
            "PYTHONPATH": str(EXAMPLES),
            "EXAMPLE_DB": str(directory / "example.sqlite3"),
            "ATTACHMENT_STORE": str(directory / "attachments"),
            "HEALTH_PORT": str(free_port()),
            "EXAMPLE_LAYER": layer,
            "GATEWAYS_LAYER": layer,
            **(env or {}),
        },
    )
    if migrate:
        project.migrate()
    return project
