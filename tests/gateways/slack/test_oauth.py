"""Many workspaces (issue 26, item 3): the OAuth v2 install flow on the gateway's HTTP listener,
the installation store in the layer's Redis, events and commands routed by ``team``, token
rotation refreshed before expiry, once across replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from aiohttp import ClientSession, CookieJar

from core.layers import resolve_layer
from core.testing import RedisServer, command, free_port, metric, until
from core.testing.slack import EventsApiClient, FakeSlack
from tests.gateways.slack.conftest import SECRET, next_event, running, slack_config

JOINED = {"type": "member_joined_channel", "user": "U0ALICE", "channel": "C0GENERAL"}
SEND = {"type": "slack.send", "channel": "C0GENERAL"}


def oauth_config(fake: FakeSlack, port: int, **slack: Any) -> dict[str, Any]:
    oauth = {
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "scopes": ["chat:write", "commands", "channels:read"],
        "authorize_url": fake.authorize_url,
        "redirect_uri": f"http://127.0.0.1:{port}/slack/oauth_redirect",
        **slack.pop("oauth", {}),
    }
    section = {
        "transport": "events_api",
        "app_token": None,
        "bot_token": None,
        "events_api": {"port": port},
        "oauth": oauth,
        **slack,
    }
    return slack_config(fake, **section)


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[ClientSession]:
    """A browser: it keeps cookies (also for 127.0.0.1) and follows redirects."""
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as session:
        yield session


async def install(port: int, fake: FakeSlack, team: str, **options: Any) -> tuple[int, str]:
    """A person installs the app into ``team``: the install link, Slack's authorize page, back
    to the redirect URL; (status, page)."""
    fake.install_into(team, **options)
    async with browser() as session, session.get(f"http://127.0.0.1:{port}/slack/install") as page:
        return page.status, await page.text()


async def test_an_app_installed_in_two_workspaces_serves_both(
    redis_server: RedisServer, fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    one, two = fake_slack.add_team("T0ONE", "One"), fake_slack.add_team("T0TWO", "Two")
    port = free_port()
    config = oauth_config(fake_slack, port)
    events = EventsApiClient(f"http://127.0.0.1:{port}/slack/events", SECRET)
    installs = metric("gateway_slack_installs_total", gateway="team", outcome="ok")
    try:
        async with running(config, resolve_layer(redis_server.url)) as (gateway, layer):
            for team in (one, two):
                status, page = await install(port, fake_slack, team.id)
                assert status == 200 and f"The app is installed in {team.name}" in page
            assert metric("gateway_slack_installs_total", gateway="team", outcome="ok") == (
                installs + 2
            )
            exchanged = fake_slack.calls_of("oauth.v2.access")
            assert len(exchanged) == 2 and all("code" in c.args for c in exchanged)

            # events from each workspace carry it; commands go out with its token
            for team in (one, two):
                assert (await events.event(JOINED, team=team.id, bot_user=team.bot_user))[0] == 200
                joined = await next_event(layer, "slack.joined", team=team.id)
                sent = await command(
                    layer,
                    joined["reply_channel"],
                    {"type": "slack.send", "channel": "C0GENERAL", "text": f"hi {team.name}",
                     "team": joined["team"]},
                )  # fmt: skip
                assert sent["ok"] is True, sent
                post = fake_slack.calls_of("chat.postMessage")[-1]
                assert (post.team, post.args["text"]) == (team.id, f"hi {team.name}")
                assert post.token == fake_slack.tokens_of(team.id)[-1]
            assert len({c.token for c in fake_slack.calls_of("chat.postMessage")}) == 2

            nowhere = await command(layer, "team.send", {"type": "slack.send",
                                    "channel": "C0GENERAL", "text": "x"})  # fmt: skip
            assert nowhere["ok"] is False and "'team' is required" in str(nowhere["error"])
            stranger = await command(layer, "team.send", {**SEND, "text": "x", "team": "T0NONE"})
            assert stranger["error"] == "not installed in workspace T0NONE"
            assert gateway.workspaces.durable
        # a new process (or a replica) finds the installations in Redis
        async with running(config, resolve_layer(redis_server.url)) as (_, layer):
            sent = await command(layer, "team.send", {**SEND, "text": "again", "team": "T0TWO"})
            assert sent["ok"] is True
            assert fake_slack.calls_of("chat.postMessage")[-1].team == "T0TWO"
    finally:
        await events.close()
    for token in fake_slack.tokens_of("T0ONE") + fake_slack.tokens_of("T0TWO"):
        assert token not in caplog.text
    assert fake_slack.client_secret not in caplog.text


async def test_the_state_is_single_use_short_lived_and_bound_to_its_browser(
    redis_server: RedisServer, fake_slack: FakeSlack
) -> None:
    fake_slack.add_team("T0ONE", "One")
    port = free_port()
    config = oauth_config(fake_slack, port, oauth={"state_ttl": 1})
    base = f"http://127.0.0.1:{port}"
    async with running(config, resolve_layer(redis_server.url)), browser() as session:
        # the install link sets the state as a cookie and sends the browser to Slack
        async with session.get(f"{base}/slack/install", allow_redirects=False) as start:
            assert start.status == 302
            target = urlparse(start.headers["Location"])
            query = parse_qs(target.query)
            assert f"{target.scheme}://{target.netloc}{target.path}" == fake_slack.authorize_url
            assert query["client_id"] == [fake_slack.client_id]
            assert query["scope"] == ["chat:write,commands,channels:read"]
            assert query["redirect_uri"] == [f"{base}/slack/oauth_redirect"]
            state = query["state"][0]
            assert "HttpOnly" in start.headers["Set-Cookie"]
        fake_slack.install_into("T0ONE")
        async with session.get(start.headers["Location"], allow_redirects=False) as slack:
            back = slack.headers["Location"]
        # someone else's browser with that link: refused, and the state is spent
        async with browser() as other, other.get(back) as page:
            assert page.status == 400 and "invalid_browser" in await page.text()
        async with session.get(back) as page:
            assert page.status == 400 and "invalid_state" in await page.text()

        # a fresh install, replayed after it went through: the state is single use
        fake_slack.install_into("T0ONE")
        async with session.get(f"{base}/slack/install") as page:
            assert page.status == 200
            finished = str(page.url)
        async with session.get(finished) as page:
            assert page.status == 400 and "invalid_state" in await page.text()

        # an install left at Slack's page for longer than state_ttl
        async with session.get(f"{base}/slack/install", allow_redirects=False) as start:
            location = start.headers["Location"]
        fake_slack.install_into("T0ONE")
        async with session.get(location, allow_redirects=False) as slack:
            back = slack.headers["Location"]
        await asyncio.sleep(1.2)
        async with session.get(back) as page:
            assert page.status == 400 and "invalid_state" in await page.text()

        # the person cancels at Slack
        status, page_text = await install(port, fake_slack, "T0ONE", approve=False)
        assert status == 400 and "access_denied" in page_text
    assert len(fake_slack.calls_of("oauth.v2.access")) == 1  # only the one that went through
    del state


async def test_a_rotating_token_is_refreshed_before_it_expires(
    redis_server: RedisServer, fake_slack: FakeSlack
) -> None:
    team = fake_slack.add_team("T0ONE", "One")
    fake_slack.rotation = 6.0  # tokens expire 6 s after they are issued
    port = free_port()
    # refreshed once less than 5 s are left: a window of 5 s for a check every 1.25 s
    config = oauth_config(fake_slack, port, oauth={"refresh_before": 5.0})
    refreshes = metric("gateway_slack_token_refreshes_total", gateway="team", outcome="ok")
    async with running(config, resolve_layer(redis_server.url)) as (gateway, layer):
        assert (await install(port, fake_slack, team.id))[0] == 200
        (first,) = fake_slack.tokens_of(team.id)
        expires = fake_slack.tokens[first].expires_at
        assert expires is not None
        # nobody uses the token: the background check renews it anyway, before it expires
        await fake_slack.wait_for(
            lambda: any(
                c.args.get("grant_type") == "refresh_token"
                for c in fake_slack.calls_of("oauth.v2.access")
            ),
            10,
            "a refresh",
        )
        assert time.time() < expires
        await until(
            lambda: (
                metric("gateway_slack_token_refreshes_total", gateway="team", outcome="ok")
                > refreshes
            ),
            what="the refresh counted",
        )
        assert len(fake_slack.tokens_of(team.id)) >= 2
        # after the first token expired, commands go out with the new one and pass
        await asyncio.sleep(max(0.0, expires - time.time() + 0.2))
        sent = await command(layer, "team.send", {"type": "slack.send", "channel": "C0GENERAL",
                             "text": "still here", "team": team.id})  # fmt: skip
        assert sent["ok"] is True, sent
        used = fake_slack.calls_of("chat.postMessage")[-1].token
        assert used != first and used in fake_slack.tokens_of(team.id)
        stored = await gateway.workspaces.store.find(None, team.id)  # type: ignore[union-attr]
        assert stored is not None and stored.bot_token == used


async def test_two_replicas_refresh_an_expiring_token_once(
    redis_server: RedisServer, fake_slack: FakeSlack
) -> None:
    team = fake_slack.add_team("T0ONE", "One")
    fake_slack.rotation = 100.0
    port = free_port()
    # refreshed when less than 99.5 s are left: on first use, half a second after the install
    config = oauth_config(fake_slack, port, oauth={"refresh_before": 99.5})
    second = oauth_config(fake_slack, free_port(), oauth={"refresh_before": 99.5})
    async with (
        running(config, resolve_layer(redis_server.url)) as (first_gateway, _),
        running(second, resolve_layer(redis_server.url)) as (second_gateway, _),
    ):
        assert (await install(port, fake_slack, team.id))[0] == 200
        await asyncio.sleep(0.6)
        found = await asyncio.gather(
            *(
                gateway.workspaces.installation(None, team.id)
                for gateway in (first_gateway, second_gateway, first_gateway)
            )
        )
        refreshes = [c for c in fake_slack.calls_of("oauth.v2.access") if c.args.get("grant_type")]
        assert len(refreshes) == 1  # a refresh token is revoked by its use: only once
        assert {i.bot_token for i in found} == {fake_slack.tokens_of(team.id)[-1]}


async def test_an_uninstall_forgets_the_installation(
    redis_server: RedisServer, fake_slack: FakeSlack
) -> None:
    team = fake_slack.add_team("T0ONE", "One")
    port = free_port()
    events = EventsApiClient(f"http://127.0.0.1:{port}/slack/events", SECRET)
    try:
        async with running(oauth_config(fake_slack, port), resolve_layer(redis_server.url)) as (
            gateway,
            layer,
        ):
            assert (await install(port, fake_slack, team.id))[0] == 200
            status, _ = await events.event({"type": "app_uninstalled"}, team=team.id)
            assert status == 200
            uninstalled = await next_event(layer, "slack.event", event_type="app_uninstalled")
            assert uninstalled["team"] == team.id
            store = gateway.workspaces.store
            assert store is not None
            await until(lambda: _gone(store, team.id), what="the installation removed")
            sent = await command(layer, "team.send", {"type": "slack.send",
                                 "channel": "C0GENERAL", "text": "x", "team": team.id})  # fmt: skip
            assert sent["error"] == "not installed in workspace T0ONE"
    finally:
        await events.close()


async def _gone(store: Any, team: str) -> bool:
    return await store.find(None, team) is None


async def test_on_memory_the_installations_live_in_the_process_and_it_says_so(
    fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    team = fake_slack.add_team("T0ONE", "One")
    port = free_port()
    async with running(oauth_config(fake_slack, port)) as (gateway, layer):
        assert not gateway.workspaces.durable
        assert "installations are lost when the process stops" in caplog.text
        assert (await install(port, fake_slack, team.id))[0] == 200
        sent = await command(layer, "team.send", {"type": "slack.send", "channel": "C0GENERAL",
                             "text": "x", "team": team.id})  # fmt: skip
        assert sent["ok"] is True


async def test_socket_mode_serves_only_the_install_flow_over_http(fake_slack: FakeSlack) -> None:
    team = fake_slack.add_team("T0ONE", "One")
    port = free_port()
    config = oauth_config(fake_slack, port, transport="socket_mode", app_token=fake_slack.app_token)
    async with running(config) as (_, layer):
        await next_event(layer, "slack.connect")
        assert not fake_slack.calls_of("auth.test")  # no one bot token to test
        assert (await install(port, fake_slack, team.id))[0] == 200
        async with (
            ClientSession() as session,
            session.post(f"http://127.0.0.1:{port}/slack/events", data=b"{}") as answer,
        ):
            assert answer.status in (404, 405)  # events come over the socket
        await fake_slack.send_event(JOINED, team=team.id)
        joined = await next_event(layer, "slack.joined")
        assert joined["team"] == team.id
        sent = await command(
            layer, joined["reply_channel"], {**SEND, "text": "hi", "team": joined["team"]}
        )
        assert sent["ok"] is True
        assert fake_slack.calls_of("chat.postMessage")[-1].team == team.id


def test_anything_shaped_like_a_slack_token_is_hidden_in_the_gateways_log_lines(
    fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    """Installation tokens are not in the config, so the log redactor does not know them: the
    gateway's loggers hide every Slack-token-shaped word (bot, rotating, refresh, app, step)."""
    from gateways.slack.config import SlackGatewayConfig
    from gateways.slack.gateway import SlackGateway

    caplog.set_level(logging.DEBUG)
    SlackGateway(
        SlackGatewayConfig.model_validate(slack_config(fake_slack)), resolve_layer("memory://")
    )
    tokens = ["xoxb-1-abc", "xoxe.xoxb-1-T1-def", "xoxe-1-T1-ghi", "xapp-1-A1-jkl", "xwfp-T1-mno"]
    for name in ("gateway.slack", "gateway.slack.sdk", "gateway.slack.oauth"):
        logging.getLogger(name).warning("answer %s", {"access_token": tokens})
    assert not [token for token in tokens if token in caplog.text]
    assert caplog.text.count("***") == 3 * len(tokens)
