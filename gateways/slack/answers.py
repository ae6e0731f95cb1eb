"""Answers inside the acknowledgement: the bounded request/reply between an event and its
consumer (``slack.answers``).

Slack lets some acknowledgements carry an answer, and some things can only be said there: a
modal's field errors (``view_submission``: ``response_action``), an external select's options
(``block_suggestion``), a slash command's immediate message. An event in ``answers.wait_for``
that Slack lets answer (the envelope's ``accepts_response_payload``; always over HTTP) gets an
``ack_channel`` of its own (:meth:`Answers.open`, a process-local ``layer.new_channel()``: only
this process receives on it). Once the layer took the event, :meth:`Answers.wait` receives
there until ``answers.timeout`` seconds after the event's arrival:

* a ``slack.ack`` checked against the event (``translate.parse_ack``) is the answer; without
  answer keys it is an empty acknowledgement that needs no more waiting;
* an invalid one (a ``response_action`` for a slash command, 101 options …) is logged, counted
  and answered ``ok: false`` on its ``result_channel``; the event is acknowledged empty;
* anything but a ``slack.ack`` is refused the same way and the wait goes on;
* nothing in time: acknowledged empty, one WARNING (repeats are held back), counted — Slack
  gets its acknowledgement within its 3 s either way and never retries because of us.

A ``slack.ack`` that comes after its event was acknowledged stays in the layer's buffer of a
channel nobody receives on: :meth:`Answers.sweep` drops those (every :data:`SWEEP_INTERVAL` s)
and counts them as ``late``. An answer is remembered for :data:`ANSWER_MEMORY` s by its
event's de-dup key, so a redelivery of an envelope already answered is acknowledged with the
same answer (:meth:`Answers.recall`).

Metrics: ``gateway_slack_answers_total{outcome}`` (``answered``, ``empty``, ``timeout``,
``invalid``, ``late``, ``skipped``: more than ``answers.max_waiting`` waiting) and
``gateway_slack_answer_seconds`` (arrival → answer).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import Counter, Histogram

from core.envelope import CommandError, parse_command, result_message
from core.metrics import REGISTRY
from core.retry import LAYER_ERRORS, describe_error, send_command
from gateways.slack.config import AnswersConfig
from gateways.slack.dedup import TtlMemory
from gateways.slack.translate import InvalidCommand, parse_ack

if TYPE_CHECKING:
    from core.service import Gateway

__all__ = ["ANSWER_MEMORY", "SWEEP_INTERVAL", "Answers"]

#: seconds an answer is remembered for a redelivery of its envelope, and how many at most
ANSWER_MEMORY: Final = 60.0
MAX_ANSWERS: Final = 10_000
#: seconds between two sweeps of answers that came too late
SWEEP_INTERVAL: Final = 5.0
#: seconds a result of a slack.ack may wait for room on its channel
RESULT_TIMEOUT: Final = 30.0

_ANSWERS = Counter(
    "gateway_slack_answers",
    "Events that waited for a consumer's slack.ack, by outcome (answered, empty, timeout, "
    "invalid, late, skipped)",
    ["gateway", "outcome"],
    registry=REGISTRY,
)
_ANSWER_SECONDS = Histogram(
    "gateway_slack_answer_seconds",
    "From an answerable event's arrival to its acknowledgement with the consumer's answer",
    ["gateway"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
    registry=REGISTRY,
)


class Answers:
    """The ack channels of one gateway; see the module docstring."""

    def __init__(self, gateway: Gateway[Any], settings: AnswersConfig) -> None:
        self.gateway = gateway
        self.layer = gateway.layer
        self.name = gateway.name
        self.log = gateway.log
        self.settings = settings
        #: the part after "!" of our channels' names: the sweep touches nothing else
        self.marker = f"!{self.name}.ack."
        #: ack channels being waited on now
        self.open_channels: set[str] = set()
        self._answers = TtlMemory(ANSWER_MEMORY, MAX_ANSWERS)
        self._results: set[asyncio.Task[None]] = set()

    def count(self, outcome: str, amount: int = 1) -> None:
        _ANSWERS.labels(self.name, outcome).inc(amount)

    async def open(self) -> str | None:
        """A new ack channel, or ``None`` (counted, logged) with ``max_waiting`` open."""
        if len(self.open_channels) >= self.settings.max_waiting:
            self.count("skipped")
            self.log.warning(
                "%s: %d events wait for their answer already (answers.max_waiting); the next "
                "ones are acknowledged at once, without one",
                self.name,
                len(self.open_channels),
                extra={"repeat": f"{self.name}:answer_skipped"},
            )
            return None
        channel = await self.layer.new_channel()
        if "!" in channel:
            channel = channel.replace("!", self.marker, 1)
        self.open_channels.add(channel)
        return channel

    def close(self, channel: str) -> None:
        self.open_channels.discard(channel)

    def remember(self, key: str, payload: dict[str, Any]) -> None:
        self._answers.put(key, payload)

    def recall(self, key: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._answers.get(key)
        return found

    async def wait(
        self, channel: str, event: dict[str, Any], deadline: float, arrived: float
    ) -> dict[str, Any] | None:
        """The answer to acknowledge ``event`` with, from ``channel`` until ``deadline`` (loop
        time); ``None``: acknowledge empty (an empty ``slack.ack``, an invalid one, none)."""
        loop = asyncio.get_running_loop()
        while (remaining := deadline - loop.time()) > 0:
            try:
                message = await asyncio.wait_for(self.layer.receive(channel), remaining)
            except TimeoutError:
                break
            except LAYER_ERRORS as exc:
                self.gateway.metrics.retry("layer_receive")
                self.log.debug("%s: receive on %s failed: %r", self.name, channel, exc)
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
                continue
            except ValueError:  # an entry that cannot be decoded (the layer counted it)
                continue
            try:
                command = parse_command(message, "slack")
                if command.type != "slack.ack":
                    raise CommandError(f"an ack_channel takes slack.ack only, not {command.type}")
            except CommandError as exc:
                self.gateway.metrics.command("slack.ack", "invalid")
                self.log.warning(
                    "%s: refused on the ack_channel of %s: %s", self.name, event["id"], exc
                )
                self._result(message, ok=False, error=str(exc))
                continue
            try:
                payload = parse_ack(command.body, event["type"])
            except InvalidCommand as exc:
                self.count("invalid")
                self.gateway.metrics.command("slack.ack", "invalid")
                self.log.warning(
                    "%s: invalid slack.ack for %s %s: %s; acknowledged empty",
                    self.name,
                    event["type"],
                    event["id"],
                    exc,
                )
                self._result(message, ok=False, error=str(exc))
                return None
            self.count("answered" if payload is not None else "empty")
            _ANSWER_SECONDS.labels(self.name).observe(loop.time() - arrived)
            self.gateway.metrics.command("slack.ack", "ok")
            self._result(message, ok=True)
            return payload
        self.count("timeout")
        self.gateway.metrics.error("answer_timeout")
        self.log.warning(
            "%s: no slack.ack for %s %s within %g s of its arrival (answers.timeout); "
            "acknowledged empty",
            self.name,
            event["type"],
            event["id"],
            self.settings.timeout,
            extra={"repeat": f"{self.name}:answer_timeout"},
        )
        return None

    def _result(self, message: Any, *, ok: bool, error: str | None = None) -> None:
        """``slack.result`` for a ``slack.ack`` that asked for one: ``ok`` once the gateway took
        it for the acknowledgement."""
        target = message.get("result_channel") if isinstance(message, dict) else None
        if not isinstance(target, str) or not target:
            return
        ident = message.get("id")
        result = result_message("slack", None if ident is None else str(ident), ok=ok, error=error)
        task = asyncio.create_task(self._send_result(target, result))
        self._results.add(task)
        task.add_done_callback(self._results.discard)

    async def _send_result(self, target: str, result: dict[str, Any]) -> None:
        try:
            await send_command(self.layer, target, result, timeout=RESULT_TIMEOUT)
        except Exception as exc:
            self.gateway.metrics.dropped("result_undeliverable")
            self.log.warning(
                "%s: could not send the result of slack.ack %s to %r: %s",
                self.name,
                result["id"],
                target,
                describe_error(exc),
            )

    async def sweep_every(self, interval: float = SWEEP_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def sweep(self) -> int:
        """Drop what came on ack channels nobody waits on any more (answers too late) from the
        layer's buffers of process-local channels; how many messages that was."""
        late = 0
        # core.streams and channels_redis buffer process-local channels in receive_buffer, the
        # in-memory layer keeps every channel's queue in channels
        for attribute in ("receive_buffer", "channels"):
            buffers = getattr(self.layer, attribute, None)
            if not isinstance(buffers, dict):
                continue
            for name in [n for n in list(buffers) if isinstance(n, str) and self.marker in n]:
                if name in self.open_channels:
                    continue
                buffered = buffers.pop(name, None)
                size = getattr(buffered, "qsize", None)
                late += size() if callable(size) else len(buffered or ())
        if late:
            self.count("late", late)
            self.log.warning(
                "%s: %d slack.ack came after their event was acknowledged (answers.timeout "
                "%g s); dropped",
                self.name,
                late,
                self.settings.timeout,
            )
        return late

    async def close_all(self) -> None:
        if self._results:
            await asyncio.wait(set(self._results), timeout=1.0)
