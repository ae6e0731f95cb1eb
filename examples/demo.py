"""The whole suite in one process: the helpdesk (examples/helpdesk/) on the in-memory layer.

    python examples/demo.py            # the story, printed as it happens; exits 0 after it
    python examples/demo.py --serve    # the same, then keeps serving the live page (Ctrl-C)

Every gateway runs here with the helpdesk's own YAML files and consumers, on ``memory://``:
email (with a stand-in relay that prints what leaves), HTTP/WebSocket (the live page, whose URL
is printed), the scheduler, Slack (against core/testing/slack.py, the suite's local stand-in
for Slack), and MQTT and IRC against a mosquitto and an ngircd started on free ports when they
are installed; otherwise those two are skipped with a line saying how to get them
(``--skip mqtt`` / ``--skip irc`` skips them by choice).

The story: Alice mails support@ and a ticket opens; the helpdesk answers her with its number
and announces it on IRC and Slack; a sensor reports 41.5 °C over MQTT and a second ticket
opens; the scheduler's digest of open tickets goes to the team. Each step is printed where it
was seen: the live page (a WebSocket client of it), the relay, #support on IRC, the Slack
stand-in, the MQTT broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import sys
import tempfile
import time
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HELPDESK = HERE / "helpdesk"
#: seconds each step may take before the demo gives up on it (and exits 1, saying which)
STEP_TIMEOUT = 30.0
#: what to install for the optional parts (Debian/Ubuntu package names)
INSTALL = {"mqtt": "mosquitto", "irc": "ngircd"}


class Story:
    """What the demo saw, where: printed as it arrives; :meth:`expect` waits for a line."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.changed = asyncio.Event()
        self.start = time.monotonic()

    def say(self, text: str) -> None:
        print(f"\n{text}", flush=True)

    def saw(self, where: str, text: str) -> None:
        self.seen.append((where, text))
        print(f"  {time.monotonic() - self.start:5.2f}s  {where:<18} {text}", flush=True)
        self.changed.set()

    async def expect(self, where: str, needle: str) -> None:
        """Until ``needle`` was seen in ``where`` (or :data:`STEP_TIMEOUT` passed)."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while not any(w == where and needle in t for w, t in self.seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{needle!r} never appeared in {where}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


# -- the far sides, each reporting to the story ---------------------------------------------


class Relay:
    """The outbound SMTP relay's stand-in: every mail that leaves the helpdesk ends here."""

    def __init__(self, story: Story) -> None:
        self.story = story

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        mail = BytesParser(policy=default_policy).parsebytes(envelope.original_content)
        to = ", ".join(envelope.rcpt_tos)
        self.story.saw("relay", f"mail to {to}: {mail['Subject']}")
        if mail["In-Reply-To"]:
            self.story.saw("relay", f"  In-Reply-To: {mail['In-Reply-To']}")
        body = mail.get_body(("plain",))
        for line in (body.get_content() if body is not None else "").strip().splitlines():
            self.story.saw("relay", f"  | {line}")
        return "250 OK"


async def watch_page(story: Story, url: str) -> None:
    """A WebSocket client of the live page: what any browser on it sees."""
    import websockets

    async with websockets.connect(url) as socket:
        async for frame in socket:
            line = json.loads(frame)
            story.saw("live page", f"{line['source']}: {line['summary']}")


async def watch_irc(story: Story, port: int, joined: asyncio.Event) -> None:
    """Alice on IRC, in #support: what the helpdesk says there."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"NICK alice\r\nUSER alice 0 * :Alice\r\nJOIN #support\r\n")
    try:
        while raw := await reader.readline():
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("PING "):
                writer.write(f"PONG {line[5:]}\r\n".encode())
            elif " 366 " in line:
                joined.set()
            elif " PRIVMSG #support :" in line:
                nick = line[1:].split("!", 1)[0]
                story.saw("IRC #support", f"<{nick}> {line.split(' :', 1)[1]}")
    finally:
        writer.close()


async def watch_slack(story: Story, fake: Any) -> None:
    """The Slack stand-in's record of chat.postMessage: what people in the channel see."""
    shown: list[Any] = []
    while True:
        with contextlib.suppress(TimeoutError):
            await fake.wait_for(lambda: len(fake.calls_of("chat.postMessage")) > len(shown), 3600)
        for call in fake.calls_of("chat.postMessage")[len(shown) :]:
            story.saw(f"Slack {call.args.get('channel')}", str(call.args.get("text")))
            shown.append(call)


def mqtt_client(
    story: Story, port: int, loop: asyncio.AbstractEventLoop
) -> tuple[Any, asyncio.Event]:
    """A device on the broker: publishes readings and prints the helpdesk's alerts; the event
    is set once its subscription to them was granted."""
    from paho.mqtt.client import CallbackAPIVersion, Client

    client = Client(CallbackAPIVersion.VERSION2, client_id="demo-device")
    subscribed = asyncio.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        text = f"{message.topic} {message.payload.decode('utf-8', 'replace')}"
        loop.call_soon_threadsafe(story.saw, "MQTT broker", text)

    client.on_message = on_message
    client.on_subscribe = lambda *args: loop.call_soon_threadsafe(subscribed.set)
    client.connect("127.0.0.1", port)
    client.subscribe("alerts/#", qos=1)
    client.loop_start()
    return client, subscribed


# -- the demo -------------------------------------------------------------------------------


def start_optional(name: str, skip: set[str]) -> Any | None:
    """mosquitto (``mqtt``) or ngircd (``irc``) on a free port, or ``None`` with a line why."""
    from core.testing import MosquittoServer, NgircdServer, ServerError, ServiceMissing

    binary = INSTALL[name]
    how = f"install {binary} (apt-get install {binary}; brew install {binary}) and run it again"
    if name in skip:
        print(
            f"{name.upper()}: skipped (--skip {name}); without --skip the demo runs it "
            f"when {binary} is installed"
        )
        return None
    server = MosquittoServer() if name == "mqtt" else NgircdServer()
    try:
        return server.start()
    except ServiceMissing:
        print(f"{name.upper()}: skipped, {binary} is not installed; to see it: {how}")
    except ServerError as exc:
        print(f"{name.upper()}: skipped, {binary} did not start: {str(exc).splitlines()[0]}")
    return None


async def ready(gateways: list[Any]) -> None:
    """Until every gateway would answer /readyz with 200 (connected, joined, subscribed)."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while waiting := [f"{gw.name}: {gw.ready_reasons()}" for gw in gateways if gw.ready_reasons()]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateways not ready: {'; '.join(waiting)}")
        await asyncio.sleep(0.05)


async def main(args: argparse.Namespace, mqtt_port: int | None, irc_port: int | None) -> int:
    from aiosmtpd.smtp import SMTP
    from helpdesk.asgi import application

    from core.cli import install_layer, serve
    from core.config import load_config, peek_gateway
    from core.layers import resolve_layer
    from core.testing.slack import FakeSlack
    from gateways import GATEWAYS

    story = Story()
    loop = asyncio.get_running_loop()
    relay = await loop.create_server(
        lambda: SMTP(Relay(story)), "127.0.0.1", int(os.environ["RELAY_PORT"])
    )
    fake_slack = await FakeSlack().start()
    os.environ.update(
        SLACK_BOT_TOKEN=fake_slack.bot_token,
        SLACK_APP_TOKEN=fake_slack.app_token,
        SLACK_API_URL=fake_slack.api_url,
        SLACK_RESPONSE_URL_PREFIX=fake_slack.hooks_url,
    )

    files = ["email.yaml", "web.yaml", "scheduler.yaml", "slack.yaml"]
    files += ["mqtt.yaml"] if mqtt_port else []
    files += ["irc.yaml"] if irc_port else []
    layer = resolve_layer("memory://")
    install_layer(layer)
    gateways = []
    for name in files:
        path = HELPDESK / name
        module, _, cls_name = GATEWAYS[peek_gateway(path)].partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        gateways.append(cls(load_config(path, cls.config_model), layer))
    channels = sorted({c for gw in gateways for c in gw.config.consumer_channels()})
    running = asyncio.create_task(
        serve(gateways, application=application, worker_channels=channels)
    )
    watchers: list[asyncio.Task[Any]] = []
    devices: list[Any] = []
    telling = asyncio.create_task(
        tell(story, layer, gateways, fake_slack, mqtt_port, irc_port, watchers, devices)
    )
    try:
        await asyncio.wait({telling, running}, return_when=asyncio.FIRST_COMPLETED)
        if not telling.done():  # the gateways stopped first: Ctrl-C, or one could not start
            telling.cancel()
            print("\nThe demo stopped before the story ended.", file=sys.stderr)
            return await running or 1
        try:
            url = telling.result()
        except Exception as exc:  # a step that never came (TimeoutError), a command refused
            print(f"\nThe demo stopped: {exc}", file=sys.stderr)
            signal.raise_signal(signal.SIGTERM)
            await running
            return 1
        took = time.monotonic() - story.start
        print(f"\nThe story took {took:.1f} s; every step is on {url}", flush=True)
        if args.serve:
            print("Serving it until Ctrl-C (or SIGTERM).", flush=True)
        else:
            signal.raise_signal(signal.SIGTERM)  # what systemd would send: drain, then exit 0
        return await running
    finally:
        for task in (telling, *watchers):
            task.cancel()
        await asyncio.gather(telling, *watchers, return_exceptions=True)
        for device in devices:
            device.loop_stop()
            device.disconnect()
        await fake_slack.stop()
        relay.close()
        await relay.wait_closed()


async def tell(
    story: Story,
    layer: Any,
    gateways: list[Any],
    fake_slack: Any,
    mqtt_port: int | None,
    irc_port: int | None,
    watchers: list[asyncio.Task[Any]],
    devices: list[Any],
) -> str:
    """The story, once every gateway is ready; returns the live page's URL."""
    import aiosmtplib

    from gateways.scheduler.consumers import SchedulerCommands

    await ready(gateways)
    url = f"http://127.0.0.1:{os.environ['WEB_PORT']}/"
    print(f"\nLive page: {url}  (every step below appears there too)", flush=True)
    watchers.append(asyncio.create_task(watch_page(story, url.replace("http", "ws") + "live")))
    watchers.append(asyncio.create_task(watch_slack(story, fake_slack)))
    if irc_port:
        joined = asyncio.Event()
        watchers.append(asyncio.create_task(watch_irc(story, irc_port, joined)))
        await asyncio.wait_for(joined.wait(), STEP_TIMEOUT)
    mqtt = None
    if mqtt_port:
        mqtt, subscribed = mqtt_client(story, mqtt_port, asyncio.get_running_loop())
        devices.append(mqtt)
        await asyncio.wait_for(subscribed.wait(), STEP_TIMEOUT)
    announced = ["Slack C0GENERAL", *(["IRC #support"] if irc_port else [])]
    story.start = time.monotonic()

    story.say("1. Alice mails support@example.com: her printer is on fire.")
    mail = EmailMessage()
    mail["From"] = "Alice <alice@example.org>"
    mail["To"] = "support@example.com"
    mail["Subject"] = "My printer is on fire"
    mail["Message-ID"] = "<first-mail@example.org>"
    mail.set_content("Help! Smoke is coming out of the printer on the second floor.\n")
    await aiosmtplib.send(mail, hostname="127.0.0.1", port=int(os.environ["SMTP_PORT"]))
    await story.expect("live page", "ticket #1 opened")
    await story.expect("relay", "mail to alice@example.org: Re: My printer is on fire")
    for where in announced:
        await story.expect(where, "New ticket #1")

    if mqtt is not None:
        story.say("2. The server room's sensor reports 41.5 °C over MQTT.")
        mqtt.publish("sensors/server-room/temperature", json.dumps({"value": 41.5}), qos=1)
        await story.expect("live page", "ticket #2 opened")
        await story.expect("MQTT broker", "alerts/server-room/temperature")
        for where in announced:
            await story.expect(where, "New ticket #2")
    else:
        story.say("2. (MQTT skipped: no sensor alert.)")

    story.say("3. The scheduler's digest of open tickets (triggered now, not at 17:00).")
    await SchedulerCommands(layer, "helpdesk-timers.send").trigger("digest", wait=True)
    await story.expect("relay", "mail to team@example.com: Helpdesk digest")
    await story.expect("live page", "digest to team@example.com sent")
    return url


def run(workdir: str, args: argparse.Namespace) -> int:
    """Start what is installed, then run :func:`main` with its state in ``workdir``."""
    from core.testing import free_port

    skip = set(args.skip)
    servers = {name: start_optional(name, skip) for name in ("mqtt", "irc")}
    os.environ.update(
        DJANGO_SETTINGS_MODULE="helpdesk.settings",
        GATEWAYS_LAYER="memory://",
        HELPDESK_LAYER="memory://",
        HELPDESK_DB=os.path.join(workdir, "helpdesk.sqlite3"),
        HELPDESK_ANNOUNCE="irc,slack" if servers["irc"] else "slack",
        ATTACHMENT_STORE=os.path.join(workdir, "attachments"),
        SCHEDULER_STATE=os.path.join(workdir, "scheduler.sqlite3"),
        MAIL_VERIFY="off",  # no DNS lookups for example.org
        SMTP_PORT=str(free_port()),
        RELAY_PORT=str(free_port()),
        WEB_PORT=str(args.port or free_port()),
        GATEWAYS_LOG_LEVEL=os.environ.get("GATEWAYS_LOG_LEVEL", "WARNING"),
    )
    if servers["mqtt"]:
        os.environ.update(MQTT_PORT=str(servers["mqtt"].port), MQTT_CLIENT_ID="demo-helpdesk")
    if servers["irc"]:
        os.environ["IRC_PORT"] = str(servers["irc"].port)
    sys.path.insert(0, str(HELPDESK))
    try:
        import django
        from django.core.management import call_command

        from core.logs import setup_logging

        django.setup()
        setup_logging(os.environ["GATEWAYS_LOG_LEVEL"])
        call_command("migrate", verbosity=0)
        mqtt_port = servers["mqtt"].port if servers["mqtt"] else None
        irc_port = servers["irc"].port if servers["irc"] else None
        return asyncio.run(main(args, mqtt_port, irc_port))
    finally:
        for server in servers.values():
            if server is not None:
                server.stop()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--serve", action="store_true", help="keep serving after the story")
    parser.add_argument("--port", type=int, default=0, help="the live page's port (default: free)")
    parser.add_argument(
        "--skip", action="append", default=[], choices=sorted(INSTALL), help="leave one out"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    # the database and the scheduler's state of one run live here, and go with it (issue 6)
    with tempfile.TemporaryDirectory(prefix="gateways-demo-") as workdir:
        try:
            code = run(workdir, options)
        finally:
            with contextlib.suppress(Exception):
                from django.db import connections

                connections.close_all()  # SQLite holds the file open
    sys.exit(code)
