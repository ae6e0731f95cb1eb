"""Logging: one line per event worth a person's attention, secrets redacted (DESIGN §8).

Every secret the configuration loads is registered here; a filter on the root handler replaces
any registered value, the password part of any ``scheme://user:password@host`` URL, and the
value of any password-like query parameter (:data:`SECRET_PARAMETERS`: ``?password=…``, which
redis-py accepts in a layer path) with ``***`` before a record is written, whatever logger
produced it.

Log lines carry text that senders chose (a mail header, an MQTT topic, a MIME defect), so two
rules keep one hostile input from stalling the process that logs it (issue 14, item 1):
redaction runs in time linear in the line, and what callers log of such text is cut with
:func:`clip`; the formatter cuts any line still over :data:`MAX_LINE` as a last resort.
"""

from __future__ import annotations

import logging
import re
import sys
import time

__all__ = [
    "MAX_LINE",
    "SECRET_PARAMETERS",
    "RepeatFilter",
    "clip",
    "describe_layer",
    "redact",
    "register_secret",
    "setup_logging",
]

#: characters of one formatted log line (message and traceback) before it is cut
MAX_LINE = 16 * 1024
#: characters :func:`clip` keeps by default
CLIP = 200

_secrets: set[str] = set()
# ``scheme://user:password@``. The look-behind lets a match start only where a scheme can start:
# the old pattern tried every position inside a run of [a-z0-9+.-] and rescanned the rest of the
# run from each, quadratic time (25 s for a 65,535-letter line, the whole gateway waiting).
# Now each run is scanned from its start only, and user and password stop at the first "/", so
# the scans that follow one "://" never overlap the next one: linear. A password is a URL's
# userinfo, where "/", "?" and "#" must be percent-encoded anyway.
_URL_PASSWORD = re.compile(
    r"(?<![a-z0-9+.-])(?P<head>[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)[^/?#@\s]+@", re.IGNORECASE
)


#: a parameter ``name=value`` (in a URL's query, or ``password=x`` in a message) is a secret
#: when its name, lower-cased with ``-`` read as ``_``, is one of ``exact``, contains one of
#: ``within`` or ends with one of ``suffixes``; its value runs to the next ``&``, ``#`` or
#: space (issue 21, item 16: ``redis://h/0?password=…``, which redis-py accepts, was logged)
SECRET_PARAMETERS: dict[str, tuple[str, ...]] = {
    "exact": ("pass", "pwd", "pw", "key", "auth", "sig"),
    "within": ("password", "passwd", "secret", "token", "credential", "signature", "apikey"),
    "suffixes": ("_key", "_pass", "_pwd"),
}
#: every secret name contains one of these: a line without any is left alone at once
_SECRET_HINTS = ("pass", "pw", "key", "auth", "sig", "secret", "token", "credential")
# a name is a whole run of name characters: one try per run, so finding them is linear
_PARAMETER = re.compile(r"(?<![\w.-])([\w.-]+)=")
_VALUE_END = re.compile(r"[&#\s]")


def _secret_parameter(name: str) -> bool:
    name = name.lower().replace("-", "_")
    return (
        name in SECRET_PARAMETERS["exact"]
        or any(part in name for part in SECRET_PARAMETERS["within"])
        or name.endswith(SECRET_PARAMETERS["suffixes"])
    )


def _hide_parameters(text: str) -> str:
    """``text`` with the value of every secret parameter replaced by ``***``.

    Names are found without consuming values, so ``user=bob,password=x`` is caught too; a value
    is scanned only from a secret name on, and names inside a hidden value are skipped: the
    scans never overlap, linear in the line.
    """
    parts: list[str] = []
    done = 0
    for match in _PARAMETER.finditer(text):
        start = match.end()
        if match.start() < done or not _secret_parameter(match[1]):
            continue
        end_match = _VALUE_END.search(text, start)
        end = end_match.start() if end_match else len(text)
        if end == start or text.startswith("***", start):
            continue  # empty, or hidden already
        parts += [text[done:start], "***"]
        done = end
    return "".join([*parts, text[done:]]) if parts else text


def clip(value: object, limit: int = CLIP) -> str:
    """``repr(value)`` cut to about ``limit`` characters, saying how much was left out.

    For text a sender chose (a header, a topic, an address, a defect): the log shows enough to
    recognise it, and one hostile value cannot make a line of unbounded size.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text) - limit} more characters)"


def register_secret(value: str) -> None:
    """Never let ``value`` reach a log line. Values shorter than 4 characters are too common."""
    if len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with registered secrets, URL passwords and password-like query parameters
    (:data:`SECRET_PARAMETERS`) replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    if "=" in text and any(hint in text.lower() for hint in _SECRET_HINTS):
        text = _hide_parameters(text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def describe_layer(path: str) -> str:
    """The layer path with any password replaced, for logs and error messages: the userinfo's,
    and the value of every password-like query parameter (``?password=…``, which redis-py
    accepts; :data:`SECRET_PARAMETERS` lists which).

    Read by hand rather than with ``urlsplit``: a password with a raw ``/`` in it
    (``redis://:pa/ss@host``) is no password to ``urlsplit``, which then found "no host" and
    the error printed the path whole.
    """
    scheme, sep, rest = path.partition("://")
    authority = rest.split("?", 1)[0].split("#", 1)[0]
    userinfo, at, _ = authority.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if sep and at and colon:
        path = f"{scheme}://{user}:***@{rest[len(userinfo) + 1 :]}"
    return redact(path)


#: every process of the suite logs the same way: UTC with a ``Z``, so lines of the gateways and
#: of the Django workers (whose TIME_ZONE changes the process's local time) sort together
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class RepeatFilter(logging.Filter):
    """Passes one record of each kind every ``interval`` seconds; the next one says how many
    were held back.

    A record's kind is its logger and the first line of its message. On the ``asyncio`` logger:
    when descriptors run out, CPython 3.11's accept loop (``_accept_connection``) reports EMFILE
    once per pending connection and re-arms once each, and the log grew by 8-10k lines a second
    (1 GB in five minutes; issue 14, item 8).

    With ``marked_only`` only records that name their kind are held back: ``log.warning(...,
    extra={"repeat": "ops:bad_line"})``; the rest pass untouched. For a gateway's own logger,
    where a peer can make a few kinds of line at full speed (issue 21, item 4: 100k unparsable
    IRC lines were 77 MB of WARNING lines) but every other line must pass.
    """

    #: kinds remembered at once; more are forgotten together (a flood has few kinds)
    MAX_KINDS = 256

    def __init__(self, interval: float = 10.0, *, marked_only: bool = False) -> None:
        super().__init__()
        self.interval = interval
        self.marked_only = marked_only
        self._kinds: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        mark = getattr(record, "repeat", None)
        if mark is not None:
            key = (record.name, str(mark))
        elif self.marked_only:
            return True
        else:
            key = (record.name, str(record.msg).partition("\n")[0][:200])
        now = time.monotonic()
        seen = self._kinds.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        held = 0 if seen is None else int(seen[1])
        if len(self._kinds) >= self.MAX_KINDS:
            self._kinds.clear()
        self._kinds[key] = [now, 0]
        if held:
            record.msg = f"{record.getMessage()} ({held} more like this not logged)"
            record.args = None
        return True


class RedactingFormatter(logging.Formatter):
    """Formats as usual (UTC times), then redacts the whole line (message, arguments, traceback).

    Usable from Django's ``LOGGING``: ``{"()": "core.logs.RedactingFormatter"}``.
    """

    converter = time.gmtime  # type: ignore[assignment]  # typeshed wants the optional arg

    def __init__(self, fmt: str | None = LINE_FORMAT, datefmt: str | None = DATE_FORMAT) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        if len(line) > MAX_LINE:
            # redacted first, so the cut cannot leave half a secret in the line
            line = f"{line[:MAX_LINE]}… ({len(line) - MAX_LINE} more characters cut)"
        return line


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
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, RepeatFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(RepeatFilter())
    # aiosmtpd logs every SMTP line at INFO under "mail.log"; one line per mail is ours to write
    logging.getLogger("mail.log").setLevel(logging.WARNING)
