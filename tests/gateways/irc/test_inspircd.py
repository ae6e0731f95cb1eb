"""The IRC gateway on InspIRCd (CASEMAPPING=rfc1459): what differs from ngircd (ascii)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.testing import WAIT, GatewayProcess, InspircdServer, RedisServer, until
from tests.gateways.irc.conftest import Peer, irc_config, next_event, running

pytestmark = pytest.mark.timeout(120)


async def test_rfc1459_case_mapping_for_nicks_and_channels(
    inspircd_server: InspircdServer,
) -> None:
    # issue 21, item 6: names compare under the server's mapping; on rfc1459 [] and {} are
    # one letter, so the channel the server echoes as #x{y} is the #X[Y] we asked for
    port = inspircd_server.port
    alice = await Peer.connect(port, "alice", "#x{y}")  # she creates it: its spelling, her op
    try:
        config = irc_config(
            port, nick="acc[gw]", username="accgw", channels=["#X[Y]"], rejoin_after_kick=False
        )
        async with running(config) as (gateway, layer):
            joined = await next_event(layer, "irc.joined", self=True)
            assert joined["channel"] == "#x{y}"
            assert gateway.client.casemapping == "rfc1459"
            assert len(gateway.channels) == 1  # one channel, not adopted a second time
            twin = await asyncio.open_connection("127.0.0.1", port)  # acc{gw} is us here
            try:
                twin[1].write(b"NICK ACC{GW}\r\nUSER twin 0 * :twin\r\n")
                while b" 433 " not in (line := await asyncio.wait_for(twin[0].readline(), WAIT)):
                    assert b" 001 " not in line
            finally:
                twin[1].close()
            await alice.send("KICK #x{y} ACC{GW} :out")
            kicked = await next_event(layer, "irc.kicked")
            assert kicked["self"] is True
            await until(lambda: len(gateway.channels) == 0, what="the channel given up")
    finally:
        await alice.close()


async def test_a_user_name_the_server_refuses_exits_3_once(
    inspircd_server: InspircdServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    # issue 21, item 8: InspIRCd answers USER ~acc with 468 and waits for a registration timeout
    config = {**irc_config(inspircd_server.port, username="~acc"), "layer": redis_server.url}
    process = GatewayProcess.from_config(tmp_path, config, ready_line=None).start()
    await asyncio.to_thread(process.wait_for, "could not start", WAIT)
    code = await asyncio.to_thread(process.wait, WAIT)
    output = process.tail()
    assert code == 3, output
    assert "refused the user name '~acc'" in output
    assert output.count("could not start") == 1 and "reconnecting" not in output
