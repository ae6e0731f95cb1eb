"""The chat's pages, plain Django views: the room list, a room (the tutorial's page) and a login.

Served behind gateway-http-ws by the worker that hosts the ``rooms`` channel (``web.yaml`` routes
``/chat/*`` and ``/accounts/*`` there), or by Daphne; nothing here knows which.
"""

from django.contrib.auth import authenticate, login
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.middleware.csrf import get_token
from django.utils.html import escape, json_script
from django.utils.http import url_has_allowed_host_and_scheme

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title></head>
<body>
{body}
</body>
</html>
"""

ROOM = """{room_json}
<p id="who">connecting…</p>
<textarea id="chat-log" cols="100" rows="20" readonly></textarea><br>
<input id="chat-message-input" type="text" size="100"><br>
<input id="chat-message-submit" type="button" value="Send">
<script>
"use strict";
const roomName = JSON.parse(document.getElementById("room-name").textContent);
const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
const chatSocket = new WebSocket(scheme + window.location.host + "/ws/chat/" + roomName + "/");
const whoSocket = new WebSocket(scheme + window.location.host + "/ws/whoami/");

chatSocket.onmessage = function (e) {{
  const data = JSON.parse(e.data);
  document.querySelector("#chat-log").value += (data.message + "\\n");
}};
chatSocket.onopen = function () {{ document.body.dataset.chat = "open"; }};
chatSocket.onclose = function () {{ document.body.dataset.chat = "closed"; }};
whoSocket.onmessage = function (e) {{
  const data = JSON.parse(e.data);
  document.querySelector("#who").textContent =
    data.user ? "signed in as " + data.user : "not signed in";
}};

document.querySelector("#chat-message-input").focus();
document.querySelector("#chat-message-input").onkeyup = function (e) {{
  if (e.key === "Enter") document.querySelector("#chat-message-submit").click();
}};
document.querySelector("#chat-message-submit").onclick = function () {{
  const messageInputDom = document.querySelector("#chat-message-input");
  chatSocket.send(JSON.stringify({{"message": messageInputDom.value}}));
  messageInputDom.value = "";
}};
</script>"""

LOGIN = """<form method="post" action="/accounts/login/">
<input type="hidden" name="csrfmiddlewaretoken" value="{token}">
<input type="hidden" name="next" value="{next}">
<p>{error}</p>
<label>User <input name="username" id="username"></label>
<label>Password <input name="password" id="password" type="password"></label>
<button id="login">Sign in</button>
</form>"""


def index(request: HttpRequest) -> HttpResponse:
    body = """<h1>Chat rooms</h1>
<p>Room name: <input id="room-name-input" size="40"> <input id="room-name-submit" type="button"
value="Enter"></p>
<script>
document.querySelector("#room-name-submit").onclick = function () {
  window.location.pathname = "/chat/" + document.querySelector("#room-name-input").value + "/";
};
</script>"""
    return HttpResponse(PAGE.format(title="Chat rooms", body=body))


def room(request: HttpRequest, room_name: str) -> HttpResponse:
    body = ROOM.format(room_json=json_script(room_name, "room-name"))
    return HttpResponse(PAGE.format(title=f"Chat: {escape(room_name)}", body=body))


def login_view(request: HttpRequest) -> HttpResponse:
    target = request.POST.get("next") or request.GET.get("next") or "/chat/"
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        target = "/chat/"
    error = ""
    if request.method == "POST":
        user = authenticate(
            request,
            username=request.POST.get("username", ""),
            password=request.POST.get("password", ""),
        )
        if user is not None:
            login(request, user)
            return HttpResponseRedirect(target)
        error = "wrong user name or password"
    form = LOGIN.format(token=get_token(request), next=escape(target), error=error)
    return HttpResponse(PAGE.format(title="Sign in", body=form))
