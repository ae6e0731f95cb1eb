"""Two ``gateway-email`` replicas of one integration on two ports, one Redis: a mail accepted
(``250``) by either reaches the consumer once, and when one is killed with SIGKILL the other
carries on; every mail the killed one accepted is still delivered."""

from __future__ import annotations

import asyncio
import smtplib
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import pytest

from core.layers import resolve_layer
from core.testing import HOST, GatewayProcess, RedisServer, free_port
from tests.support.example import ROOT

pytestmark = [pytest.mark.timeout(240), pytest.mark.replicas]


def replica(tmp_path: Path, redis: RedisServer) -> tuple[GatewayProcess, int]:
    port = free_port()
    config = {
        "gateway": "email",
        "name": "support",
        "layer": redis.url,
        "shutdown_grace": 5,
        "email": {"port": port, "accept": ["example.com"], "verify": "off"},
    }
    return GatewayProcess.from_config(tmp_path, config, cwd=ROOT), port


def send(port: int, number: int) -> None:
    """One mail; raises unless it was accepted (250)."""
    mail = EmailMessage()
    mail["From"], mail["To"] = "alice@example.org", "support@example.com"
    mail["Subject"], mail["Message-ID"] = f"mail {number}", f"<replica-{number}@example.org>"
    mail.set_content(f"number {number}")
    with smtplib.SMTP(HOST, port, timeout=30) as client:
        client.send_message(mail)


async def test_a_mail_accepted_by_either_replica_reaches_the_consumer_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    first, first_port = replica(tmp_path, redis_server)
    second, second_port = replica(tmp_path, redis_server)
    layer = resolve_layer(redis_server.url)
    accepted: list[int] = []
    try:
        await asyncio.to_thread(first.start)
        await asyncio.to_thread(second.start)
        for number in range(40):  # alternately to each replica
            port = first_port if number % 2 else second_port
            await asyncio.to_thread(send, port, number)
            accepted.append(number)
        assert first.kill() == -9  # kill -9 the one; the other carries on
        for number in range(40, 60):
            await asyncio.to_thread(send, second_port, number)
            accepted.append(number)
        seen: Counter[str] = Counter()
        while sum(seen.values()) < len(accepted):
            message = await asyncio.wait_for(layer.receive("support"), 30)
            if message["type"] == "email.receive":
                seen[message["message_id"]] += 1
        assert sorted(seen) == sorted(f"<replica-{n}@example.org>" for n in accepted)
        assert set(seen.values()) == {1}
        handled = second.metric("gateway_events_total", type="email.receive")
        assert handled == 40  # 20 of the first 40, then all 20 after the kill
    finally:
        code = second.stop()
        first.stop()
        await layer.close_pools()
    assert code == 0
