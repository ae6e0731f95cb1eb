"""The MQTT gateway: broker messages become ``mqtt.message``; consumers publish and subscribe.

The message spec is ``gateways/mqtt/README.md``.
"""
