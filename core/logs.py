"""Logging: one line per event worth a person's attention, secrets redacted (DESIGN §8).

Every secret the configuration loads is registered here; a filter on the root handler replaces
any registered value, and the password part of any ``scheme://user:password@host`` URL, with
``***`` before a record is written, whatever logger produced it.
"""

from __future__ import annotations

import logging
import re
import sys
import time

__all__ = ["redact", "register_secret", "setup_logging"]

_secrets: set[str] = set()
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.IGNORECASE)


def register_secret(value: str) -> None:
    """Never let ``value`` reach a log line. Values shorter than 4 characters are too common."""
    if len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with registered secrets and URL passwords replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


#: every process of the suite logs the same way: UTC with a ``Z``, so lines of the gateways and
#: of the Django workers (whose TIME_ZONE changes the process's local time) sort together
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class RedactingFormatter(logging.Formatter):
    """Formats as usual (UTC times), then redacts the whole line (message, arguments, traceback).

    Usable from Django's ``LOGGING``: ``{"()": "core.logs.RedactingFormatter"}``.
    """

    converter = time.gmtime  # type: ignore[assignment]  # typeshed wants the optional arg

    def __init__(self, fmt: str | None = LINE_FORMAT, datefmt: str | None = DATE_FORMAT) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str | int = "INFO") -> None:
    """Send logs to stderr, one line each, redacted, times in UTC. Safe to call more than once.

    Console handlers already on the root logger (Django's ``LOGGING``) are replaced, so no
    line is printed twice.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        # ours from an earlier call, or a console handler from Django's LOGGING (under
        # manage.py rungateway): either would print every line a second time
        console = type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
            sys.stderr,
            sys.stdout,
        )
        if getattr(handler, "_gateways", False) or console:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter())
    handler._gateways = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # aiosmtpd logs every SMTP line at INFO under "mail.log"; one line per mail is ours to write
    logging.getLogger("mail.log").setLevel(logging.WARNING)
