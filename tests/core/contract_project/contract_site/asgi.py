"""The channels routed to :class:`contract_site.consumers.ContractConsumer`."""

import os

import django
from channels.routing import ChannelNameRouter, ProtocolTypeRouter

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "contract_site.settings")
django.setup()

from contract_site.consumers import ContractConsumer  # noqa: E402 - needs the app registry

application = ProtocolTypeRouter(
    {
        "channel": ChannelNameRouter(
            {
                name: ContractConsumer.as_asgi()
                for name in os.environ.get("CONTRACT_CHANNELS", "jobs").split(",")
            }
        ),
    }
)
