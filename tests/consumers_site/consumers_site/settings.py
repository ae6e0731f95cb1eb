"""Settings of the consumer helpers' test site: no database, the layer from ``GATEWAYS_LAYER``."""

import os

from core.layers import channel_layer_settings

SECRET_KEY = "test-only"
USE_TZ = True
TIME_ZONE = "UTC"
# "gateways" first: its runworker (core.worker.ConsumerWorker) replaces channels' own
INSTALLED_APPS = ["gateways", "channels"]
ASGI_APPLICATION = "consumers_site.asgi.application"
CHANNEL_LAYERS = {"default": channel_layer_settings(os.environ["GATEWAYS_LAYER"])}
GATEWAYS_WORKER = {"DEAD_LETTER": "log"}
