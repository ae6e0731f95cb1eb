"""``python examples/demo.py`` as a newcomer runs it: one process, the helpdesk's story told.

Without mosquitto and ngircd (a PATH without them) it tells the story of the gateways that
need nothing but Python and says how to get the other two; with them, all six run, and the
live page it prints, loaded in headless Chromium, shows every step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.testing import Server
from tests.conftest import service
from tests.support.example import EXAMPLES, ROOT

pytestmark = pytest.mark.timeout(240)

DEMO = EXAMPLES / "demo.py"
#: what the story must show, wherever the demo saw it: (where, text)
MAIL_STEPS = [
    ("live page", "mail: ticket #1 opened: My printer is on fire"),
    ("Slack C0GENERAL", "New ticket #1: My printer is on fire"),
    ("live page", "slack: ticket #1 announced in C0GENERAL"),
    ("relay", "mail to alice@example.org: Re: My printer is on fire"),
    ("relay", "In-Reply-To: <first-mail@example.org>"),
    ("relay", "| Thanks, we filed your mail as ticket #1."),
    ("live page", "mail: reply to Alice <alice@example.org> for ticket #1 sent"),
]
SENSOR_STEPS = [
    ("live page", "mqtt: sensors/server-room/temperature = 41.5"),
    ("live page", "sensor: ticket #2 opened: server-room temperature at 41.5 (over 30)"),
    ("MQTT broker", 'alerts/server-room/temperature {"ticket":2,'),
    ("Slack C0GENERAL", "New ticket #2: server-room temperature"),
]
IRC_STEPS = [
    ("IRC #support", "<helpdesk> New ticket #1: My printer is on fire"),
    ("live page", "irc: ticket #1 announced in #support"),
    ("IRC #support", "<helpdesk> New ticket #2: server-room temperature"),
    ("live page", "irc: ticket #2 announced in #support"),
]


def digest_steps(tickets: int) -> list[tuple[str, str]]:
    return [
        ("live page", f"scheduler: digest: {tickets} open ticket(s)"),
        ("relay", f"mail to team@example.com: Helpdesk digest: {tickets} open ticket(s)"),
        ("live page", "mail: digest to team@example.com sent"),
    ]


def missing_steps(output: str, steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The steps no line of ``output`` shows (a line: time, where, then the text)."""
    return [
        (where, text)
        for where, text in steps
        if not re.search(rf"s  {re.escape(where)}\s+{re.escape(text)}", output)
    ]


def run_demo(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path), **env},
    )


def test_with_only_python_the_demo_tells_the_story_and_says_how_to_see_the_rest(
    tmp_path: Path,
) -> None:
    # a machine without mosquitto and ngircd: every PATH entry that has either is left out
    path = os.pathsep.join(
        entry
        for entry in os.environ["PATH"].split(os.pathsep)
        if not any(os.path.exists(os.path.join(entry, b)) for b in ("mosquitto", "ngircd"))
    )
    result = run_demo(tmp_path, env={"PATH": path, "GATEWAYS_LOG_LEVEL": "INFO"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # issue 6: no gateways-demo-* left behind
    out = result.stdout
    assert "MQTT: skipped, mosquitto is not installed; to see it: install mosquitto" in out
    assert "IRC: skipped, ngircd is not installed; to see it: install ngircd" in out
    assert "2. (MQTT skipped: no sensor alert.)" in out
    assert missing_steps(out, MAIL_STEPS + digest_steps(1)) == [], out
    assert "IRC #support" not in out and "ticket #2" not in out
    assert re.search(r"Live page: http://127\.0\.0\.1:\d+/", out)
    assert "signal received: draining" in result.stderr  # stopped the way systemd would
    assert " ERROR " not in result.stderr, result.stderr[-3000:]


def wait_lines(driver: Any, texts: list[str], timeout: float = 60) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d: Any) -> bool:
        lines = [e.text for e in d.find_elements("css selector", "#events li")]
        return all(any(text in line for line in lines) for text in texts)

    WebDriverWait(driver, timeout).until(shown, f"not all of {texts} appeared")


def test_all_six_and_every_step_on_the_live_page(tmp_path: Path, browser: Any) -> None:
    for binary in ("mosquitto", "ngircd"):
        service(binary)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    demo = Server([sys.executable, str(DEMO), "--serve"], None, cwd=ROOT, env=env, name="demo")
    try:
        url = demo.wait_for("Live page: ", 120).split("Live page: ", 1)[1].split()[0]
        browser.get(url)  # while the story runs: lines arrive live, and what was before
        # a line on the page: time, source, then the summary the demo prints after "source: "
        steps = MAIL_STEPS + SENSOR_STEPS + IRC_STEPS + digest_steps(2)
        page = [text.split(": ", 1)[1] for where, text in steps if where == "live page"]
        wait_lines(browser, page)
        demo.wait_for("The story took", 60)
        assert browser.find_element("id", "status").text == "connected"
        output = "\n".join(demo.output)
        assert "skipped" not in output
        assert missing_steps(output, steps) == [], output
        # a page opened after the story shows all of it, in order
        browser.get(url)
        wait_lines(browser, page)
        lines = [e.text for e in browser.find_elements("css selector", "#events li")]
        opened = [i for i, line in enumerate(lines) if "opened" in line]
        assert len(opened) == 2 and "ticket #1" in lines[opened[0]], lines
    finally:
        code = demo.stop(signal.SIGTERM)
    assert code == 0, demo.tail()
