"""Fault: Redis is killed while 500 mails are being sent; nothing is lost, nothing gets a 5xx.

Every process is real: gateway-email, a durable redis-server (AOF, fsync always: a Redis that
loses acknowledged writes on a crash would lose mail whatever the gateway does), manage.py
runworker, and SMTP clients that retry 4xx answers the way an MTA does.
"""

from __future__ import annotations

import asyncio
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from core.testing import GatewayProcess, RedisServer
from tests.gateways.email.conftest import make_example
from tests.support.example import ROOT

MAILS = 500
CLIENTS = 8


async def test_redis_killed_mid_stream(tmp_path: Path, durable_redis_server: RedisServer) -> None:
    redis = durable_redis_server
    example = await make_example(tmp_path, redis)
    config = {
        "gateway": "email",
        "name": "support-mail",
        "email": {
            "port": example.smtp_port,
            "accept": ["support@example.com"],
            "accept_timeout": 1,
            "verify": "off",  # no DNS of this machine's in a test about Redis
            "relay": {
                "host": "127.0.0.1",
                "port": example.sink.port,
                "tls": "none",
                "retries": 10,
                "retry_max_delay": 2,
            },
        },
    }
    gateway = GatewayProcess.from_config(tmp_path, config, env=example.env, cwd=ROOT).start()
    worker = example.project.worker("support-mail")
    outcomes: dict[str, list[int]] = {}
    accepted = 0
    worker_restarts = 0
    quarter_in = asyncio.Event()

    async def client(numbers: list[int]) -> None:
        nonlocal accepted
        for n in numbers:
            mail = EmailMessage()
            mail["From"] = f"user{n}@example.org"
            mail["To"] = "support@example.com"
            mail["Subject"] = f"mail {n}"
            mail["Message-ID"] = f"<fault-{n}@example.org>"
            mail.set_content(f"body {n}\n")
            codes = outcomes.setdefault(mail["Message-ID"], [])
            while True:
                try:
                    await aiosmtplib.send(
                        mail, hostname="127.0.0.1", port=example.smtp_port, timeout=30
                    )
                except aiosmtplib.SMTPResponseException as exc:
                    codes.append(exc.code)
                    if exc.code >= 500:
                        break
                    await asyncio.sleep(0.2)  # an MTA would wait minutes
                    continue
                codes.append(250)
                accepted += 1
                if accepted == MAILS // 4:
                    quarter_in.set()
                break

    async def chaos() -> None:
        await quarter_in.wait()
        await asyncio.to_thread(redis.kill)
        await asyncio.sleep(2)
        await asyncio.to_thread(redis.restart)

    async def supervisor() -> None:
        """What systemd's Restart=always does for runworker, which exits when Redis goes away."""
        nonlocal worker_restarts
        while True:
            await asyncio.sleep(0.5)
            if not worker.alive:
                worker_restarts += 1
                await asyncio.to_thread(worker.start)

    supervising = asyncio.create_task(supervisor())
    try:
        await asyncio.wait_for(
            asyncio.gather(
                chaos(), *(client(list(range(i, MAILS, CLIENTS))) for i in range(CLIENTS))
            ),
            240,
        )
        # every accepted mail reaches the consumer once Redis is back
        deadline = asyncio.get_running_loop().time() + 60
        while len(rows := await asyncio.to_thread(example.rows)) < MAILS:
            if asyncio.get_running_loop().time() > deadline:
                missing = sorted(set(outcomes) - {r[0] for r in rows})
                detail = {m: outcomes[m] for m in missing}
                raise AssertionError(
                    f"{len(missing)} lost: {detail}\n{worker.tail()}\n{gateway.tail()}"
                )
            await asyncio.sleep(0.5)
    except BaseException:
        print("--- gateway ---\n" + gateway.tail() + "\n--- worker ---\n" + worker.tail())
        codes = [c for h in outcomes.values() for c in h]
        print(f"accepted={accepted} 451s={codes.count(451)} restarts={worker_restarts}")
        raise
    finally:
        supervising.cancel()
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(gateway.stop)
        await example.sink.stop()

    codes = [code for history in outcomes.values() for code in history]
    assert not [c for c in codes if c >= 500], "a 5xx was answered"
    assert all(history[-1] == 250 for history in outcomes.values())
    assert codes.count(451) > 0, "the outage was never hit: the test proved nothing"
    # consumed exactly once: one row per mail (the consumer de-duplicates on the event id,
    # which is the Message-ID, so a mail the client re-sent after a 451 is stored once)
    assert sorted(r[0] for r in rows) == sorted(outcomes)
    print(
        f"\n{MAILS} mails: {codes.count(451)} answered 451 and retried, "
        f"runworker restarted {worker_restarts}x, {len(rows)} stored"
    )
