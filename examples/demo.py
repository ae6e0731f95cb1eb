"""The example, end to end, in one process: no Redis, no external server.

    python examples/demo.py

It starts the email gateway (examples/email.yaml) on the in-memory layer with the example's
Django consumers in the same process, a stand-in relay that prints what reaches it, sends one
mail with a real SMTP client, waits for the consumer's reply to come out of the relay, and
stops everything with SIGTERM the way a service manager would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Relay:
    """A stand-in for the outbound relay: hands every message it gets to a queue."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[Any] = asyncio.Queue()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await self.received.put(envelope)
        return "250 OK"


async def main() -> int:
    import aiosmtplib
    from aiosmtpd.smtp import SMTP
    from example.asgi import application

    from core.cli import install_layer, serve
    from core.config import load_config
    from core.layers import resolve_layer
    from gateways.email.config import EmailGatewayConfig
    from gateways.email.gateway import EmailGateway

    relay = Relay()
    loop = asyncio.get_running_loop()
    relay_server = await loop.create_server(
        lambda: SMTP(relay), "127.0.0.1", int(os.environ["RELAY_PORT"])
    )
    config = load_config(HERE / "email.yaml", EmailGatewayConfig)
    layer = resolve_layer("memory://")
    install_layer(layer)
    gateway = EmailGateway(config, layer)
    running = asyncio.create_task(
        serve([gateway], application=application, worker_channels=config.consumer_channels())
    )
    await gateway.started.wait()

    mail = EmailMessage()
    mail["From"] = "Alice <alice@example.org>"
    mail["To"] = "support@example.com"
    mail["Subject"] = "My printer is on fire"
    mail["Message-ID"] = "<first-mail@example.org>"
    mail.set_content("Help!\n")
    port = gateway.server.port
    print(f"\n→ sending mail to support@example.com via SMTP 127.0.0.1:{port}")
    print(f"  Subject: {mail['Subject']}  Message-ID: {mail['Message-ID']}")
    await aiosmtplib.send(mail, hostname="127.0.0.1", port=port)

    envelope = await asyncio.wait_for(relay.received.get(), 30)
    reply = BytesParser(policy=default_policy).parsebytes(envelope.original_content)
    print(f"← reply left through the relay to {', '.join(envelope.rcpt_tos)}")
    for name in ("From", "To", "Subject", "In-Reply-To", "References"):
        print(f"  {name}: {reply[name]}")
    print(f"  {reply.get_content().strip()}\n")

    from mail.models import Mail

    for _ in range(100):  # the email.result that records the reply arrives just after
        row = await Mail.objects.aget(message_id="<first-mail@example.org>")
        if row.reply_message_id or row.reply_error:
            break
        await asyncio.sleep(0.05)
    print(f"stored: Mail #{row.pk} from {row.mail_from!r}, reply {row.reply_message_id}")

    signal.raise_signal(signal.SIGTERM)  # what systemd would send: drain, then exit 0
    code = await running
    relay_server.close()
    await relay_server.wait_closed()
    return code


def run(workdir: str) -> int:
    """Run :func:`main` with its database and attachment store in ``workdir``."""
    os.environ.update(
        DJANGO_SETTINGS_MODULE="example.settings",
        EXAMPLE_LAYER="memory://",
        EXAMPLE_DB=os.path.join(workdir, "demo.sqlite3"),
        ATTACHMENT_STORE=os.path.join(workdir, "attachments"),
        SMTP_PORT=str(free_port()),
        RELAY_PORT=str(free_port()),
        GATEWAYS_LOG_LEVEL=os.environ.get("GATEWAYS_LOG_LEVEL", "WARNING"),
    )
    sys.path.insert(0, str(HERE))
    import django
    from django.core.management import call_command

    from core.logs import setup_logging

    django.setup()
    setup_logging(os.environ["GATEWAYS_LOG_LEVEL"])
    call_command("migrate", verbosity=0)
    return asyncio.run(main())


if __name__ == "__main__":
    # the database and attachments of one run live here, and go with it (issue 6)
    with tempfile.TemporaryDirectory(prefix="gateways-demo-") as workdir:
        code = run(workdir)
        from django.db import connections

        connections.close_all()  # SQLite holds the file open
    sys.exit(code)
