"""A real ``manage.py runworker`` (or ``gateways run``) of an example project."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Self

from core.testing.base import _STOP_TIMEOUT, ManagedProcess, Server

# --------------------------------------------------------------------------------------------
# Django worker


class DjangoWorker(ManagedProcess):
    """``python manage.py runworker CHANNEL…`` in ``project_dir``, as a managed child process.

    ``env`` is merged over :data:`os.environ` (``PYTHONUNBUFFERED=1`` is added so log lines arrive
    promptly). Output goes into :attr:`output` like a :class:`Server`'s. There is no ready line:
    :meth:`start` returns right after the spawn; use :meth:`wait_ready` with a probe (e.g. a
    round trip through the layer) or :meth:`wait_for` on a log line.
    """

    def __init__(
        self,
        project_dir: str | os.PathLike[str],
        channels: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        python: str = sys.executable,
        extra_args: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.project_dir = Path(project_dir)
        self.channels = list(channels)
        self.env = dict(env or {})
        self.python = python
        self.extra_args = list(extra_args)

    def __repr__(self) -> str:
        return f"<DjangoWorker {self.channels} pid={self.pid} alive={self.alive}>"

    @property
    def argv(self) -> list[str]:
        """The command line."""
        return [self.python, "manage.py", "runworker", *self.channels, *self.extra_args]

    def start(self) -> Self:
        """Spawn the worker (no-op if running); returns at once."""
        if self.alive:
            return self
        if not (self.project_dir / "manage.py").is_file():
            raise FileNotFoundError(f"no manage.py in {self.project_dir}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.server = Server(
            self.argv, None, cwd=self.project_dir, env=env, output=self.output, name="runworker"
        )
        return self

    def wait_ready(
        self, probe: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05
    ) -> None:
        """Call ``probe`` until it returns True; raise if the worker exits or time runs out.

        Exceptions from ``probe`` count as "not yet"; the last one is chained on timeout.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if self.server is None:
                raise RuntimeError("DjangoWorker was never started")
            if not self.server.alive:
                raise self.server.error(f"exited with status {self.server.returncode}")
            try:
                if probe():
                    return
            except Exception as exc:  # any failure means "not ready yet"
                last = exc
            if time.monotonic() > deadline:
                err = self.server.error(f"not ready within {timeout:g} s")
                raise TimeoutError(str(err)) from last
            time.sleep(interval)

    def stop(self, timeout: float = _STOP_TIMEOUT) -> int | None:
        """SIGTERM, SIGKILL after ``timeout`` s; the exit status. Idempotent."""
        return self.server.stop(signal.SIGTERM, timeout) if self.server is not None else None

    def restart(self, *, kill: bool = False) -> Self:
        """Stop (SIGTERM, or SIGKILL if ``kill``) and spawn again."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()
