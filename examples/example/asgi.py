"""ASGI entry point: consumers are routed by channel name, as `runworker` expects.

python manage.py runworker support-mail sensors live echo ops-irc team-slack timers
"""

import os

from channels.routing import ChannelNameRouter, ProtocolTypeRouter
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example.settings")
django_asgi_app = get_asgi_application()

from chat.consumers import TicketBotConsumer  # noqa: E402 - needs the app registry
from live.consumers import LiveConsumer  # noqa: E402
from live.echo import EchoConsumer  # noqa: E402
from mail.consumers import MailConsumer  # noqa: E402
from sensors.consumers import SensorConsumer  # noqa: E402
from team.consumers import SlackTeamConsumer  # noqa: E402
from timers.consumers import TimerConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
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
