"""Slack answers inside the acknowledgement: ack latency of envelopes that wait for a consumer's
answer (issue 26), through a real ``manage.py runworker``.

``python -m bench.slack_answers [--count N] [--rates 50,100] [--no-write]``

A private ``redis-server``; the local Slack of ``core.testing.slack`` (Web API + Socket Mode, in
this process); the real ``gateway-slack`` binary on ``examples/slack.yaml`` (the de-dup window
in that Redis, ``slack.answers`` at its defaults: 2.5 s for ``slack.view_submission``); the
example project's ``SlackTeamConsumer`` under a real ``python manage.py runworker team-slack``,
on a migrated SQLite database with one ticket.

For each rate, ``count`` ``view_submission`` envelopes of the example's ticket modal are sent on
schedule (``accepts_response_payload: true``, as Slack sends them). Every other one names no
number (the consumer answers ``response_action: errors`` at once), the others ticket 42 (it
reads the ticket from the database and answers ``response_action: update`` with a view). Ack
latency: envelope sent → its ``{"envelope_id", "payload"}`` back at the local Slack; *answered*
is the share of acks that carried the consumer's answer (the rest were acknowledged empty at
``answers.timeout``, which the budget column counts too). The path of one envelope: local Slack
→ WebSocket → gateway (de-dup claim in Redis, layer send) → Redis → runworker → consumer
(SQLite) → ``slack.ack`` on the event's ``ack_channel`` → Redis → gateway → WebSocket.

The local Slack and the timing share this process's event loop; the gateway, the worker and
Redis are their own processes; every process shares the machine's CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    command_line,
    cpu_seconds,
    machine_lines,
    markdown_table,
    percentile,
    text_table,
    update_section,
)
from core.testing import RedisServer
from core.testing.slack import FakeSlack
from tests.support.example import example_project

#: what examples/team/consumers.py's modal is called (it answers only its own submissions)
LOOKUP = "ticket_lookup"
MODAL = {
    "type": "modal",
    "callback_id": LOOKUP,
    "title": {"type": "plain_text", "text": "Look up a ticket"},
    "submit": {"type": "plain_text", "text": "Look up"},
    "blocks": [],
}
BUDGET = 2.5


def values(number: str) -> dict[str, Any]:
    return {
        "ticket": {"number": {"type": "plain_text_input", "value": number}},
        "search": {"subject": {"type": "external_select", "selected_option": None}},
    }


async def welcome(fake: FakeSlack) -> None:
    """The worker is up once the example app welcomed a new member."""
    await fake.send_event(
        {
            "type": "member_joined_channel",
            "user": "U0WARM",
            "channel": "C0GENERAL",
            "channel_type": "C",
            "event_ts": "1700000000.000200",
        }
    )
    await fake.wait_for(lambda: fake.calls_of("chat.postMessage"), 120, "the welcome")


async def submissions(fake: FakeSlack, view_id: str, count: int, rate: float) -> list[str]:
    """``count`` submissions on schedule at ``rate`` per second; their envelope ids."""
    ids = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(count):
        payload = fake.view_submission(view_id, values("" if i % 2 == 0 else "42"))
        ids.append(await fake.send_interactive(payload))
        if (ahead := start + (i + 1) / rate - loop.time()) > 0:
            await asyncio.sleep(ahead)
    await fake.wait_for(lambda: all(i in fake.acked_at for i in ids), 120, "every ack")
    return ids


async def run(args: argparse.Namespace, tmp: Path) -> list[list[str]]:
    rows = []
    with RedisServer() as redis:
        fake = await FakeSlack().start()
        env = {
            "SLACK_BOT_TOKEN": fake.bot_token,
            "SLACK_APP_TOKEN": fake.app_token,
            "SLACK_API_URL": fake.api_url,
            "SLACK_RESPONSE_URL_PREFIX": fake.hooks_url,
        }
        project = await asyncio.to_thread(example_project, tmp, redis.url, env=env)
        project.execute(
            "INSERT INTO mail_mail (id, event_id, message_id, mail_from, subject, text, "
            "attachment_count, received_at, reply_message_id, reply_error, kind, dmarc) VALUES "
            "(42, 'e42', '<m42@x>', 'carol@example.org', 'Printer on fire', 'It is.', 0, "
            "'2026-01-01 00:00:00', '', '', 'normal', '')"
        )
        gateway = await asyncio.to_thread(project.gateway("slack.yaml").start)
        worker = project.worker("team-slack")
        try:
            await welcome(fake)
            view_id = fake.open_view(MODAL)
            processes = [gateway.pid, worker.pid]
            assert None not in processes, "the gateway and the worker run"
            for rate in args.rates:
                before = [cpu_seconds(pid) for pid in processes if pid is not None]
                ids = await submissions(fake, view_id, args.count, rate)
                after = [cpu_seconds(pid) for pid in processes if pid is not None]
                spent = [a - b for a, b in zip(after, before, strict=True)]
                latencies = [fake.acked_at[i] - fake.sent_at[i] for i in ids]
                answered = sum(1 for i in ids if fake.ack_payloads.get(i) is not None)
                over = sum(1 for latency in latencies if latency > BUDGET)
                ms = 1000.0
                rows.append(
                    [
                        f"view_submission answered inside the ack, sent at {rate:g}/s",
                        str(len(ids)),
                        f"{answered / len(ids):.1%}",
                        f"{percentile(latencies, 50) * ms:.1f}",
                        f"{percentile(latencies, 99) * ms:.1f}",
                        f"{max(latencies) * ms:.1f}",
                        str(over),
                        f"{spent[0] / len(ids) * ms:.2f}",
                        f"{spent[1] / len(ids) * ms:.2f}",
                    ]
                )
        finally:
            await asyncio.to_thread(worker.stop)
            await asyncio.to_thread(gateway.stop)
            await fake.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slack_answers", description=__doc__)
    parser.add_argument("--count", type=int, default=1000, help="envelopes per rate")
    parser.add_argument(
        "--rates",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[50.0],
        help="rates (envelopes/s), comma-separated",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M %z")
    with tempfile.TemporaryDirectory() as tmp:
        rows = asyncio.run(run(args, Path(tmp)))
    header = [
        "path",
        "envelopes",
        "answered",
        "ack p50 ms",
        "ack p99 ms",
        "ack max ms",
        f"over {BUDGET:g} s",
        "gateway CPU ms/envelope",
        "worker CPU ms/envelope",
    ]
    print(text_table(header, rows))
    if not args.no_write:
        body = "\n".join(
            [
                f"- Date: {started}",
                *machine_lines(),
                f"- Load average when the run started: {' '.join(f'{x:.2f}' for x in load)} "
                "(the machine is shared with other benchmarks and test runs)",
                f"- Command: `{command_line('bench.slack_answers')}`",
                f"- Workload: {args.count} `view_submission` envelopes of the example's ticket "
                "modal at each rate, half answered with field errors at once, half after a "
                "database read with a new view; `examples/slack.yaml` (answers.timeout 2.5 s), "
                "a real `manage.py runworker team-slack`, a private redis-server.",
                "",
                markdown_table(header, rows),
                "",
                "- Ack latency is envelope sent → acknowledgement (with the answer) back at the "
                "local Slack; the budget is `slack.answers.timeout` (2.5 s from arrival; Slack "
                "wants the acknowledgement within 3 s). An ack without the answer would count "
                "as not answered. CPU ms/envelope: the process's user+system CPU time over the "
                "run ÷ envelopes (/proc), the gateway's and the runworker's; at a low rate the "
                "idle work (watchdog pings, readiness checks) weighs on it.",
                "- Where an answered envelope's time goes: in the gateway a de-dup claim and mark "
                "in Redis (two round trips), the layer send, a receive on the event's ack_channel "
                "(a process-local stream: no round trip of its own while the gateway's reply "
                "channel is read anyway); in the worker one receive, the handler (a SQLite read "
                "for half of them, through Django's sync thread) and one layer send. At these "
                "rates both processes are mostly idle: p50 is the sum of those hops; the p99 and "
                "max are the moments the shared CPUs were busy elsewhere.",
                "",
                "How to read it: see the docstring of `bench/slack_answers.py`.",
            ]
        )
        update_section("Slack answers inside the acknowledgement", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
