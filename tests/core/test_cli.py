"""The binaries (DESIGN §7): exit codes, one-line errors, SIGTERM drain, `gateways run`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.testing import RedisServer, Server, free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def email_yaml(tmp_path: Path, body: str = "", *, port: int = 0, layer: str = "") -> Path:
    path = tmp_path / "mail.yaml"
    layer_line = f"layer: {layer}\n" if layer else ""
    path.write_text(
        f"gateway: email\nname: mailbox\n{layer_line}email:\n  port: {port}\n"
        f"  accept: [example.com]\n{body}"
    )
    return path


def test_version() -> None:
    result = run("gateway-email", "--version")
    assert result.returncode == 0
    assert result.stdout.startswith("gateway-email 0.")


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        ("bogus", "invalid layer path 'bogus'"),
        ("kafka://x", "unknown scheme 'kafka'"),
        ("redis://:secretpw@", "no host"),
        ("nope.nothing:layer", "No module named 'nope'"),
    ],
)
def test_bad_layer_is_exit_2_one_line(tmp_path: Path, layer: str, fragment: str) -> None:
    result = run("gateway-email", "--config", str(email_yaml(tmp_path)), "--layer", layer)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "invalid layer path" in line]
    assert len(lines) == 1 and fragment in lines[0]


def test_no_layer_anywhere(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAYS_LAYER"}
    result = subprocess.run(
        ["gateway-email", "--config", str(email_yaml(tmp_path))],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no layer: pass --layer" in result.stderr


def test_memory_layer_needs_in_process_consumers(tmp_path: Path) -> None:
    result = run("gateway-email", "--config", str(email_yaml(tmp_path)), "--layer", "memory://")
    assert result.returncode == 2
    assert "only works when the consumers run in the same process" in result.stderr


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "gateway: email\nname: m\nemail: {accept: [x.org], prt: 25}\n",
            "email.prt: Extra inputs are not permitted",
        ),
        (
            "gateway: email\nname: m\nemail: {accept: [x.org], port: many}\n",
            "email.port: Input should be a valid integer",
        ),
        (
            'gateway: email\nname: m\nemail: {accept: [x.org], port: "${NO_SUCH_VAR}"}\n',
            "email.port: environment variable NO_SUCH_VAR is not set",
        ),
        ("gateway: email\nname: m\nemail: {accept: [x.org]\n", "invalid YAML"),
        ("gateway: email\nname: m\nemail: {port: 25}\n", "email.accept: Field required"),
        ("gateway: mqtt\nname: m\nemail: {accept: [x.org]}\n", "gateway: Input should be 'email'"),
    ],
)
def test_config_errors_exit_2_with_key_path(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    for extra in ([], ["--check-config"]):
        result = run("gateway-email", "--config", str(path), "--layer", "memory://", *extra)
        assert result.returncode == 2
        assert expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_check_config_ok(tmp_path: Path) -> None:
    path = email_yaml(tmp_path, layer="redis://127.0.0.1:1/0")
    result = run("gateway-email", "--config", str(path), "--check-config")
    assert result.returncode == 0 and result.stdout.strip() == f"{path}: ok"
    result = run("gateways", "run", str(EXAMPLES / "email.yaml"), "--check-config")
    assert result.returncode == 0, result.stderr


def test_port_taken_is_exit_3(tmp_path: Path, redis_server: RedisServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(
            "gateway-email",
            "--config",
            str(email_yaml(tmp_path, port=port)),
            "--layer",
            redis_server.url,
        )
    assert result.returncode == 3, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_sigterm_drains_and_exits_0(tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    gateway = Server(
        [
            "gateway-email",
            "--config",
            str(email_yaml(tmp_path, port=port)),
            "--layer",
            redis_server.url,
        ],
        "ready: events",
        cwd=ROOT,
    )
    with socket.create_connection(("127.0.0.1", port)) as client:
        assert client.recv(100).startswith(b"220 ")
    assert gateway.stop(signal.SIGTERM) == 0
    assert any("stopped" in line for line in gateway.output)


STUCK = """
import asyncio, os, signal
from channels.layers import InMemoryChannelLayer
from core import cli
from tests.core.test_service import EchoConfig, EchoGateway

class Stuck(EchoGateway):
    async def close(self):
        await asyncio.Event().wait()  # a bug: close never returns

cli.STOP_MARGIN = 0.5
gateway = Stuck(EchoConfig(name="stuck", shutdown_grace=0.5), InMemoryChannelLayer())
loop = asyncio.new_event_loop()
loop.call_later(0.5, os.kill, os.getpid(), signal.SIGTERM)
loop.run_until_complete(cli.serve([gateway]))
"""


def test_a_stop_that_hangs_ends_with_every_stack() -> None:
    done = subprocess.run(
        [sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 1, done.stderr
    assert "stop not done after 1.0 s" in done.stderr, done.stderr
    assert "in close\n  " in done.stderr and "in wait" in done.stderr, done.stderr


DONE_IN_TIME = """
import asyncio, os, signal
from channels.layers import InMemoryChannelLayer
from core import cli
from tests.core.test_service import EchoConfig, EchoGateway

cli.STOP_MARGIN = 0.5
gateway = EchoGateway(EchoConfig(name="prompt", shutdown_grace=0.5), InMemoryChannelLayer())
loop = asyncio.new_event_loop()
loop.call_later(0.5, os.kill, os.getpid(), signal.SIGTERM)
code = loop.run_until_complete(cli.serve([gateway]))
loop.run_until_complete(asyncio.sleep(8))  # the loop goes on past grace + margin (+ 5)
print("alive", code)
"""


def test_a_stop_that_ended_leaves_no_watchdog_behind() -> None:
    # the watchdog armed for the stop must not kill a process whose loop outlives serve()
    done = subprocess.run(
        [sys.executable, "-c", DONE_IN_TIME], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "alive 0" in done.stdout and "stop not done" not in done.stderr


def test_gateways_run_rejects_unknown_gateway(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("gateway: carrier-pigeon\nname: x\n")
    result = run("gateways", "run", str(path), "--layer", "memory://")
    assert result.returncode == 2
    assert "unknown gateway 'carrier-pigeon'" in result.stderr


def test_secrets_never_logged(tmp_path: Path) -> None:
    secret = tmp_path / "users"
    secret.write_text("alice:very-secret-pw\n")
    certs = tmp_path / "missing.pem"
    path = email_yaml(
        tmp_path,
        f"  auth: {{users_file: {secret}}}\n  relay: {{host: h, username: u, "
        f"password: other-secret-pw, tls: none}}\n"
        f"  tls: {{cert_file: {certs}, key_file: {certs}}}\n",
    )
    result = run("gateway-email", "--config", str(path), "--layer", "memory://")
    assert result.returncode == 2
    assert "email.relay: username needs tls" in result.stderr
    assert "email.tls.cert_file: Path does not point to a file" in result.stderr
    assert "secret-pw" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "layer",
    [
        # issue 14, item 4: the password was printed in clear
        "redis://:S3cret-pw@localhost:6379/0?capacity=abc",
        "redis://:S3cret-pw@localhost:6379/0?expiry=0",
        "redis://user:S3cret-pw@localhost:99999/0",
        "redis://:S3cret/pw@localhost:6379/0",  # a raw "/": no password to urlsplit
        "redis://:S3cret-pw@[::1/0",  # "Invalid IPv6 URL" escaped as a traceback
        "memory://:S3cret-pw@host",
    ],
)
def test_layer_path_errors_hide_the_password(tmp_path: Path, layer: str) -> None:
    result = run("gateway-email", "--config", str(email_yaml(tmp_path)), "--layer", layer)
    assert result.returncode == 2, result.stderr
    assert "S3cret" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if "invalid layer path" in line]
    assert len(lines) == 1 and ":***@" in lines[0], result.stderr


def test_gateways_version() -> None:
    result = run("gateways", "--version")
    assert result.returncode == 0 and result.stdout.startswith("gateways 0.")


def test_gateways_help_lists_every_subcommand() -> None:
    result = run("gateways", "--help")
    assert result.returncode == 0, result.stderr
    assert "{run,schedules}" in result.stdout and "next fire times" in result.stdout


def test_bad_log_level_env_is_exit_2_one_line(tmp_path: Path) -> None:
    for argv in (["gateway-email", "--config"], ["gateways", "run"]):
        path = email_yaml(tmp_path, layer="memory://")
        result = run(*argv, str(path), env={"GATEWAYS_LOG_LEVEL": "bogus"})
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"{argv[0]}: GATEWAYS_LOG_LEVEL='bogus' is not a log level: "
            "use DEBUG, INFO, WARNING, ERROR"
        ]


def test_missing_env_var_reports_only_the_cause(tmp_path: Path) -> None:
    path = tmp_path / "env.yaml"
    path.write_text(
        "gateway: email\nname: x\nlayer: memory://\n"
        "email:\n  port: ${NO_SUCH_PORT_VAR}\n  accept: [example.com]\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NO_SUCH_PORT_VAR"}
    result = subprocess.run(
        ["gateway-email", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gateway-email: {path}: email.port: environment variable NO_SUCH_PORT_VAR is not set"
    ]


def test_app_is_imported_from_the_working_directory(tmp_path: Path) -> None:
    """Issue 6 item 5: `--app example.asgi:application` from examples/ without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}
    env.update(EXAMPLE_DB=str(tmp_path / "db.sqlite3"), SMTP_PORT=str(free_port()))
    result = subprocess.run(
        ["gateways", "run", "email.yaml", "--app", "example.asgi:application", "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=EXAMPLES,
    )
    assert result.returncode == 0, result.stderr
    # and a mistake in what --app names is one line, exit 2
    result = subprocess.run(
        ["gateways", "run", "email.yaml", "--app", "example.nope:application"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=EXAMPLES,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gateways: invalid --app 'example.nope:application': No module named 'example.nope'"
    ]


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ("nosuch.settings", "DJANGO_SETTINGS_MODULE='nosuch.settings': ModuleNotFoundError"),
        ("example.settings_broken", "DJANGO_SETTINGS_MODULE='example.settings_broken'"),
    ],
)
def test_django_settings_mistake_is_one_line_exit_2(
    tmp_path: Path, settings: str, fragment: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(DJANGO_SETTINGS_MODULE=settings, EXAMPLE_DB=str(tmp_path / "db.sqlite3"))
    result = subprocess.run(
        ["gateways", "run", "email.yaml", "--layer", "memory://"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=EXAMPLES,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gateways: ") and fragment in lines[0], lines


def test_password_query_parameters_never_shown(tmp_path: Path, start_service: Any) -> None:
    """Issue 21, item 16: redis-py takes ``?password=…`` in the URL, and the layer path was
    logged whole at INFO on every start; errors and --check-config showed it too."""
    redis = start_service(RedisServer(extra_args=["--requirepass", "S3cretQ"]))
    layer = f"redis://127.0.0.1:{redis.port}/0?password=S3cretQ&capacity=100"
    gateway = Server(
        [
            "gateway-email",
            "--config",
            str(email_yaml(tmp_path, port=free_port())),
            "--layer",
            layer,
        ],
        "ready: events",  # authenticated with the password from the query string
        cwd=ROOT,
    )
    assert gateway.stop(signal.SIGTERM) == 0
    output = "\n".join(gateway.output)
    assert "S3cret" not in output
    assert f"layer redis://127.0.0.1:{redis.port}/0?password=***&capacity=100" in output
    for bad in (
        "redis://h:6379/0?password=S3cretA&capacity=abc",
        "redis://h:6379/0?capacity=abc&ssl_password=S3cretB&x_api-key=S3cretC",
        "redis://u:S3cretD@h:6379/0?token=S3cretE&layer=bogus",
        "memory://?secret=S3cretF",
    ):
        for extra in ([], ["--check-config"]):
            result = run(
                "gateway-email", "--config", str(email_yaml(tmp_path)), "--layer", bad, *extra
            )
            assert result.returncode == 2, result.stderr
            assert "S3cret" not in result.stderr + result.stdout, result.stderr
            assert len(result.stderr.splitlines()) == 1 and "=***" in result.stderr


BINARIES = [
    ("gateway-email", "email.yaml"),
    ("gateway-irc", "irc.yaml"),
    ("gateway-mqtt", "sensors.yaml"),
    ("gateway-slack", "slack.yaml"),
    ("gateway-http-ws", "web.yaml"),
    ("gateway-scheduler", "scheduler.yaml"),
    ("gateways run", "email.yaml"),
]
LAYER_MODULES = {
    "badimport": 'raise RuntimeError("no redis://:S3cretG@db/0?password=S3cretH\\nat all")\n',
    "badfactory": "def make():\n    raise ValueError('token=S3cretJ refused')\n",
    "badsyntax": "def make(:\n",
    "exits": "import sys\nsys.exit(7)\n",
}


@pytest.mark.parametrize(("binary", "example"), BINARIES)
def test_a_layer_module_that_raises_is_one_line_exit_2(
    tmp_path: Path, binary: str, example: str
) -> None:
    """Issue 21, item 17: ``--layer badmod:make`` whose module raised at import was a 40-line
    traceback, exit 1, unredacted; the README says one line, exit 2, for every binary."""
    for name, source in LAYER_MODULES.items():
        (tmp_path / f"{name}.py").write_text(source)
    unset = ("PYTHONPATH", "GATEWAYS_LAYER", "DJANGO_SETTINGS_MODULE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(SLACK_BOT_TOKEN="xoxb-test", SLACK_APP_TOKEN="xapp-test")
    expected = {
        "badimport": "importing it raised RuntimeError: no redis://:***@db/0?password=*** at all",
        "badfactory": "make() raised ValueError: token=*** refused",
        "badsyntax": "importing it raised SyntaxError: ",
        "exits": "importing it raised SystemExit: 7",
    }
    config = (
        [str(EXAMPLES / example)]
        if binary == "gateways run"
        else ["--config", str(EXAMPLES / example)]
    )
    for name, fragment in expected.items():
        result = subprocess.run(
            [*binary.split(), *config, "--layer", f"{name}:make"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,  # the binaries import layer modules from the working directory
        )
        lines = result.stderr.splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1, result.stderr
        assert f"invalid layer path '{name}:make': {fragment}" in lines[0], lines[0]
        assert "S3cret" not in result.stderr + result.stdout
