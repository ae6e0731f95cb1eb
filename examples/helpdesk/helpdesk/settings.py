"""Settings of the helpdesk (examples/helpdesk/README.md).

Environment:
- ``HELPDESK_LAYER``, else ``GATEWAYS_LAYER`` (what the gateways read): the layer path shared
  with the gateways (default ``memory://``: everything in one process, ``gateways run … --app``).
- ``HELPDESK_DB``: the SQLite file (default ``helpdesk.sqlite3`` beside manage.py).
- ``HELPDESK_ANNOUNCE``: where new tickets are announced, a comma-separated subset of
  ``irc,slack`` (default both; ``""`` for neither). A chat integration that does not run must
  not be named here: its commands would wait on its command channel for nobody.
- ``HELPDESK_IRC_CHANNEL`` (``#support``), ``HELPDESK_SLACK_CHANNEL`` (a channel id, default
  ``C0GENERAL``), ``HELPDESK_SUPPORT_ADDRESS`` (``support@example.com``: replies come from it),
  ``HELPDESK_DIGEST_ADDRESS`` (``team@example.com``: the digest goes there),
  ``HELPDESK_ALERT_THRESHOLD`` (``30``: a sensor reading above it opens a ticket).
"""

import os
from pathlib import Path

from core.layers import channel_layer_settings

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("HELPDESK_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"  # like the gateways' log lines

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    # before "channels": its runworker (bounded prefetch, survives Redis restarts, drains on
    # SIGTERM) replaces channels' own; it also adds manage.py rungateway
    "gateways",
    "channels",
    "helpdesk",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("HELPDESK_DB", str(BASE_DIR / "helpdesk.sqlite3")),
        "OPTIONS": {"timeout": 30},  # two workers share the file
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

ASGI_APPLICATION = "helpdesk.asgi.application"
LAYER = os.environ.get("HELPDESK_LAYER") or os.environ.get("GATEWAYS_LAYER") or "memory://"
CHANNEL_LAYERS = {"default": channel_layer_settings(LAYER)}

HELPDESK_ANNOUNCE = [
    name.strip()
    for name in os.environ.get("HELPDESK_ANNOUNCE", "irc,slack").split(",")
    if name.strip()
]
HELPDESK_IRC_CHANNEL = os.environ.get("HELPDESK_IRC_CHANNEL", "#support")
HELPDESK_SLACK_CHANNEL = os.environ.get("HELPDESK_SLACK_CHANNEL", "C0GENERAL")
HELPDESK_SUPPORT_ADDRESS = os.environ.get("HELPDESK_SUPPORT_ADDRESS", "support@example.com")
HELPDESK_DIGEST_ADDRESS = os.environ.get("HELPDESK_DIGEST_ADDRESS", "team@example.com")
HELPDESK_ALERT_THRESHOLD = float(os.environ.get("HELPDESK_ALERT_THRESHOLD", "30"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"line": {"()": "core.logs.RedactingFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "line"}},
    "root": {"handlers": ["console"], "level": os.environ.get("GATEWAYS_LOG_LEVEL", "INFO")},
}
