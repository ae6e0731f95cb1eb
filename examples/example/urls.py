"""Plain Django views: served in-process by gateway-http-ws (``--app``) beside the bridged paths,
or, for ``/chat/*`` and ``/accounts/*`` (routed to the ``rooms`` channel in ``web.yaml``), by the
worker that hosts the application for the bridge; by Daphne, all of them."""

from django.http import HttpRequest, JsonResponse
from django.urls import path
from mail.models import Mail
from rooms import views as rooms
from sensors.models import Reading


async def status(request: HttpRequest) -> JsonResponse:
    """What the example has stored so far."""
    return JsonResponse(
        {"mails": await Mail.objects.acount(), "readings": await Reading.objects.acount()}
    )


urlpatterns = [
    path("status/", status),
    path("chat/", rooms.index),
    path("chat/<str:room_name>/", rooms.room),
    path("accounts/login/", rooms.login_view),
]
