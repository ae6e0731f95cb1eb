"""The live page (examples/live/page.html) in headless Chromium, driven by selenium through
Debian's ``chromium-driver``: a mail sent in with smtplib appears on it, and two tabs see each
other's lines. Every process is real: gateway-http-ws, gateway-email, Redis, runworker."""

from __future__ import annotations

import asyncio
import smtplib
from email.message import EmailMessage
from typing import Any

from core.testing import SmtpSink, free_port
from tests.gateways.http_ws.conftest import Web, start

WAIT = 30


def wait_text(driver: Any, handle: str, needle: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.switch_to.window(handle)
    WebDriverWait(driver, WAIT).until(
        lambda d: any(needle in e.text for e in d.find_elements("css selector", "#events li")),
        f"{needle!r} never appeared",
    )


def say(driver: Any, handle: str, text: str) -> None:
    driver.switch_to.window(handle)
    box = driver.find_element("css selector", "#say input[name=text]")
    box.send_keys(text)
    driver.find_element("css selector", "#say button").click()


def answer(driver: Any, handle: str, line: str, text: str) -> None:
    driver.switch_to.window(handle)
    item = next(e for e in driver.find_elements("css selector", "#events li") if line in e.text)
    item.find_element("css selector", "button").click()
    item.find_element("css selector", "form.answer input").send_keys(text)
    item.find_element("css selector", "form.answer button").click()


def open_tab(driver: Any, url: str, new: bool) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    if new:
        driver.switch_to.new_window("tab")
    driver.get(url)
    WebDriverWait(driver, WAIT).until(lambda d: d.find_element("id", "status").text == "connected")
    return str(driver.current_window_handle)


async def test_mail_and_chat_reach_every_tab(web_factory: type[Web], browser: Any) -> None:
    sink = await SmtpSink().start()
    smtp_port = free_port()
    web = web_factory(SMTP_PORT=str(smtp_port), RELAY_PORT=str(sink.port))
    email = None
    try:
        await start(web)
        assert web.worker is not None
        web.worker.stop()
        web.start_worker("live", "echo", "support-mail")
        # its own health port: HEALTH_PORT is gateway-http-ws's
        email = web.project.gateway("email.yaml", env={"HEALTH_PORT": str(free_port())})
        await asyncio.to_thread(email.start)
        first = await asyncio.to_thread(open_tab, browser, f"{web.http}/", False)
        second = await asyncio.to_thread(open_tab, browser, f"{web.http}/", True)

        mail = EmailMessage()
        mail["From"] = "Erin <erin@example.org>"
        mail["To"] = "support@example.com"
        mail["Subject"] = "Coffee machine"
        mail["Message-ID"] = "<live-1@example.org>"
        mail.set_content("it makes tea")

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
                client.send_message(mail)

        await asyncio.to_thread(send)
        for tab in (first, second):
            await asyncio.to_thread(wait_text, browser, tab, "Coffee machine")

        # a person answers the mail from the page: email.send through the email gateway
        await asyncio.to_thread(answer, browser, second, "Coffee machine", "try the other one")
        envelope = await asyncio.wait_for(sink.received.get(), WAIT)  # MailConsumer's auto-reply
        answers = [envelope, await asyncio.wait_for(sink.received.get(), WAIT)]
        texts = [a.original_content.decode() for a in answers]
        mine = [t for t in texts if "try the other one" in t]
        assert len(mine) == 1 and "Subject: Re: Coffee machine" in mine[0]
        assert [a.rcpt_tos for a in answers] == [["erin@example.org"]] * 2
        await asyncio.to_thread(wait_text, browser, first, "answer sent")

        await asyncio.to_thread(say, browser, first, "hello from tab one")
        await asyncio.to_thread(wait_text, browser, second, "hello from tab one")
        await asyncio.to_thread(say, browser, second, "and back from tab two")
        await asyncio.to_thread(wait_text, browser, first, "and back from tab two")
    finally:
        if email is not None:
            await asyncio.to_thread(email.stop)
        await asyncio.to_thread(web.stop)
        await sink.stop()
