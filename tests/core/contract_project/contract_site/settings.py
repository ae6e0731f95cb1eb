"""Settings; the environment says which layer (``CONTRACT_LAYER``), where handlings are recorded
(``CONTRACT_REDIS``, a ``redis://`` URL), the channels served (``CONTRACT_CHANNELS``, comma-
separated, default ``jobs``) and the database file (``CONTRACT_DB``)."""

import os

from core.layers import channel_layer_settings

SECRET_KEY = "contract-test-only"
USE_TZ = True
TIME_ZONE = "UTC"
# "gateways" before "channels": manage.py runworker is core.worker.ConsumerWorker
INSTALLED_APPS = ["gateways", "channels"]
ASGI_APPLICATION = "contract_site.asgi.application"
CHANNEL_LAYERS = {"default": channel_layer_settings(os.environ["CONTRACT_LAYER"])}
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("CONTRACT_DB", ":memory:"),
    }
}
GATEWAYS_WORKER = {"RETRY_MAX_DELAY": float(os.environ.get("CONTRACT_RETRY_MAX_DELAY", "30"))}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"line": {"()": "core.logs.RedactingFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "line"}},
    "root": {"handlers": ["console"], "level": "INFO"},
}
