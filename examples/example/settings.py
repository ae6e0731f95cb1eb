"""Settings of the example project.

Environment:
- ``EXAMPLE_LAYER``, else ``GATEWAYS_LAYER`` (what the gateways read): layer path shared with
  the gateways (default ``memory://``, which only works when everything runs in one process:
  ``gateways run … --app example.asgi:application``).
- ``EXAMPLE_DB``: SQLite file (default ``examples/example.sqlite3``).
"""

import os
from pathlib import Path

from core.layers import channel_layer_settings

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("EXAMPLE_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = os.environ.get("EXAMPLE_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")
ROOT_URLCONF = "example.urls"
USE_TZ = True
# UTC, like the gateways' log lines (Django's own default is America/Chicago, and it sets the
# process's local time zone from this)
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    # before "channels": its runworker (bounded prefetch, survives Redis restarts, drains on
    # SIGTERM) replaces channels' own; it also adds manage.py rungateway
    "gateways",
    "channels",
    "mail",
    "sensors",
    "live",
    "timers",
    "rooms",
]

# the chat's login (examples/rooms): a session cookie that AuthMiddlewareStack reads on sockets
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DB", str(BASE_DIR / "example.sqlite3")),
        # runworker and the test reader share the file
        "OPTIONS": {"timeout": 30},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

ASGI_APPLICATION = "example.asgi.application"
LAYER = os.environ.get("EXAMPLE_LAYER") or os.environ.get("GATEWAYS_LAYER") or "memory://"
CHANNEL_LAYERS = {"default": channel_layer_settings(LAYER)}

# the address replies come from; the relay in email.yaml decides where they go
SUPPORT_ADDRESS = os.environ.get("EXAMPLE_SUPPORT_ADDRESS", "support@example.com")
# where timers.consumers sends the daily digest of the support mail
DIGEST_ADDRESS = os.environ.get("EXAMPLE_DIGEST_ADDRESS", "team@example.com")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # the gateways' own format: UTC times, secrets redacted
    "formatters": {"line": {"()": "core.logs.RedactingFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "line"}},
    "root": {"handlers": ["console"], "level": os.environ.get("GATEWAYS_LOG_LEVEL", "INFO")},
}
