"""Plain Django views, served in-process by gateway-http-ws (``--app``) beside the bridged paths."""

from django.http import HttpRequest, JsonResponse
from django.urls import path
from mail.models import Mail
from sensors.models import Reading


async def status(request: HttpRequest) -> JsonResponse:
    """What the example has stored so far."""
    return JsonResponse(
        {"mails": await Mail.objects.acount(), "readings": await Reading.objects.acount()}
    )


urlpatterns = [path("status/", status)]
