"""One generic consumer per gateway, each answering in one call and awaiting results.

What each does is what tests/gateways/test_consumers_end_to_end.py checks on the far side of
the real gateway (the IRC peer, the Slack stand-in, the relay, the broker, a WebSocket client).
"""

from typing import Any

from core.consumers import CommandFailed
from gateways.email.consumers import EmailConsumer
from gateways.http_ws.consumers import HttpWsConsumer
from gateways.irc.consumers import IrcConsumer
from gateways.mqtt.consumers import MqttConsumer
from gateways.scheduler.consumers import SchedulerConsumer
from gateways.slack.consumers import SlackConsumer

#: where Timer reports what it saw (the test reads it from the layer)
TIMER_REPORT = "timer-report"


class IrcBot(IrcConsumer):
    async def irc_receive(self, message: dict[str, Any]) -> None:
        text = message["plain"]
        if text == "!ping":
            await self.reply(f"{message['nick']}: pong")
        elif text == "!long":
            result = await self.reply("word " * 150, wait=True)  # two lines on the wire
            assert result is not None
            await self.reply(f"that took {result['lines']} lines")
        elif text == "!raw":
            try:
                await self.irc.raw("VERSION", wait=True)
            except CommandFailed as exc:
                await self.reply(f"refused: {exc.error}")


class SlackBot(SlackConsumer):
    async def slack_mention(self, message: dict[str, Any]) -> None:
        await self.reply("on it", thread=True)
        await self.react("eyes")

    async def slack_message(self, message: dict[str, Any]) -> None:
        if message["text"] == "!fail":
            try:
                await self.slack.send("C0NOWHERE", "lost", wait=True)
            except CommandFailed as exc:
                await self.reply(f"failed: {exc.error}")

    async def slack_command(self, message: dict[str, Any]) -> None:
        await self.reply(f"ticket {message['text']} is open")


class Support(EmailConsumer):
    async def email_receive(self, message: dict[str, Any]) -> None:
        result = await self.reply("Thanks, we got it.\n", wait=True)
        if result is not None:  # None: not a mail a person wrote
            await self.email.send(
                "audit@example.com",
                subject="answered",
                text=f"{message['message_id']} answered as {result['message_id']}\n",
            )


class Responder(MqttConsumer):
    async def mqtt_message(self, message: dict[str, Any]) -> None:
        logged = await self.mqtt.publish("bot/log", f"asked on {message['topic']}", wait=True)
        assert logged is not None
        await self.reply({"answer": 42, "log_mid": logged["mid"]})


class Timer(SchedulerConsumer):
    async def scheduler_fire(self, message: dict[str, Any]) -> None:
        if message.get("note") == "later":
            await self.channel_layer.send(TIMER_REPORT, {"type": "report", "fired": message["id"]})
            return
        again = f"later.{message['id']}"
        result = await self.later(0.2, {"note": "later"}, schedule=again, wait=True)
        assert result is not None
        report = {"type": "report", "created": result["created"], "next_fire": result["next_fire"]}
        await self.channel_layer.send(TIMER_REPORT, report)


class Chat(HttpWsConsumer):
    groups = ["chat"]

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.broadcast("chat", text_data)

    async def request(self, message: dict[str, Any]) -> None:
        await self.respond(200, f"you asked for {message['path']}", headers=[["x-site", "yes"]])
