"""The consumers, by the channel each integration sends to."""

import os

from channels.routing import ChannelNameRouter, ProtocolTypeRouter
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "consumers_site.settings")
get_asgi_application()

from consumers_site import consumers  # noqa: E402 - needs the app registry

application = ProtocolTypeRouter(
    {
        "channel": ChannelNameRouter(
            {
                "irc-bot": consumers.IrcBot.as_asgi(),
                "slack-bot": consumers.SlackBot.as_asgi(),
                "support": consumers.Support.as_asgi(),
                "mqtt-bot": consumers.Responder.as_asgi(),
                "timer-bot": consumers.Timer.as_asgi(),
                "chat": consumers.Chat.as_asgi(),
            }
        ),
    }
)
