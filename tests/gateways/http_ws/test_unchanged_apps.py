"""Unchanged Channels applications behind the bridge, and the same tests under Daphne (parity).

examples/example/asgi.py is the Channels tutorial's shape: ``AllowedHostsOriginValidator(
AuthMiddlewareStack(URLRouter(…)))`` around the tutorial's ``ChatConsumer``, a
``JsonWebsocketConsumer`` and an ``AsyncHttpConsumer`` (examples/rooms), Django's views and login.
``chat_site`` serves it through gateway-http-ws with two real ``manage.py runworker rooms``
processes, then with ``daphne``; every test here runs against both, with the ``websockets`` client,
``httpx`` and headless Chromium.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.gateways.http_ws.conftest import PASSWORD, ChatSite

WAIT = 30


async def chat(site: ChatSite, room: str, **kwargs: Any) -> websockets.ClientConnection:
    """A socket in ``room``, sent from a page of the site (AllowedHostsOriginValidator)."""
    return await websockets.connect(
        f"{site.ws}/ws/chat/{room}/", origin=site.http, open_timeout=WAIT, **kwargs
    )


async def say(ws: websockets.ClientConnection, message: str) -> None:
    await ws.send(json.dumps({"message": message}))


async def heard(ws: websockets.ClientConnection) -> str:
    return str(json.loads(await asyncio.wait_for(ws.recv(), WAIT))["message"])


async def test_the_tutorial_chat(chat_site: ChatSite) -> None:
    """The tutorial's consumer keeps its room in memory (``self.room_group_name``): with two
    workers, every socket's messages still reach the instance that joined its room."""
    lobby = [await chat(chat_site, "lobby") for _ in range(4)]
    other = await chat(chat_site, "other")
    try:
        for n in range(15):  # 60 messages from four sockets, every one reaches every member
            for i, ws in enumerate(lobby):
                await say(ws, f"{i}:{n}")
            for ws in lobby:
                got = [await heard(ws) for _ in range(4)]
                assert sorted(got) == [f"{i}:{n}" for i in range(4)]
        await say(other, "elsewhere")
        assert await heard(other) == "elsewhere"  # nothing from the lobby came first
    finally:
        await asyncio.gather(*(ws.close() for ws in [*lobby, other]))


async def test_json_consumer_and_its_own_channel(chat_site: ChatSite) -> None:
    async with websockets.connect(f"{chat_site.ws}/ws/whoami/", origin=chat_site.http) as ws:
        assert json.loads(await ws.recv()) == {"user": None, "path": "/ws/whoami/"}
        await ws.send(json.dumps({"a": [1, 2]}))
        assert json.loads(await ws.recv()) == {"echo": {"a": [1, 2]}, "user": None}
        await ws.send(json.dumps({"later": "through the layer"}))  # to self.channel_name
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT)) == {"later": "through the layer"}
    # AllowedHostsOriginValidator: a page of another site may not connect
    with pytest.raises(InvalidStatus) as foreign:
        await websockets.connect(f"{chat_site.ws}/ws/whoami/", origin="http://evil.example")
    assert foreign.value.response.status_code == 403


async def test_a_logged_in_session_reaches_sockets_and_http_consumers(
    chat_site: ChatSite,
) -> None:
    session = await asyncio.to_thread(chat_site.login)
    cookie = {"Cookie": f"sessionid={session}"}
    async with websockets.connect(
        f"{chat_site.ws}/ws/whoami/", origin=chat_site.http, additional_headers=cookie
    ) as ws:
        assert json.loads(await ws.recv())["user"] == "alice"
    # an AsyncHttpConsumer behind AuthMiddlewareStack says something in a room as alice
    ws = await chat(chat_site, "posts")
    try:
        async with httpx.AsyncClient(base_url=chat_site.http, timeout=WAIT) as client:
            url = "/chat/posts/messages/"
            posted = await client.post(url, json={"message": "hi"}, headers=cookie)
            assert posted.status_code == 202
            assert posted.json() == {"sent": "alice: hi"}  # sent in two parts
            assert await heard(ws) == "alice: hi"
            anonymous = await client.post(url, json={"message": "who?"})
            assert anonymous.json() == {"sent": "someone: who?"}
            assert await heard(ws) == "someone: who?"
            wrong = await client.get(url)
            assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    finally:
        await ws.close()


async def test_a_path_the_application_does_not_route(chat_site: ChatSite) -> None:
    """The application's URLRouter raises for an unknown path: refused at once (the bridge
    answers 500 from the worker instead of 504 after connect_timeout)."""
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(
            f"{chat_site.ws}/ws/nowhere/", origin=chat_site.http, open_timeout=WAIT
        )
    assert refused.value.response.status_code == 500


def open_room(driver: Any, site: ChatSite, room: str, new_tab: bool) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    if new_tab:
        driver.switch_to.new_window("tab")
    driver.get(f"{site.http}/chat/{room}/")
    WebDriverWait(driver, WAIT).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-chat") == "open"
    )
    return str(driver.current_window_handle)


def sign_in(driver: Any, site: ChatSite) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{site.http}/accounts/login/?next=/chat/")
    driver.find_element("id", "username").send_keys("alice")
    driver.find_element("id", "password").send_keys(PASSWORD)
    driver.find_element("id", "login").click()
    # the page the login redirects to, loaded (a navigation started before it ends is undone)
    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements("id", "room-name-input"))


def type_message(driver: Any, handle: str, text: str) -> None:
    driver.switch_to.window(handle)
    driver.find_element("id", "chat-message-input").send_keys(text + "\n")


def wait_log(driver: Any, handle: str, text: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.switch_to.window(handle)
    WebDriverWait(driver, WAIT).until(
        lambda d: text in (d.find_element("id", "chat-log").get_attribute("value") or ""),
        f"{text!r} never reached the chat log",
    )


def wait_who(driver: Any, handle: str, text: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.switch_to.window(handle)
    WebDriverWait(driver, WAIT).until(lambda d: d.find_element("id", "who").text == text)


async def test_the_chat_page_in_chromium(chat_site: ChatSite, browser: Any) -> None:
    """The tutorial's page: a signed-in user's two tabs in one room see each other's lines,
    and the page's second socket (behind AuthMiddlewareStack) knows who is signed in."""
    await asyncio.to_thread(sign_in, browser, chat_site)
    first = await asyncio.to_thread(open_room, browser, chat_site, "browsers", False)
    second = await asyncio.to_thread(open_room, browser, chat_site, "browsers", True)
    for tab in (first, second):
        await asyncio.to_thread(wait_who, browser, tab, "signed in as alice")
    await asyncio.to_thread(type_message, browser, first, "hello from tab one")
    await asyncio.to_thread(wait_log, browser, second, "hello from tab one")
    await asyncio.to_thread(type_message, browser, second, "and back from tab two")
    await asyncio.to_thread(wait_log, browser, first, "and back from tab two")
