"""Django app config: makes ``manage.py rungateway`` available."""

from django.apps import AppConfig


class GatewaysConfig(AppConfig):
    name = "gateways"
    label = "channels_gateways"
    verbose_name = "Channels gateways"
