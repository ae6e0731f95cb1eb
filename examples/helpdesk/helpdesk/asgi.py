"""The helpdesk's ASGI application: one consumer per integration, routed by channel name.

``python manage.py runworker helpdesk-mail helpdesk-irc helpdesk-slack helpdesk-sensors
helpdesk-web helpdesk-timers`` runs them all; any subset runs in a worker of its own.
"""

import os

from channels.routing import ChannelNameRouter, ProtocolTypeRouter
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "helpdesk.settings")
get_asgi_application()  # loads the app registry before the consumers import models

from helpdesk.consumers import CHANNELS  # noqa: E402

application = ProtocolTypeRouter(
    {"channel": ChannelNameRouter({name: cls.as_asgi() for name, cls in CHANNELS.items()})}
)
