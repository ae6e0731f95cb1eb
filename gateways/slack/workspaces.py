"""Which bot token serves which workspace, and how an app gets installed: ``slack.oauth``.

:class:`Workspaces` is the gateway's one answer to "which token does this command go out
with" (:meth:`Workspaces.token`): the configured ``bot_token`` for one workspace, else the
installation of the workspace the command names (``team``, ``enterprise``), from the
installation store (:mod:`gateways.slack.installations`), read again after
:data:`INSTALLATION_CACHE` seconds.

**The install flow** (Slack's OAuth v2, on the gateway's HTTP listener):

1. ``GET {install_path}``: a fresh state (32 random bytes) is stored for ``state_ttl`` seconds
   and set as the cookie :data:`STATE_COOKIE`; the browser is sent to Slack's authorize page
   with the client id, the bot scopes, the state and ``redirect_uri``.
2. ``GET {redirect_path}?code=…&state=…``: the state must be one the store issued, not used
   before (it is deleted as it is checked: single use) and not expired, and it must equal the
   cookie (the browser that started the install finishes it: no one can slip a victim their
   own install link). Then ``oauth.v2.access`` exchanges the code (client id and secret as
   HTTP Basic), ``auth.test`` with the new token gives the bot id, and the installation is
   stored. The browser gets a short page, or goes to ``success_url`` / ``failure_url``.

**Token rotation**: an installation whose bot token expires (the app enabled rotation) is
refreshed with ``oauth.v2.access`` ``grant_type=refresh_token`` once less than
``refresh_before`` seconds are left: before a command uses it, and by a background check that
finds expiring ones in the store (so an idle workspace's token is renewed too). Slack revokes a
refresh token when it is used, so one process at a time refreshes an installation (a lock in
the store, :data:`REFRESH_LOCK`); another that needs it meanwhile waits for the new token.

``app_uninstalled`` and ``tokens_revoked`` (of the bot token) remove the installation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode

from prometheus_client import Counter

from core.envelope import CommandError
from core.metrics import REGISTRY
from core.redis import RedisUnavailable
from gateways.slack.config import SlackConfig
from gateways.slack.connection import (
    HttpAnswer,
    OAuthRequest,
    SlackApiFailed,
    SlackUnreachable,
    SlackWebApi,
)
from gateways.slack.dedup import TtlMemory
from gateways.slack.installations import InstallationStore, RedisInstallationStore
from gateways.slack.translate import (
    Installation,
    InvalidPayload,
    Route,
    authorize_url,
    installation_from_oauth,
    installation_key,
    refreshed,
)

if TYPE_CHECKING:
    from core.service import Gateway

__all__ = ["STATE_COOKIE", "Workspaces"]

#: seconds an installation read from the store is used before it is read again
INSTALLATION_CACHE: Final = 30.0
MAX_CACHED_INSTALLATIONS: Final = 10_000
#: seconds a refresh lock in the store is held at most; how long others wait for its outcome
REFRESH_LOCK: Final = 30.0
REFRESH_WAIT: Final = 5.0
#: the cookie that binds an install's state to the browser that started it
STATE_COOKIE: Final = "slack-app-oauth-state"

_INSTALLS = Counter(
    "gateway_slack_installs",
    "OAuth installs by outcome (ok, failed)",
    ["gateway", "outcome"],
    registry=REGISTRY,
)
_REFRESHES = Counter(
    "gateway_slack_token_refreshes",
    "Token rotation refreshes by outcome (ok, failed)",
    ["gateway", "outcome"],
    registry=REGISTRY,
)


class Workspaces:
    """Tokens per workspace, the install flow and token rotation (see the module docstring)."""

    def __init__(
        self,
        gateway: Gateway[Any],
        settings: SlackConfig,
        api: SlackWebApi,
        store: InstallationStore | None,
        identity: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.gateway = gateway
        self.name = gateway.name
        self.log = gateway.log
        self.settings = settings
        self.oauth = settings.oauth
        self.api = api
        self.store = store
        #: auth.test's answer with one workspace (the gateway's, as it is now)
        self.identity = identity
        self._cache = TtlMemory(INSTALLATION_CACHE, MAX_CACHED_INSTALLATIONS)
        self._refreshing: dict[str, asyncio.Lock] = {}

    @property
    def description(self) -> str:
        return self.store.description if self.store is not None else "none (one workspace)"

    @property
    def durable(self) -> bool:
        return isinstance(self.store, RedisInstallationStore)

    # -- tokens -------------------------------------------------------------------------------

    async def token(self, route: Route) -> str | None:
        """The bot token for a workspace: ``None`` (the configured ``bot_token``) with one
        workspace; the installation's with ``slack.oauth`` (:class:`CommandError` if none)."""
        enterprise, team = route
        if self.oauth is None:
            ours = self.identity().get("team_id")
            if team is not None and ours is not None and team != ours and enterprise is None:
                raise CommandError(
                    f"team {team} is not the workspace of this app's bot token ({ours}); "
                    "several workspaces need slack.oauth"
                )
            return None
        if enterprise is None and team is None:
            raise CommandError(
                "'team' is required: this app serves several workspaces (slack.oauth); "
                "the helpers copy it from the event being answered"
            )
        return (await self.installation(enterprise, team)).bot_token

    async def installation(self, enterprise: str | None, team: str | None) -> Installation:
        """The installation serving a workspace, its token refreshed when it expires soon."""
        assert self.store is not None and self.oauth is not None
        cache_key = installation_key(enterprise, team)
        found: Installation | None = self._cache.get(cache_key)
        if found is None:
            try:
                found = await self.store.find(enterprise, team)
            except RedisUnavailable as exc:
                self.gateway.metrics.error("installation_store")
                raise CommandError(f"installation store unavailable: {exc}") from None
            if found is None:
                raise CommandError(f"not installed in workspace {team or enterprise}")
            self._cache.put(cache_key, found)
        left = found.expires_in(time.time())
        if left is not None and left < self.oauth.refresh_before:
            found = await self.refresh(found)
            self._cache.put(cache_key, found)
        return found

    async def refresh(self, installation: Installation) -> Installation:
        """Token rotation: a new bot token (and refresh token) for ``installation``, once;
        :class:`CommandError` only when it could not be refreshed and has expired."""
        assert self.store is not None and self.oauth is not None
        key = installation.key
        lock = self._refreshing.setdefault(key, asyncio.Lock())
        async with lock:
            current = await self._reread(installation)
            left = current.expires_in(time.time())
            if left is None or left >= self.oauth.refresh_before:
                return current  # refreshed meanwhile
            try:
                locked = await self.store.lock(key, REFRESH_LOCK)
            except RedisUnavailable as exc:
                return self._refresh_failed(current, f"installation store: {exc}")
            if not locked:
                return await self._refreshed_elsewhere(current)
            try:
                return await self._refresh_now(current)
            finally:
                with contextlib.suppress(RedisUnavailable):  # else it expires (REFRESH_LOCK)
                    await self.store.unlock(key)

    async def _reread(self, installation: Installation) -> Installation:
        assert self.store is not None
        try:
            found = await self.store.find(installation.enterprise_id, _team(installation))
        except RedisUnavailable:
            return installation
        return found or installation

    async def _refresh_now(self, installation: Installation) -> Installation:
        assert self.store is not None and self.oauth is not None
        if not installation.bot_refresh_token:
            return self._refresh_failed(installation, "no refresh token stored")
        try:
            answer = await self.api.oauth_access(
                self.oauth.client_id,
                self.oauth.client_secret.get_secret_value(),
                grant_type="refresh_token",
                refresh_token=installation.bot_refresh_token,
            )
            fresh = refreshed(installation, answer, time.time())
            await self.store.save(fresh)
        except (SlackApiFailed, SlackUnreachable, InvalidPayload, RedisUnavailable) as exc:
            problem = exc.error if isinstance(exc, SlackApiFailed) else str(exc)
            return self._refresh_failed(installation, problem)
        self._forget(installation)
        _REFRESHES.labels(self.name, "ok").inc()
        self.log.info(
            "%s: bot token of %s refreshed (token rotation); the new one expires in %.0f s",
            self.name,
            installation.key,
            fresh.expires_in(time.time()) or 0.0,
        )
        return fresh

    def _refresh_failed(self, installation: Installation, problem: str) -> Installation:
        _REFRESHES.labels(self.name, "failed").inc()
        self.gateway.metrics.error("token_refresh")
        left = installation.expires_in(time.time())
        expired = left is not None and left <= 0
        self.log.error(
            "%s: could not refresh the bot token of %s: %s (%s)",
            self.name,
            installation.key,
            problem,
            "expired" if expired else f"{left or 0:.0f} s left",
        )
        if expired:
            raise CommandError(f"token_expired (refresh failed: {problem})")
        return installation

    async def _refreshed_elsewhere(self, installation: Installation) -> Installation:
        """Another process holds the refresh lock: wait for its new token a moment."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REFRESH_WAIT
        while loop.time() < deadline:
            await asyncio.sleep(0.1)
            current = await self._reread(installation)
            if current.bot_token != installation.bot_token:
                return current
        left = installation.expires_in(time.time())
        if left is not None and left <= 0:
            raise CommandError("token_expired (another process is refreshing it)")
        return installation

    async def refresh_in_background(self) -> None:
        """Refresh tokens that expire within ``refresh_before``, also those nobody uses now."""
        assert self.store is not None and self.oauth is not None
        interval = min(60.0, self.oauth.refresh_before / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                due = await self.store.due(time.time() + self.oauth.refresh_before)
            except RedisUnavailable as exc:
                self.log.warning("%s: token rotation check skipped: %s", self.name, exc)
                continue
            for installation in due:
                with contextlib.suppress(CommandError):  # logged and counted
                    await self.refresh(installation)

    def _forget(self, installation: Installation) -> None:
        self._cache.forget(lambda found: found.key == installation.key)

    async def uninstalled(self, keys: Mapping[str, Any]) -> None:
        """``app_uninstalled`` / ``tokens_revoked`` (bot tokens): forget the installation."""
        kind = keys.get("event_type")
        event = keys.get("event")
        if kind == "tokens_revoked":
            tokens = event.get("tokens") if isinstance(event, dict) else None
            if not isinstance(tokens, dict) or not tokens.get("bot"):
                return  # user tokens only: the installation's bot token still works
        enterprise, team = keys.get("enterprise"), keys.get("team")
        if self.store is None:
            self.log.warning("%s: Slack says %s for workspace %s", self.name, kind, team)
            return
        try:
            found = await self.store.find(enterprise, team)
            if found is not None:
                await self.store.delete(found.enterprise_id, _team(found))
                self._forget(found)
        except RedisUnavailable as exc:
            self.log.error("%s: could not remove the installation of %s: %s", self.name, team, exc)
            return
        if found is not None:
            self.log.info("%s: %s: installation %s removed", self.name, kind, found.key)

    # -- the install flow ---------------------------------------------------------------------

    async def oauth_request(self, request: OAuthRequest) -> HttpAnswer:
        """GET install path → Slack's authorize page; GET redirect path → the installation."""
        oauth, store = self.oauth, self.store
        assert oauth is not None and store is not None
        if request.path != oauth.install_path:
            return await self._redirected(request)
        state = secrets.token_urlsafe(32)
        try:
            await store.issue_state(state, oauth.state_ttl)
        except RedisUnavailable as exc:
            self.log.error("%s: install not started: %s", self.name, exc)
            return _page(503, "Installation unavailable", "Please try again in a moment.")
        url = authorize_url(
            oauth.authorize_url, oauth.client_id, oauth.scopes, state, oauth.redirect_uri
        )
        return HttpAnswer(302, location=url, cookies={STATE_COOKIE: state})

    async def _redirected(self, request: OAuthRequest) -> HttpAnswer:
        oauth, store = self.oauth, self.store
        assert oauth is not None and store is not None
        query = request.query
        state = query.get("state") or ""
        try:
            fresh = bool(state) and await store.consume_state(state)
        except RedisUnavailable as exc:
            self.log.error("%s: install not finished: %s", self.name, exc)
            return self._failed("store_unavailable", 503)
        if not fresh:
            return self._failed("invalid_state", 400)
        cookie = request.cookies.get(STATE_COOKIE, "")
        if not hmac.compare_digest(cookie.encode(), state.encode()):
            # a state issued to another browser: someone else's install link (CSRF)
            return self._failed("invalid_browser", 400)
        if query.get("error"):
            return self._failed(_word(query["error"]), 400)
        code = query.get("code")
        if not code:
            return self._failed("missing_code", 400)
        args = {"code": code}
        if oauth.redirect_uri is not None:
            args["redirect_uri"] = oauth.redirect_uri
        try:
            answer = await self.api.oauth_access(
                oauth.client_id, oauth.client_secret.get_secret_value(), **args
            )
            installation = installation_from_oauth(answer, time.time())
        except SlackApiFailed as exc:
            return self._failed(_word(exc.error), 400)
        except (SlackUnreachable, InvalidPayload) as exc:
            self.log.error("%s: install not finished: %s", self.name, exc)
            return self._failed(
                "slack_unreachable" if isinstance(exc, SlackUnreachable) else "invalid_answer", 502
            )
        try:
            identity = await self.api.call("auth.test", token=installation.bot_token)
        except (SlackApiFailed, SlackUnreachable) as exc:
            self.log.warning("%s: auth.test of a new installation failed: %s", self.name, exc)
        else:
            bot_id = identity.get("bot_id")
            installation = replace(installation, bot_id=bot_id if isinstance(bot_id, str) else None)
        try:
            await store.save(installation)
        except RedisUnavailable as exc:
            self.log.error("%s: install not finished: %s", self.name, exc)
            return self._failed("store_unavailable", 503)
        self._forget(installation)
        _INSTALLS.labels(self.name, "ok").inc()
        left = installation.expires_in(time.time())
        self.log.info(
            "%s: installed in %s (%s) by %s; %s",
            self.name,
            installation.key,
            installation.team_name or installation.enterprise_name,
            installation.installer_user_id,
            "no token rotation" if left is None else f"token rotation: expires in {left:.0f} s",
        )
        if oauth.success_url is not None:
            return HttpAnswer(302, location=oauth.success_url, cookies={STATE_COOKIE: ""})
        where = installation.team_name or installation.enterprise_name or "your workspace"
        page = _page(200, "Installed", f"The app is installed in {where}. You can close this.")
        return replace(page, cookies={STATE_COOKIE: ""})

    def _failed(self, reason: str, status: int) -> HttpAnswer:
        _INSTALLS.labels(self.name, "failed").inc()
        self.log.warning("%s: an install failed: %s", self.name, reason)
        assert self.oauth is not None
        if self.oauth.failure_url is not None:
            separator = "&" if "?" in self.oauth.failure_url else "?"
            location = f"{self.oauth.failure_url}{separator}{urlencode({'error': reason})}"
            return HttpAnswer(302, location=location, cookies={STATE_COOKIE: ""})
        page = _page(
            status,
            "Installation failed",
            f"The app was not installed ({reason}). Start again at {self.oauth.install_path}.",
        )
        return replace(page, cookies={STATE_COOKIE: ""})

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()


def _team(installation: Installation) -> str | None:
    """The team part of an installation's key (none for an org-wide install)."""
    return None if installation.is_enterprise_install else installation.team_id


def _word(text: str) -> str:
    """An error code from a query string or Slack, safe to show and log (no markup, short)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "", text)[:64] or "unknown"


def _page(status: int, title: str, text: str) -> HttpAnswer:
    body = (
        "<!DOCTYPE html><html><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    )
    return HttpAnswer(status, body)
