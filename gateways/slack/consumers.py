"""Django-side helpers for the Slack gateway: typed commands, checked before they leave, and a
generic consumer that answers in one call.

    from gateways.slack.consumers import SlackConsumer

    class TeamConsumer(SlackConsumer):
        async def slack_mention(self, message):
            await self.reply("On it!", thread=True)     # slack.send in the mention's thread
            await self.react("eyes")

        async def slack_command(self, message):
            await self.open_view(TICKET_MODAL)          # slack.views_open with its trigger_id

        async def slack_view_submission(self, message):
            if not valid(message["values"]):
                await self.ack_with(errors={"ticket": "Not a ticket number"})  # in the ack

Builders (``slack_send``, ``slack_update``, ``slack_delete``, ``slack_react``, ``slack_respond``,
``slack_views_open`` … ``slack_ack``) return the command dict and raise
:class:`core.consumers.InvalidCommand` for anything the gateway would refuse (no text nor
blocks, a ``ts`` that is not one, 51 blocks, a modal without a title …), using the gateway's own
parsers (``translate.parse_*``). Whether a ``response_url`` starts with the gateway's
``slack.response_url_prefix`` is the gateway's check. :class:`SlackCommands` sends them;
``wait=True`` returns the ``slack.result`` (``channel``, ``ts`` of the message). Every command
may name its workspace (``team``, ``enterprise``): :class:`SlackConsumer` copies them from the
event it answers, which an app installed in several workspaces (``slack.oauth``) needs. The
keys are those of ``gateways/slack/README.md``; the guide is ``docs/consumers.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from core.consumers import (
    CommandId,
    Commands,
    GatewayConsumer,
    InvalidCommand,
    Message,
    Validator,
    command,
)
from gateways.slack.translate import (
    ANSWERABLE,
    parse_ack,
    parse_delete,
    parse_function_complete,
    parse_function_fail,
    parse_react,
    parse_respond,
    parse_route,
    parse_send,
    parse_update,
    parse_views_open,
    parse_views_publish,
    parse_views_push,
    parse_views_update,
)

__all__ = [
    "VALIDATORS",
    "SlackCommands",
    "SlackConsumer",
    "slack_ack",
    "slack_delete",
    "slack_function_complete",
    "slack_function_fail",
    "slack_react",
    "slack_respond",
    "slack_send",
    "slack_update",
    "slack_views_open",
    "slack_views_publish",
    "slack_views_push",
    "slack_views_update",
]

ResponseType = Literal["ephemeral", "in_channel"]
ResponseAction = Literal["errors", "update", "push", "clear"]
Blocks = Sequence[Mapping[str, Any]]
View = Mapping[str, Any]
#: interactivity events that carry a ``response_url`` to answer through (``reply()``)
_RESPONDABLE = frozenset(
    {
        "slack.command",
        "slack.action",
        "slack.block_actions",
        "slack.message_action",
        "slack.shortcut",
        "slack.view_submission",
    }
)


def _routed(parse: Callable[[Mapping[str, Any]], object]) -> Validator:
    """The gateway's parser, after its check of the command's workspace (``team`` …)."""

    def check(body: Mapping[str, Any]) -> object:
        parse_route(body)
        return parse(body)

    return check


#: every command the Slack gateway takes, with the gateway's own check of its keys
VALIDATORS: dict[str, Validator] = {
    "slack.send": _routed(parse_send),
    "slack.update": _routed(parse_update),
    "slack.delete": _routed(parse_delete),
    "slack.react": _routed(parse_react),
    # any http(s) URL here: the gateway checks it against its own slack.response_url_prefix
    "slack.respond": lambda body: parse_respond(body, "http"),
    "slack.views_open": _routed(parse_views_open),
    "slack.views_push": _routed(parse_views_push),
    "slack.views_update": _routed(parse_views_update),
    "slack.views_publish": _routed(parse_views_publish),
    "slack.function_complete": _routed(parse_function_complete),
    "slack.function_fail": _routed(parse_function_fail),
    # to an event's ack_channel; the gateway also checks it against that event's type
    "slack.ack": parse_ack,
}


def _checked(type_: str, id: CommandId | None, result_channel: str | None, **keys: Any) -> Message:
    return SlackCommands.check(command(type_, id=id, result_channel=result_channel, **keys))


def _blocks(blocks: Blocks | None) -> list[dict[str, Any]] | None:
    return None if blocks is None else [dict(b) for b in blocks]


def _view(view: View | None) -> dict[str, Any] | None:
    return None if view is None else dict(view)


def slack_send(
    channel: str,
    text: str | None = None,
    *,
    blocks: Blocks | None = None,
    thread_ts: str | None = None,
    reply_broadcast: bool | None = None,
    team: str | None = None,
    enterprise: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.send`` (chat.postMessage): ``text`` and/or ``blocks`` to a channel id, in the
    thread of ``thread_ts`` if given."""
    return _checked(
        "slack.send",
        id,
        result_channel,
        channel=channel,
        text=text,
        blocks=_blocks(blocks),
        thread_ts=thread_ts,
        reply_broadcast=reply_broadcast,
        team=team,
        enterprise=enterprise,
    )


def slack_update(
    channel: str,
    ts: str,
    text: str | None = None,
    *,
    blocks: Blocks | None = None,
    team: str | None = None,
    enterprise: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.update`` (chat.update): new ``text`` and/or ``blocks`` for the message ``ts``."""
    return _checked(
        "slack.update",
        id,
        result_channel,
        channel=channel,
        ts=ts,
        text=text,
        blocks=_blocks(blocks),
        team=team,
        enterprise=enterprise,
    )


def slack_delete(
    channel: str,
    ts: str,
    *,
    team: str | None = None,
    enterprise: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.delete`` (chat.delete) of the message ``ts``."""
    return _checked(
        "slack.delete",
        id,
        result_channel,
        channel=channel,
        ts=ts,
        team=team,
        enterprise=enterprise,
    )


def slack_react(
    channel: str,
    ts: str,
    name: str,
    *,
    remove: bool | None = None,
    team: str | None = None,
    enterprise: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.react``: add (``remove=True``: remove) the emoji ``name`` (``thumbsup``) on the
    message ``ts``."""
    return _checked(
        "slack.react",
        id,
        result_channel,
        channel=channel,
        ts=ts,
        name=name,
        remove=remove,
        team=team,
        enterprise=enterprise,
    )


def slack_respond(
    response_url: str,
    text: str | None = None,
    *,
    blocks: Blocks | None = None,
    response_type: ResponseType | None = None,
    replace_original: bool | None = None,
    delete_original: bool | None = None,
    thread_ts: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.respond``: answer a slash command or an action through its ``response_url``
    (Slack's default ``response_type`` is ``ephemeral``: only the person who asked sees it)."""
    return _checked(
        "slack.respond",
        id,
        result_channel,
        response_url=response_url,
        text=text,
        blocks=_blocks(blocks),
        response_type=response_type,
        replace_original=replace_original,
        delete_original=delete_original,
        thread_ts=thread_ts,
    )


def slack_views_open(
    view: View,
    *,
    trigger_id: str | None = None,
    interactivity_pointer: str | None = None,
    push: bool = False,
    team: str | None = None,
    enterprise: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.views_open`` (views.open) of a modal ``view`` for the user of ``trigger_id``
    (Slack takes it for 3 s after the interaction) or ``interactivity_pointer``;
    ``slack.views_push`` (on top of the open modal) with ``push=True``."""
    return _checked(
        "slack.views_push" if push else "slack.views_open",
        id,
        result_channel,
        view=_view(view),
        trigger_id=trigger_id,
        interactivity_pointer=interactivity_pointer,
        team=team,
        enterprise=enterprise,
    )


def slack_views_push(
    view: View,
    *,
    trigger_id: str | None = None,
    interactivity_pointer: str | None = None,
    team: str | None = None,
    enterprise: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.views_push`` (views.push): a modal ``view`` on the open one's stack (≤ 3)."""
    return slack_views_open(
        view,
        trigger_id=trigger_id,
        interactivity_pointer=interactivity_pointer,
        push=True,
        team=team,
        enterprise=enterprise,
        id=id,
        result_channel=result_channel,
    )


def slack_views_update(
    view: View,
    *,
    view_id: str | None = None,
    external_id: str | None = None,
    hash: str | None = None,
    team: str | None = None,
    enterprise: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.views_update`` (views.update): ``view`` replaces the view ``view_id`` (or
    ``external_id``); with ``hash`` Slack refuses it if the view changed meanwhile."""
    return _checked(
        "slack.views_update",
        id,
        result_channel,
        view=_view(view),
        view_id=view_id,
        external_id=external_id,
        hash=hash,
        team=team,
        enterprise=enterprise,
    )


def slack_views_publish(
    user_id: str,
    view: View,
    *,
    hash: str | None = None,
    team: str | None = None,
    enterprise: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.views_publish`` (views.publish): the App Home tab ``view`` of ``user_id``."""
    return _checked(
        "slack.views_publish",
        id,
        result_channel,
        user_id=user_id,
        view=_view(view),
        hash=hash,
        team=team,
        enterprise=enterprise,
    )


def slack_function_complete(
    function_execution_id: str,
    outputs: Mapping[str, Any],
    *,
    team: str | None = None,
    enterprise: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.function_complete`` (functions.completeSuccess): the workflow step
    ``function_execution_id`` succeeded with ``outputs``."""
    return _checked(
        "slack.function_complete",
        id,
        result_channel,
        function_execution_id=function_execution_id,
        outputs=dict(outputs),
        team=team,
        enterprise=enterprise,
    )


def slack_function_fail(
    function_execution_id: str,
    error: str,
    *,
    team: str | None = None,
    enterprise: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.function_fail`` (functions.completeError): the step failed; ``error`` is shown
    to the user."""
    return _checked(
        "slack.function_fail",
        id,
        result_channel,
        function_execution_id=function_execution_id,
        error=error,
        team=team,
        enterprise=enterprise,
    )


def slack_ack(
    *,
    response_action: ResponseAction | None = None,
    errors: Mapping[str, str] | None = None,
    view: View | None = None,
    options: Sequence[Mapping[str, Any]] | None = None,
    option_groups: Sequence[Mapping[str, Any]] | None = None,
    text: str | None = None,
    blocks: Blocks | None = None,
    response_type: ResponseType | None = None,
    event: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.ack``: the answer inside the acknowledgement of one event (send it to the
    event's ``ack_channel``). With ``errors`` and no ``response_action`` it is ``errors``.

    * a ``slack.view_submission``: ``response_action`` ``errors`` (``errors``: block_id → text),
      ``update`` / ``push`` (a modal ``view``), ``clear``;
    * a ``slack.options``: ``options`` or ``option_groups``;
    * a ``slack.command``: ``text`` / ``blocks``, ``response_type``;
    * no answer at all: an empty acknowledgement, at once.

    ``event`` (its type) checks that the answer fits it.
    """
    if errors is not None and response_action is None:
        response_action = "errors"
    message = command(
        "slack.ack",
        id=id,
        result_channel=result_channel,
        response_action=response_action,
        errors=dict(errors) if errors is not None else None,
        view=_view(view),
        options=[dict(o) for o in options] if options is not None else None,
        option_groups=[dict(g) for g in option_groups] if option_groups is not None else None,
        text=text,
        blocks=_blocks(blocks),
        response_type=response_type,
    )
    checked = SlackCommands.check(message)
    if event is not None:
        try:
            parse_ack({k: v for k, v in checked.items() if k != "type"}, event)
        except ValueError as exc:
            raise InvalidCommand(f"slack.ack: {exc}") from exc
    return checked


class SlackCommands(Commands):
    """Send Slack commands to one integration's command channel (``NAME.send``, every event's
    ``reply_channel``), or a ``slack.ack`` to an event's ``ack_channel``.

    ``team`` / ``enterprise``: the workspace every command goes to unless it names one (an app
    installed in several, ``slack.oauth``). Every method checks its command first
    (:class:`~core.consumers.InvalidCommand`, nothing sent) and returns ``None``, or with
    ``wait=True`` the ``slack.result`` (:class:`~core.consumers.CommandFailed` with Slack's own
    error code, e.g. ``channel_not_found``, :class:`~core.consumers.ResultTimeout` after
    ``timeout`` seconds).
    """

    protocol = "slack"
    validators = VALIDATORS

    def __init__(
        self,
        channel_layer: Any,
        channel: str,
        *,
        timeout: float | None = None,
        team: str | None = None,
        enterprise: str | None = None,
    ) -> None:
        if timeout is None:
            super().__init__(channel_layer, channel)
        else:
            super().__init__(channel_layer, channel, timeout=timeout)
        self.team = team
        self.enterprise = enterprise

    async def submit(
        self, message: Mapping[str, Any], *, wait: bool = False, timeout: float | None = None
    ) -> Message | None:
        """:meth:`Commands.submit`, the command given this sender's workspace unless it names
        one (``slack.respond`` and ``slack.ack`` need none: they answer one event)."""
        routed = dict(message)
        if routed.get("type") not in ("slack.respond", "slack.ack") and not (
            routed.get("team") or routed.get("enterprise")
        ):
            if self.team is not None:
                routed["team"] = self.team
            if self.enterprise is not None:
                routed["enterprise"] = self.enterprise
        return await super().submit(routed, wait=wait, timeout=timeout)

    async def send(
        self,
        channel: str,
        text: str | None = None,
        *,
        blocks: Blocks | None = None,
        thread_ts: str | None = None,
        reply_broadcast: bool | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_send`; the result has ``channel`` and ``ts``."""
        message = slack_send(
            channel,
            text,
            blocks=blocks,
            thread_ts=thread_ts,
            reply_broadcast=reply_broadcast,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def update(
        self,
        channel: str,
        ts: str,
        text: str | None = None,
        *,
        blocks: Blocks | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_update`."""
        message = slack_update(
            channel, ts, text, blocks=blocks, id=id, result_channel=result_channel
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def delete(
        self,
        channel: str,
        ts: str,
        *,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_delete`."""
        message = slack_delete(channel, ts, id=id, result_channel=result_channel)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def react(
        self,
        channel: str,
        ts: str,
        name: str,
        *,
        remove: bool | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_react`."""
        message = slack_react(
            channel, ts, name, remove=remove, id=id, result_channel=result_channel
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def respond(
        self,
        response_url: str,
        text: str | None = None,
        *,
        blocks: Blocks | None = None,
        response_type: ResponseType | None = None,
        replace_original: bool | None = None,
        delete_original: bool | None = None,
        thread_ts: str | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_respond`."""
        message = slack_respond(
            response_url,
            text,
            blocks=blocks,
            response_type=response_type,
            replace_original=replace_original,
            delete_original=delete_original,
            thread_ts=thread_ts,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def views_open(
        self,
        view: View,
        *,
        trigger_id: str | None = None,
        interactivity_pointer: str | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_views_open`; the result has ``view_id`` and ``hash``."""
        message = slack_views_open(
            view,
            trigger_id=trigger_id,
            interactivity_pointer=interactivity_pointer,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def views_push(
        self,
        view: View,
        *,
        trigger_id: str | None = None,
        interactivity_pointer: str | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_views_push`."""
        message = slack_views_push(
            view,
            trigger_id=trigger_id,
            interactivity_pointer=interactivity_pointer,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def views_update(
        self,
        view: View,
        *,
        view_id: str | None = None,
        external_id: str | None = None,
        hash: str | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_views_update`."""
        message = slack_views_update(
            view,
            view_id=view_id,
            external_id=external_id,
            hash=hash,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def views_publish(
        self,
        user_id: str,
        view: View,
        *,
        hash: str | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_views_publish`."""
        message = slack_views_publish(
            user_id, view, hash=hash, id=id, result_channel=result_channel
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def function_complete(
        self,
        function_execution_id: str,
        outputs: Mapping[str, Any],
        *,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_function_complete`."""
        message = slack_function_complete(
            function_execution_id, outputs, id=id, result_channel=result_channel
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def function_fail(
        self,
        function_execution_id: str,
        error: str,
        *,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_function_fail`."""
        message = slack_function_fail(
            function_execution_id, error, id=id, result_channel=result_channel
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def ack(
        self,
        *,
        response_action: ResponseAction | None = None,
        errors: Mapping[str, str] | None = None,
        view: View | None = None,
        options: Sequence[Mapping[str, Any]] | None = None,
        option_groups: Sequence[Mapping[str, Any]] | None = None,
        text: str | None = None,
        blocks: Blocks | None = None,
        response_type: ResponseType | None = None,
        event: str | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_ack`; this sender's channel must be the event's ``ack_channel``.
        ``wait=True`` returns once the gateway took the answer for the acknowledgement."""
        message = slack_ack(
            response_action=response_action,
            errors=errors,
            view=view,
            options=options,
            option_groups=option_groups,
            text=text,
            blocks=blocks,
            response_type=response_type,
            event=event,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(message, wait=wait, timeout=timeout)


class SlackConsumer(GatewayConsumer):
    """A consumer of Slack events (``slack_message``, ``slack_command`` … as in any consumer)
    that answers in one call: :meth:`reply`, :meth:`react`, :meth:`ack_with` (inside the
    acknowledgement), :meth:`open_view`, :meth:`publish_home`, :meth:`complete` /
    :meth:`fail`; :attr:`slack` sends any command, to the workspace of the current event."""

    commands_class = SlackCommands

    @property
    def slack(self) -> SlackCommands:
        """:class:`SlackCommands` to the integration (and workspace) the current event came
        from."""
        event = self.event or {}
        team, enterprise = event.get("team"), event.get("enterprise")
        return SlackCommands(
            self.channel_layer,
            self.reply_channel(),
            team=team if isinstance(team, str) else None,
            enterprise=enterprise if isinstance(enterprise, str) else None,
        )

    def commands(self) -> SlackCommands:
        return self.slack

    async def reply(
        self,
        text: str | None = None,
        *,
        blocks: Blocks | None = None,
        thread: bool = False,
        response_type: ResponseType | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """Answer the current event.

        A slash command or an interaction that carries a ``response_url`` is answered with
        ``slack.respond`` (``response_type``: ``ephemeral``, Slack's default, or
        ``in_channel``); anything else with ``slack.send`` to its channel, in its thread when it
        is in one, or starting one under it with ``thread=True``.
        """
        event = self.current("reply")
        url = event.get("response_url")
        if event.get("type") in _RESPONDABLE and isinstance(url, str):
            return await self.slack.respond(
                url,
                text,
                blocks=blocks,
                response_type=response_type,
                wait=wait,
                timeout=timeout,
            )
        channel = event.get("channel")
        if not isinstance(channel, str):
            raise InvalidCommand(f"nothing to answer in a {event.get('type')!r} event")
        thread_ts = event.get("thread_ts") or (event.get("ts") if thread else None)
        return await self.slack.send(
            channel, text, blocks=blocks, thread_ts=thread_ts, wait=wait, timeout=timeout
        )

    async def react(
        self,
        name: str,
        *,
        remove: bool | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """Add (``remove=True``: remove) the emoji ``name`` on the current event's message."""
        event = self.current("react")
        channel, ts = event.get("channel"), event.get("ts")
        if not isinstance(channel, str) or not isinstance(ts, str):
            raise InvalidCommand(f"a {event.get('type')!r} event has no message to react to")
        return await self.slack.react(channel, ts, name, remove=remove, wait=wait, timeout=timeout)

    async def ack_with(
        self,
        *,
        response_action: ResponseAction | None = None,
        errors: Mapping[str, str] | None = None,
        view: View | None = None,
        options: Sequence[Mapping[str, Any]] | None = None,
        option_groups: Sequence[Mapping[str, Any]] | None = None,
        text: str | None = None,
        blocks: Blocks | None = None,
        response_type: ResponseType | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """Answer the current event inside its acknowledgement (``slack.ack`` to its
        ``ack_channel``): ``errors={block_id: text}`` or ``response_action="update"`` … for a
        ``slack.view_submission``, ``options=[…]`` for a ``slack.options``, ``text=…`` for a
        ``slack.command``; nothing: acknowledge now, empty.

        The gateway waits ``slack.answers.timeout`` (2.5 s) from the event's arrival, then
        acknowledges without it: answer first, do slow work after. Raises
        :class:`~core.consumers.InvalidCommand` when the event has no ``ack_channel`` (its
        type is not in ``slack.answers.wait_for``, or Slack takes no answer for it).
        """
        event = self.current("ack_with")
        channel = event.get("ack_channel")
        type_ = str(event.get("type"))
        if not isinstance(channel, str) or not channel:
            if type_ in ANSWERABLE:
                why = f"add {type_} to slack.answers.wait_for, or this one could not wait"
            else:
                why = f"only {', '.join(sorted(ANSWERABLE))} can be answered there"
            raise InvalidCommand(f"a {type_!r} event has no ack_channel ({why})")
        sender = SlackCommands(self.channel_layer, channel)
        return await sender.ack(
            response_action=response_action,
            errors=errors,
            view=view,
            options=options,
            option_groups=option_groups,
            text=text,
            blocks=blocks,
            response_type=response_type,
            event=type_,
            wait=wait,
            timeout=timeout,
        )

    def _trigger(self, what: str) -> str:
        trigger = self.current(what).get("trigger_id")
        if not isinstance(trigger, str):
            event_type = self.current(what).get("type")
            raise InvalidCommand(f"a {event_type!r} event has no trigger_id to open a view with")
        return trigger

    async def open_view(
        self,
        view: View,
        *,
        push: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """Open the modal ``view`` for the user of the current event (its ``trigger_id``,
        good for 3 s after the interaction: open first, do slow work after); ``push=True``
        pushes it onto the open modal's stack instead."""
        trigger = self._trigger("open_view")
        if push:
            return await self.slack.views_push(view, trigger_id=trigger, wait=wait, timeout=timeout)
        return await self.slack.views_open(view, trigger_id=trigger, wait=wait, timeout=timeout)

    async def update_view(
        self,
        view: View,
        *,
        hash: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """Replace the view the current event came from (its ``view_id``)."""
        event = self.current("update_view")
        view_id = event.get("view_id")
        if not isinstance(view_id, str):
            raise InvalidCommand(f"a {event.get('type')!r} event comes from no view")
        return await self.slack.views_update(
            view, view_id=view_id, hash=hash, wait=wait, timeout=timeout
        )

    async def publish_home(
        self,
        view: View,
        *,
        user: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """Publish the App Home tab ``view`` of ``user`` (default: the current event's)."""
        user = user or self.current("publish_home").get("user")
        if not isinstance(user, str):
            raise InvalidCommand("publish_home() needs a user: the current event names none")
        return await self.slack.views_publish(user, view, wait=wait, timeout=timeout)

    def _execution(self, what: str) -> str:
        event = self.current(what)
        execution = event.get("function_execution_id")
        if not isinstance(execution, str):
            raise InvalidCommand(f"a {event.get('type')!r} event is no workflow step")
        return execution

    async def complete(
        self, outputs: Mapping[str, Any], *, wait: bool = False, timeout: float | None = None
    ) -> Message | None:
        """The current ``slack.function_executed`` step succeeded with ``outputs``."""
        execution = self._execution("complete")
        return await self.slack.function_complete(execution, outputs, wait=wait, timeout=timeout)

    async def fail(
        self, error: str, *, wait: bool = False, timeout: float | None = None
    ) -> Message | None:
        """The current ``slack.function_executed`` step failed (``error`` is shown)."""
        execution = self._execution("fail")
        return await self.slack.function_fail(execution, error, wait=wait, timeout=timeout)
