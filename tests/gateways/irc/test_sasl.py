"""SASL against real InspIRCd + Atheme: success in process, a bad password is exit 3 at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.testing import WAIT, GatewayProcess, InspircdServer, RedisServer
from gateways.irc.translate import sasl_payload
from tests.gateways.irc.conftest import Peer, irc_config, next_event, running

pytestmark = pytest.mark.timeout(120)


async def test_sasl_plain_success(inspircd_server: InspircdServer) -> None:
    await asyncio.to_thread(inspircd_server.register, "botacct", "s3cret-pw")
    config = irc_config(
        inspircd_server.port,
        channels=["#ops"],
        sasl={"username": "botacct", "password": "s3cret-pw"},
    )
    async with running(config) as (_gateway, layer):
        connect = await next_event(layer, "irc.connect")
        assert "sasl" in connect["capabilities"]  # (this InspIRCd loads no server-time module)
        alice = await Peer.connect(inspircd_server.port, "alice", "#ops")
        try:
            await alice.send("WHOIS bot")
            assert "botacct" in await alice.expect(" 330 ")  # logged in as the account
            await alice.send("PRIVMSG #ops :after sasl")
            assert (await next_event(layer, "irc.receive"))["text"] == "after sasl"
        finally:
            await alice.close()


async def test_sasl_bad_password_exits_3_without_retrying(
    inspircd_server: InspircdServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    await asyncio.to_thread(inspircd_server.register, "botacct", "s3cret-pw")
    config = irc_config(
        inspircd_server.port, sasl={"username": "botacct", "password": "wrong-password"}
    )
    config = {**config, "layer": redis_server.url}
    process = GatewayProcess.from_config(tmp_path, config, ready_line=None).start()
    await asyncio.to_thread(process.wait_for, "SASL PLAIN refused by the server", WAIT)
    code = await asyncio.to_thread(process.wait, WAIT)  # every output line read by then
    output = process.tail()
    assert code == 3, output
    assert "could not start" in output
    assert "wrong-password" not in output
    assert output.count("could not start") == 1 and "reconnecting" not in output  # no retry loop


async def test_the_password_is_not_logged_at_debug_not_even_in_base64(
    inspircd_server: InspircdServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    # issue 21, item 15: "DEBUG irc.client_aio: RAW: AUTHENTICATE <base64 of the payload>"
    password = "s3cret-pw-for-debug"
    await asyncio.to_thread(inspircd_server.register, "botacct", password)
    config = irc_config(inspircd_server.port, sasl={"username": "botacct", "password": password})
    config = {**config, "layer": redis_server.url}
    process = GatewayProcess.from_config(
        tmp_path, config, extra_args=["--log-level", "debug"], output_lines=100_000
    ).start()
    try:
        await process.wait_ready()
    finally:
        code = await asyncio.to_thread(process.stop)
    output = "\n".join(process.output)
    assert code == 0, process.tail()
    assert "AUTHENTICATE ***" in output  # the line is logged at DEBUG, its payload masked
    payload = sasl_payload("PLAIN", "botacct", password)
    for secret in (password, *payload, "".join(payload)):
        assert secret not in output
