"""`manage.py rungateway` and the hardened `manage.py runworker` of the `gateways` Django app."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

from core.layers import resolve_layer
from core.retry import send_command
from core.testing import RedisServer, Server, free_port
from gateways import entry
from gateways.entry import BINARIES
from tests.support.example import EXAMPLES, ROOT, ExampleProject, example_project


def example(redis: RedisServer, tmp_path: Path) -> ExampleProject:
    """The example project on ``redis``, not migrated, its gateways on the project's layer."""
    env = {"SMTP_PORT": str(free_port()), "RELAY_PORT": str(free_port())}
    project = example_project(tmp_path, redis.url, migrate=False, env=env)
    del project.env["GATEWAYS_LAYER"]  # what is tested: the layer comes from CHANNEL_LAYERS
    return project


def example_env(redis: RedisServer, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **example(redis, tmp_path).env}


def test_rungateway_check_config(redis_server: RedisServer, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "rungateway", "email.yaml", "--check-config"],
        cwd=EXAMPLES,
        env=example_env(redis_server, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "email.yaml: ok" in result.stdout


async def test_rungateway_uses_the_project_layer(redis_server: RedisServer, tmp_path: Path) -> None:
    """The default layer is the project's CHANNEL_LAYERS: a mail lands on the project's Redis."""
    env = example_env(redis_server, tmp_path)
    gateway = await asyncio.to_thread(
        Server,
        [sys.executable, "manage.py", "rungateway", "email.yaml"],
        "ready: events",
        cwd=EXAMPLES,
        env=env,
    )
    try:
        import aiosmtplib

        await aiosmtplib.send(
            b"Subject: via rungateway\r\nMessage-ID: <rg@x>\r\n\r\nhi\r\n",
            sender="a@example.org",
            recipients=["support@example.com"],
            hostname="127.0.0.1",
            port=int(env["SMTP_PORT"]),
        )
        layer = resolve_layer(redis_server.url)
        event = await asyncio.wait_for(layer.receive("support-mail"), 10)
        assert event["type"] == "email.receive" and event["id"] == "<rg@x>"
        await layer.close_pools()
    finally:
        assert await asyncio.to_thread(gateway.stop, signal.SIGTERM) == 0, gateway.tail()


async def test_runworker_is_the_hardened_worker(redis_server: RedisServer, tmp_path: Path) -> None:
    """With "gateways" before "channels", runworker survives a Redis restart and drains."""
    project = example(redis_server, tmp_path)
    await asyncio.to_thread(project.migrate)
    env = {**os.environ, **project.env}
    worker = await asyncio.to_thread(
        Server,
        [sys.executable, "manage.py", "runworker", "support-mail"],
        "Running worker",
        cwd=EXAMPLES,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    layer = resolve_layer(redis_server.url)
    try:
        # a message without type is skipped, not fatal (channels' worker would stop listening);
        # seeing it skipped also proves the listener is receiving before Redis goes away
        await layer.send("support-mail", {"no": "type"})
        await asyncio.to_thread(worker.wait_for, "skipped a message without 'type'", 15)
        await asyncio.to_thread(redis_server.restart, kill=True)
        # it notices: an outage it retries, or, when redis-py's own retries reached the
        # restarted server first (a quick restart), the data lost with it (a local CI run
        # printed only the second)
        await asyncio.to_thread(worker.wait_for, ("retrying in", "is gone"), 15)
        await send_command(layer, "support-mail", {"again": "no type"})  # retries the dead socket
        await asyncio.to_thread(worker.wait_for, "skipped a message without 'type'", 15)
        assert worker.alive
    finally:
        assert await asyncio.to_thread(worker.stop, signal.SIGTERM) == 0, worker.tail()
        await layer.close_pools()


def make_project_with_core_app(tmp_path: Path) -> Path:
    """`django-admin startproject` plus an app of its own named `core` (issue 6 item 3)."""
    subprocess.run(
        [sys.executable, "-m", "django", "startproject", "site_conf", str(tmp_path)],
        check=True,
        timeout=60,
    )
    app = tmp_path / "core"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "apps.py").write_text(
        "from django.apps import AppConfig\n\n\nclass CoreConfig(AppConfig):\n    name = 'core'\n"
    )
    settings = tmp_path / "site_conf" / "settings.py"
    settings.write_text(
        settings.read_text().replace(
            "INSTALLED_APPS = [",
            "INSTALLED_APPS = [\n    'core',\n    'gateways',\n    'channels',",
        )
    )
    (tmp_path / "mail.yaml").write_text(
        "gateway: email\nname: m\nemail:\n  port: 0\n  accept: [example.com]\n"
    )
    return tmp_path


def test_a_project_core_app_is_named_in_one_line(tmp_path: Path) -> None:
    """Every binary and both management commands: one line naming what shadows `core`, exit 2
    (issue 29: four of the binaries printed a traceback)."""
    project = make_project_with_core_app(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}
    expected = f"'core' is {project / 'core'}"
    commands = [
        [sys.executable, "manage.py", "rungateway", "mail.yaml"],
        [sys.executable, "manage.py", "runworker", "m"],
    ]
    for argv in commands:
        result = subprocess.run(
            argv, cwd=project, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
        assert "No module named" not in result.stderr
    # every console script, with the project on the path (what `--app` or PYTHONPATH=. would
    # do); each is installed beside this interpreter
    bin_dir = Path(sys.executable).parent
    for binary in BINARIES:
        argv = [str(bin_dir / binary), "--config", "mail.yaml", "--layer", "memory://"]
        if binary == "gateways":
            argv = [str(bin_dir / binary), "run", "mail.yaml", "--layer", "memory://"]
        result = subprocess.run(
            argv,
            cwd=project,
            env={**env, "PYTHONPATH": str(project)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, (binary, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{binary}: ") and expected in lines[0], (
            binary,
            lines,
        )
    # run from the project directory without it on the path, the binaries work
    result = subprocess.run(
        [
            str(bin_dir / "gateway-email"),
            "--config",
            "mail.yaml",
            "--layer",
            "memory://",
            "--check-config",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_every_console_script_goes_through_the_core_check() -> None:
    """A binary added to pyproject.toml without gateways.entry would skip the check."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(BINARIES)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module == "gateways.entry", name
        assert callable(getattr(entry, function)), name


async def test_rungateway_prints_each_line_once(redis_server: RedisServer, tmp_path: Path) -> None:
    """Issue 6 item 8: Django's LOGGING console handler and ours printed every line twice."""
    gateway = await asyncio.to_thread(
        Server,
        [sys.executable, "manage.py", "rungateway", "email.yaml"],
        "ready: events",
        cwd=EXAMPLES,
        env=example_env(redis_server, tmp_path),
    )
    assert gateway.stop(signal.SIGTERM) == 0
    ready = [line for line in gateway.output if "ready: events" in line]
    assert len(ready) == 1, gateway.output
    # UTC with a Z, the same in every process of the suite
    assert ready[0][:20].endswith("Z"), ready[0]
