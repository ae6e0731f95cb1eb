"""ASGI entry point: a Channels application as the Channels tutorial writes it, plus the
gateways' consumers routed by channel name.

- ``"websocket"`` and ``"http"``: the chat (examples/rooms) behind ``AuthMiddlewareStack`` and
  Django's own views. Daphne or uvicorn serve them as they are; behind gateway-http-ws,
  ``manage.py runworker rooms`` hosts them for the paths ``web.yaml`` routes to ``rooms`` (no
  ``ChannelNameRouter`` entry claims that channel).
- ``"channel"``: the consumers of the gateways' own messages:
  ``python manage.py runworker support-mail sensors live echo ops-irc team-slack timers``
"""

import os

from channels.auth import AuthMiddlewareStack
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.core.asgi import get_asgi_application
from django.urls import re_path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example.settings")
django_asgi_app = get_asgi_application()

from chat.consumers import TicketBotConsumer  # noqa: E402 - needs the app registry
from live.consumers import LiveConsumer  # noqa: E402
from live.echo import EchoConsumer  # noqa: E402
from mail.consumers import MailConsumer  # noqa: E402
from rooms.consumers import PostMessageConsumer  # noqa: E402
from rooms.routing import websocket_urlpatterns  # noqa: E402
from sensors.consumers import SensorConsumer  # noqa: E402
from team.consumers import SlackTeamConsumer  # noqa: E402
from timers.consumers import TimerConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": URLRouter(
            [
                re_path(
                    r"^chat/(?P<room_name>\w+)/messages/$",
                    AuthMiddlewareStack(PostMessageConsumer.as_asgi()),
                ),
                re_path(r"", django_asgi_app),
            ]
        ),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
        "channel": ChannelNameRouter(
            {
                "support-mail": MailConsumer.as_asgi(),
                "sensors": SensorConsumer.as_asgi(),
                "live": LiveConsumer.as_asgi(),
                "echo": EchoConsumer.as_asgi(),
                "ops-irc": TicketBotConsumer.as_asgi(),
                "team-slack": SlackTeamConsumer.as_asgi(),
                "timers": TimerConsumer.as_asgi(),
            }
        ),
    }
)
