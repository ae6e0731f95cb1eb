"""Commands → the Web API of the local Slack: the JSON Slack gets, its ok:false errors, 429."""

from __future__ import annotations

from core.testing import command, metric, until
from core.testing.slack import FakeSlack
from tests.gateways.slack.conftest import running, slack_config


async def test_send_update_react_delete_as_slack_documents_them(fake_slack: FakeSlack) -> None:
    async with running(slack_config(fake_slack)) as (_, layer):
        blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*hi*"}}]
        sent = await command(
            layer,
            "team.send",
            {"type": "slack.send", "channel": "C0GENERAL", "text": "hi", "blocks": blocks},
        )
        assert sent["ok"] is True and sent["error"] is None
        assert sent["channel"] == "C0GENERAL" and isinstance(sent["ts"], str)
        post = fake_slack.calls_of("chat.postMessage")[0]
        assert post.content_type == "application/json"
        assert post.token == fake_slack.bot_token  # as Authorization: Bearer
        assert post.args == {"channel": "C0GENERAL", "text": "hi", "blocks": blocks}

        reply = await command(
            layer,
            "team.send",
            {
                "type": "slack.send",
                "channel": "C0GENERAL",
                "text": "in thread",
                "thread_ts": sent["ts"],
                "reply_broadcast": True,
            },
        )
        assert reply["ok"] is True
        assert fake_slack.calls_of("chat.postMessage")[1].args["thread_ts"] == sent["ts"]
        assert fake_slack.calls_of("chat.postMessage")[1].args["reply_broadcast"] is True

        updated = await command(
            layer,
            "team.send",
            {"type": "slack.update", "channel": "C0GENERAL", "ts": sent["ts"], "text": "edited"},
        )
        assert updated["ok"] is True and updated["ts"] == sent["ts"]
        assert fake_slack.calls_of("chat.update")[0].args == {
            "channel": "C0GENERAL",
            "ts": sent["ts"],
            "text": "edited",
        }

        reacted = await command(
            layer,
            "team.send",
            {"type": "slack.react", "channel": "C0GENERAL", "ts": sent["ts"], "name": ":tada:"},
        )
        assert reacted["ok"] is True
        assert fake_slack.calls_of("reactions.add")[0].args == {
            "channel": "C0GENERAL",
            "timestamp": sent["ts"],
            "name": "tada",
        }
        again = await command(
            layer,
            "team.send",
            {"type": "slack.react", "channel": "C0GENERAL", "ts": sent["ts"], "name": "tada"},
        )
        assert again == {
            "type": "slack.result",
            "id": "test",
            "ok": False,
            "error": "already_reacted",
        }

        deleted = await command(
            layer, "team.send", {"type": "slack.delete", "channel": "C0GENERAL", "ts": sent["ts"]}
        )
        assert deleted["ok"] is True
        gone = await command(
            layer, "team.send", {"type": "slack.delete", "channel": "C0GENERAL", "ts": sent["ts"]}
        )
        assert gone["ok"] is False and gone["error"] == "message_not_found"


async def test_ok_false_is_the_result_error(fake_slack: FakeSlack) -> None:
    async with running(slack_config(fake_slack)) as (_, layer):
        result = await command(
            layer, "team.send", {"type": "slack.send", "channel": "C0NOWHERE", "text": "hi"}
        )
    assert result == {
        "type": "slack.result",
        "id": "test",
        "ok": False,
        "error": "channel_not_found",
    }


async def test_429_is_retried_after_retry_after(fake_slack: FakeSlack) -> None:
    async with running(slack_config(fake_slack)) as (gateway, layer):
        fake_slack.rate_limit("chat.postMessage", retry_after=1, times=1)
        result = await command(
            layer, "team.send", {"type": "slack.send", "channel": "C0GENERAL", "text": "hi"}
        )
        assert result["ok"] is True
        assert len(fake_slack.calls_of("chat.postMessage")) == 2  # the 429, then the retry
        assert metric("gateway_retries_total", gateway="team", kind="rate_limited") >= 1

        fake_slack.rate_limit("chat.postMessage", retry_after=1, times=10)
        gateway.api._handlers[1].max_retry_count = 1  # give up after one retry
        result = await command(
            layer, "team.send", {"type": "slack.send", "channel": "C0GENERAL", "text": "hi"}
        )
        assert result["ok"] is False and result["error"] == "ratelimited"


async def test_invalid_commands_are_answered_not_sent(fake_slack: FakeSlack) -> None:
    async with running(slack_config(fake_slack)) as (_, layer):
        for body, error in [
            ({"type": "slack.send", "channel": "C0GENERAL"}, "'text' or 'blocks' is required"),
            ({"type": "slack.send", "text": "x"}, "'channel' must be a non-empty string"),
            (
                {"type": "slack.update", "channel": "C1", "ts": "yesterday", "text": "x"},
                "'ts' must be a Slack timestamp",
            ),
            (
                {"type": "slack.respond", "response_url": "https://evil.example/", "text": "x"},
                "'response_url' must be a URL starting with",
            ),
            ({"type": "slack.nope"}, "unknown command 'slack.nope'"),
        ]:
            result = await command(layer, "team.send", body)
            assert result["ok"] is False
            assert error in str(result["error"])
    assert fake_slack.calls_of("chat.postMessage") == []
    assert fake_slack.calls_of("chat.update") == []


async def test_respond_posts_to_the_response_url(fake_slack: FakeSlack) -> None:
    async with running(slack_config(fake_slack)) as (_, layer):
        url = fake_slack.response_url()
        result = await command(
            layer,
            "team.send",
            {
                "type": "slack.respond",
                "response_url": url,
                "text": "done",
                "response_type": "in_channel",
                "replace_original": False,
            },
        )
    assert result["ok"] is True
    assert fake_slack.responses == [
        {"text": "done", "response_type": "in_channel", "replace_original": False}
    ]


async def test_pacing_is_per_channel(fake_slack: FakeSlack) -> None:
    # one message per channel now, the next in 1000 s, and nobody may wait: a second send to
    # the same channel is refused at once, another channel is not held up
    config = slack_config(fake_slack, pacing={"rate": 0.001, "burst": 1, "queue": 0})
    async with running(config) as (_, layer):
        first = {"type": "slack.send", "channel": "C0GENERAL", "text": "1"}
        assert (await command(layer, "team.send", first))["ok"] is True
        second = await command(layer, "team.send", {**first, "text": "2"})
        assert second["ok"] is False and "too many messages waiting" in str(second["error"])
        other = {"type": "slack.send", "channel": "C0RANDOM", "text": "3"}
        assert (await command(layer, "team.send", other))["ok"] is True
    assert [c.args["text"] for c in fake_slack.calls_of("chat.postMessage")] == ["1", "3"]


async def test_slack_unreachable_is_retried_then_answered(fake_slack: FakeSlack) -> None:
    async with running(slack_config(fake_slack)) as (gateway, layer):
        await fake_slack.stop()  # connection refused from here on
        result = await command(
            layer, "team.send", {"type": "slack.send", "channel": "C0GENERAL", "text": "hi"}
        )
        assert result["ok"] is False
        assert str(result["error"]).startswith("Slack unreachable: chat.postMessage:")
        # the Socket Mode connection went with it: /readyz says so
        await until(lambda: gateway.ready_reasons(), what="not ready")


async def test_messages_to_one_channel_keep_their_order(fake_slack: FakeSlack) -> None:
    # early messages take longer to answer: without one call at a time per channel, later
    # ones would overtake them
    fake_slack.delay = lambda call: 0.05 if int(call.args.get("text", 0)) < 10 else 0.0
    async with running(slack_config(fake_slack)) as (gateway, layer):
        results = await layer.new_channel("test-results.")
        for i in range(20):  # all queued at once; up to 64 commands run concurrently
            channel = "C0GENERAL" if i % 2 else "C0RANDOM"
            await layer.send(
                "team.send",
                {"type": "slack.send", "channel": channel, "text": f"{i}", "id": str(i),
                 "result_channel": results},
            )  # fmt: skip
        for _ in range(20):
            assert (await layer.receive(results))["ok"] is True
        assert gateway._channels == {}  # nothing left behind per channel
    for channel, first in (("C0GENERAL", 1), ("C0RANDOM", 0)):
        texts = [c.args["text"] for c in fake_slack.calls_of("chat.postMessage")
                 if c.args["channel"] == channel]  # fmt: skip
        assert texts == [str(i) for i in range(first, 20, 2)]
