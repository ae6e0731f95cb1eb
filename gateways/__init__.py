"""The gateways of channels-gateways, one package per transport.

Add ``"gateways"`` to ``INSTALLED_APPS`` for ``manage.py rungateway FILE…``.
"""

#: YAML ``gateway:`` value → the gateway class that serves it
REGISTRY = {
    "email": "gateways.email.gateway:EmailGateway",
    "irc": "gateways.irc.gateway:IrcGateway",
    "mqtt": "gateways.mqtt.gateway:MqttGateway",
}

__all__ = ["REGISTRY"]
