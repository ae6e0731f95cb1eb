"""The installation store: the app's installations (one per workspace or enterprise) and the
OAuth install flow's states, for ``slack.oauth`` (one process serving many workspaces).

With a Redis layer it is Redis keys beside the layer's own, reached through :mod:`core.redis`
(the layer's host and prefix), as the de-dup window is, so every replica and a restarted
gateway see the same installations:

    {prefix}:gateways:slack:{name}:installation:{enterprise or -}:{team or -}   JSON, no TTL
    {prefix}:gateways:slack:{name}:expiries          sorted set: installation key → token expiry
    {prefix}:gateways:slack:{name}:state:{state}     "1" for slack.oauth.state_ttl (single use)
    {prefix}:gateways:slack:{name}:refresh:{key}     a lock while one process refreshes a token

The JSON holds the bot token (and, with token rotation, the refresh token) in clear: whoever
can read that Redis can act as the app in those workspaces. Protect it as the tokens themselves
(a password, TLS with ``rediss://``, no shared database).

Any other layer (``memory://``, a custom one) keeps all of it in this process's memory: every
installation is lost when the process stops (each workspace must install the app again), and
replicas do not share them. The gateway says so in a WARNING at start; it is meant for trying
the install flow out, not for production.

Lookups follow Slack's two kinds of install: a workspace (``-:T…``, or ``E…:T…`` inside an
enterprise) and an org-wide one (``E…:-``), which serves every workspace of the enterprise.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from redis.exceptions import RedisError

from core.redis import LayerRedis, RedisUnavailable
from gateways.slack.translate import Installation, InvalidPayload, installation_key

__all__ = ["InstallationStore", "RedisInstallationStore", "RedisUnavailable", "candidates"]

#: OAuth states waiting for their redirect in memory at most (the oldest is forgotten first)
MAX_STATES = 10_000


def candidates(enterprise_id: str | None, team_id: str | None) -> list[str]:
    """The installation keys that may serve a workspace, the most specific first: the
    workspace's own install, then its enterprise's org-wide install."""
    keys = [installation_key(enterprise_id, team_id)]
    if enterprise_id is not None and team_id is not None:
        keys += [installation_key(enterprise_id, None), installation_key(None, team_id)]
    return keys


class InstallationStore:
    """In this process's memory (non-Redis layers; see the module docstring)."""

    description = "memory (installations are lost when the process stops)"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._installations: dict[str, Installation] = {}
        #: state → expiry on ``clock``; oldest first
        self._states: OrderedDict[str, float] = OrderedDict()
        self._locks: dict[str, float] = {}

    async def save(self, installation: Installation) -> None:
        self._installations[installation.key] = installation

    async def find(self, enterprise_id: str | None, team_id: str | None) -> Installation | None:
        for key in candidates(enterprise_id, team_id):
            found = self._installations.get(key)
            if found is not None:
                return found
        return None

    async def delete(self, enterprise_id: str | None, team_id: str | None) -> bool:
        """Forget the installation of exactly this workspace (or org); ``True`` if there was
        one."""
        return self._installations.pop(installation_key(enterprise_id, team_id), None) is not None

    async def due(self, before: float) -> list[Installation]:
        """Installations whose bot token expires before ``before`` (epoch seconds)."""
        return [
            i
            for i in self._installations.values()
            if i.bot_token_expires_at is not None and i.bot_token_expires_at < before
        ]

    async def issue_state(self, state: str, ttl: float) -> None:
        now = self.clock()
        while self._states:
            oldest, expires = next(iter(self._states.items()))
            if expires > now and len(self._states) < MAX_STATES:
                break
            del self._states[oldest]
        self._states[state] = now + ttl

    async def consume_state(self, state: str) -> bool:
        """``True`` once for a state issued less than its ``ttl`` ago; ``False`` after."""
        expires = self._states.pop(state, None)
        return expires is not None and expires > self.clock()

    async def lock(self, key: str, ttl: float) -> bool:
        """Take the refresh lock of installation ``key`` for ``ttl`` s; ``False``: it is held."""
        now = self.clock()
        if self._locks.get(key, 0.0) > now:
            return False
        self._locks[key] = now + ttl
        return True

    async def unlock(self, key: str) -> None:
        self._locks.pop(key, None)

    async def close(self) -> None:
        return None


class RedisInstallationStore(InstallationStore):
    """Redis keys beside a Redis layer (:mod:`core.redis`); errors are
    :class:`~core.redis.RedisUnavailable`."""

    def __init__(self, redis: LayerRedis) -> None:
        super().__init__()
        self.redis = redis
        self.description = f"Redis keys {redis.key('installation:')}*"
        self._save = redis.client.register_script(_SAVE)

    def _key(self, what: str) -> str:
        return self.redis.key(what)

    async def save(self, installation: Installation) -> None:
        # one script, not MULTI/EXEC: redis-py before 6 has no transactions on a Redis Cluster
        # (the two keys share the integration's hash tag there)
        key = installation.key
        expires = installation.bot_token_expires_at
        keys = [self._key(f"installation:{key}"), self._key("expiries")]
        args = [installation.to_json(), key, "" if expires is None else repr(float(expires))]
        try:
            await self._save(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise _unavailable("save", exc) from exc

    async def find(self, enterprise_id: str | None, team_id: str | None) -> Installation | None:
        keys = candidates(enterprise_id, team_id)
        found = await self.redis.call("mget", [self._key(f"installation:{k}") for k in keys])
        for text in found:
            if text is not None:
                try:
                    return Installation.from_json(text)
                except InvalidPayload as exc:
                    raise RedisUnavailable(f"a stored installation cannot be read: {exc}") from None
        return None

    async def delete(self, enterprise_id: str | None, team_id: str | None) -> bool:
        key = installation_key(enterprise_id, team_id)
        removed = await self.redis.call("delete", self._key(f"installation:{key}"))
        await self.redis.call("zrem", self._key("expiries"), key)
        return bool(removed)

    async def due(self, before: float) -> list[Installation]:
        keys = await self.redis.call("zrangebyscore", self._key("expiries"), "-inf", before)
        found = []
        for key in keys:
            name = key.decode() if isinstance(key, bytes) else str(key)
            text = await self.redis.call("get", self._key(f"installation:{name}"))
            if text is None:
                await self.redis.call("zrem", self._key("expiries"), name)  # deleted meanwhile
                continue
            try:
                found.append(Installation.from_json(text))
            except InvalidPayload:
                continue
        return found

    async def issue_state(self, state: str, ttl: float) -> None:
        await self.redis.call("set", self._key(f"state:{state}"), b"1", px=_ms(ttl))

    async def consume_state(self, state: str) -> bool:
        # DEL is atomic: of two redirects with the same state, only one removes it
        return bool(await self.redis.call("delete", self._key(f"state:{state}")))

    async def lock(self, key: str, ttl: float) -> bool:
        return bool(
            await self.redis.call("set", self._key(f"refresh:{key}"), b"1", nx=True, px=_ms(ttl))
        )

    async def unlock(self, key: str) -> None:
        await self.redis.call("delete", self._key(f"refresh:{key}"))

    async def close(self) -> None:
        await self.redis.close()


#: KEYS: the installation, the expiries; ARGV: its JSON, its key, its expiry or ""
_SAVE = """
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
else
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 1
"""


def _unavailable(method: str, exc: Exception) -> RedisUnavailable:
    text = str(exc) or type(exc).__name__
    return RedisUnavailable(f"installation store: {method}: {text}")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
