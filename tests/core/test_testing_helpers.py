"""The shared test helpers of core/testing/ against real processes and servers."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from core.testing import (
    GatewayProcess,
    InspircdServer,
    ManualClock,
    RedisServer,
    command,
    metric,
    metric_from_text,
    receive,
    run_gateway,
    until,
)
from gateways.email.config import EmailGatewayConfig
from gateways.email.gateway import EmailGateway
from tests.support.example import example_project

ROOT = Path(__file__).resolve().parents[2]


async def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(monotonic=10.0, wall=1000.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 2.0), ("a", 1.0), ("c", 5.0))]
    await clock.sleeping(3)
    assert woke == [] and clock.wall() == 1000.0
    await clock.advance(2.5)
    assert woke == [("a", 11.0), ("b", 12.0)]
    assert clock.monotonic() == 12.5 and clock.wall() == 1002.5 and clock.sleepers == 1
    await clock.advance(10)
    assert woke[-1] == ("c", 15.0)
    await asyncio.gather(*tasks)


def email_config(name: str) -> dict[str, Any]:
    return {
        "gateway": "email",
        "name": name,
        "layer": "memory://",
        "email": {"port": 0, "hostname": "mx.example.com", "accept": ["example.com"]},
    }


async def test_run_gateway_command_and_metric() -> None:
    config = EmailGatewayConfig.model_validate(email_config("helpers-inproc"))
    layer = InMemoryChannelLayer()
    async with run_gateway(EmailGateway(config, layer)) as gateway:
        assert gateway.ready_reasons() == []
        result = await command(layer, "helpers-inproc.send", {"type": "email.nope"})
        assert result["ok"] is False and result["error"] == "unknown command 'email.nope'"
        assert metric("gateway_transport_connected", gateway="helpers-inproc") == 1
    assert metric("gateway_commands_total", gateway="helpers-inproc", type="unknown") == 1
    assert metric("gateway_transport_connected", gateway="helpers-inproc") == 0


async def test_until_names_what_it_waited_for() -> None:
    assert await until(lambda: 42) == 42
    with pytest.raises(TimeoutError, match="the impossible"):
        await until(lambda: False, timeout=0.05, what="the impossible")


async def test_until_awaits_what_the_predicate_returns() -> None:
    calls: list[int] = []

    def blocking_probe() -> int | None:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else None

    assert await until(lambda: asyncio.to_thread(blocking_probe)) == 3


async def test_receive_skips_what_does_not_match() -> None:
    layer = InMemoryChannelLayer()
    for message in (
        {"type": "irc.joined", "channel": "#a"},
        {"type": "irc.message", "channel": "#ops"},
        {"type": "irc.joined", "channel": "#ops"},
    ):
        await layer.send("ops", message)
    # "channel" is a message key here, not the layer channel (positional-only parameters)
    joined = await receive(layer, "ops", "irc.joined", channel="#ops")
    assert joined == {"type": "irc.joined", "channel": "#ops"}
    with pytest.raises(TimeoutError):
        await receive(layer, "ops", timeout=0.05)


def test_example_project_is_migrated_in_its_directory(tmp_path: Path) -> None:
    project = example_project(tmp_path, env={"SMTP_PORT": "2999"})
    assert project.db == tmp_path / "example.sqlite3" and project.db.is_file()
    assert project.rows("SELECT count(*) FROM mail_mail") == [(0,)]
    assert project.env["EXAMPLE_LAYER"] == project.env["GATEWAYS_LAYER"] == "memory://"
    assert project.env["SMTP_PORT"] == "2999" and project.health_port > 0
    gateway = project.gateway("email.yaml", env={"HEALTH_PORT": "1234"})
    assert gateway.module == "gateways.email.cli" and gateway.health_port == 1234
    assert gateway.env["EXAMPLE_DB"] == str(project.db)


def test_metric_from_text() -> None:
    text = (
        "# TYPE gateway_dropped counter\n"
        'gateway_dropped_total{gateway="a",reason="x"} 2.0\n'
        'gateway_dropped_total{gateway="a",reason="y"} 3.0\n'
        'gateway_dropped_total{gateway="b",reason="x"} 5.0\n'
    )
    assert metric_from_text(text, "gateway_dropped_total", gateway="a") == 5
    assert metric_from_text(text, "gateway_dropped_total", reason="x") == 7
    assert metric_from_text(text, "gateway_dropped_total", gateway="c") == 0


async def test_gateway_process(tmp_path: Path, redis_server: RedisServer) -> None:
    config = {**email_config("helpers-proc"), "layer": redis_server.url}
    process = GatewayProcess.from_config(tmp_path, config, cwd=ROOT)
    await asyncio.to_thread(process.start)
    try:
        await process.wait_ready()
        assert process.metric("gateway_transport_connected", gateway="helpers-proc") == 1
    finally:
        assert await asyncio.to_thread(process.stop) == 0


def test_inspircd_atheme_sasl_plain(inspircd_server: InspircdServer) -> None:
    from core.testing import IrcLines

    inspircd_server.register("alice", "wonder-land")
    for password, numeric in (("wonder-land", " 903 "), ("wrong", " 904 ")):
        client = IrcLines(inspircd_server.port)
        try:
            client.send("CAP LS 302", "CAP REQ :sasl", "NICK bot", "USER bot 0 * :bot")
            client.wait_for("CAP * ACK :sasl")
            client.send("AUTHENTICATE PLAIN")
            assert client.wait_for("AUTHENTICATE").split()[-1].lstrip(":") == "+"
            token = base64.b64encode(f"alice\0alice\0{password}".encode()).decode()
            client.send(f"AUTHENTICATE {token}")
            assert numeric in client.wait_for(" 903 ", " 904 ")
            if numeric == " 903 ":
                client.send("CAP END")
                client.wait_for(" 001 ")
        finally:
            client.close()
