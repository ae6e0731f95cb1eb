"""Logging: one line per event worth a person's attention, secrets redacted (DESIGN §8).

Every secret the configuration loads is registered here; a filter on the root handler replaces
any registered value, and the password part of any ``scheme://user:password@host`` URL, with
``***`` before a record is written, whatever logger produced it.
"""

from __future__ import annotations

import logging
import re
import sys

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


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then redacts the whole line (message, arguments and traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str | int = "INFO") -> None:
    """Send logs to stderr, one line each, redacted. Safe to call more than once."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gateways", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    handler._gateways = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # aiosmtpd logs every SMTP line at INFO under "mail.log"; one line per mail is ours to write
    logging.getLogger("mail.log").setLevel(logging.WARNING)
