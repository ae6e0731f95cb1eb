"""Work functions for parser processes in tests (``ParserPool(work="module:function")``).

A parser process imports this module, so it imports only the standard library and the pure
translate module. Each takes the mail's bytes and the caps, like the real
``gateways.email.parser_pool.parse_within_limits``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gateways.email.translate import MailLimits, parse_mail


def broken(raw: bytes, limits: MailLimits) -> list[Any]:
    """A bug in the parser."""
    raise RuntimeError("bug in the parser")


def spin(raw: bytes, limits: MailLimits) -> list[Any]:
    """Python code that never ends: the CPU timer interrupts it."""
    while True:
        pass


def stuck_in_c(raw: bytes, limits: MailLimits) -> list[Any]:
    """C code that never checks for signals for minutes: only the kernel's RLIMIT_CPU ends it."""
    return ["parsed", {"sum": sum(range(10**12))}]


def touch_then_sleep(raw: bytes, limits: MailLimits) -> list[Any]:
    """Parse ``raw`` unless it is ``sleep:PATH``: then create PATH and sleep (no CPU)."""
    if raw.startswith(b"sleep:"):
        Path(raw[6:].decode()).touch()
        time.sleep(600)
    return ["parsed", parse_mail(raw)]
