"""A Redis lease: one process of several holds it, the others wait to take it over.

What needs a single holder among replicas (the scheduler's leader, the IRC gateway's active
connection) takes a :class:`RedisLease` beside its layer (:mod:`core.redis`, key
``{prefix}:gateways:{protocol}:{name}:lease``):

* **acquire**: one script sets the key with ``SET NX PX ttl`` to ``owner|token`` only when it
  is free; ``token`` comes from ``INCR`` on a second key (``fence``), so every acquisition has
  a new, larger **fencing token** (a holder's writes elsewhere can be checked against it).
* **renew**: ``PEXPIRE`` by a script that first checks the key still holds this
  ``owner|token``; a holder that was paused past its ``ttl`` (SIGSTOP, a VM migration) finds
  it gone or someone else's and must step down: :meth:`RedisLease.renew` answers ``False``.
* **release**: ``DEL`` by the same check, so a successor's lease is never removed; a holder
  that stops cleanly releases, and a standby takes over at its next try instead of after
  ``ttl``.

Nothing here sleeps: the caller's loop decides how often to try and renew (a third of ``ttl``
is what the scheduler and the IRC gateway use) and what to do when Redis cannot be reached
(:class:`core.redis.RedisUnavailable`): a holder that could not renew for a whole ``ttl`` must
assume another process has it. A process killed with ``kill -9`` keeps the lease until its
``ttl`` passes; that is the longest a standby waits.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any, Final

from core.redis import LayerRedis, RedisUnavailable

__all__ = ["ACQUIRE_SCRIPT", "RELEASE_SCRIPT", "RENEW_SCRIPT", "RedisLease", "owner_id"]

#: KEYS: lease, fence; ARGV: owner, ttl (ms) → the new token, or 0 when someone holds it
ACQUIRE_SCRIPT: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'NX', 'PX', ARGV[2])
return token
"""

#: KEYS: lease; ARGV: owner|token, ttl (ms) → 1 renewed, 0 not ours any more
RENEW_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

#: KEYS: lease; ARGV: owner|token → 1 released, 0 not ours
RELEASE_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def owner_id() -> str:
    """``host:pid:random``: names this process in the lease value, logs and /readyz."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class RedisLease:
    """The lease ``{redis prefix}lease`` (token counter ``fence``), held as ``owner``."""

    def __init__(self, redis: LayerRedis, owner: str, ttl: float) -> None:
        self.redis = redis
        self.owner = owner
        #: seconds the lease lives without a renewal
        self.ttl = ttl
        #: the fencing token while held, else ``None``
        self.token: int | None = None
        client = redis.client
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._renew = client.register_script(RENEW_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self.key = redis.key("lease")
        self._fence = redis.key("fence")

    @property
    def held(self) -> bool:
        return self.token is not None

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except Exception as exc:  # redis errors, timeouts, connection refused
            raise RedisUnavailable(
                f"Redis at {self.redis.description}: {type(exc).__name__}: {exc}"
            ) from exc

    async def acquire(self) -> int | None:
        """Take the lease if it is free: the new fencing token, or ``None`` (someone has it)."""
        token = int(
            await self._run(self._acquire, [self.key, self._fence], [self.owner, _ms(self.ttl)])
        )
        self.token = token or None
        return self.token

    async def renew(self) -> bool:
        """Extend the lease held; ``False`` (and no longer held) when it is not ours any more."""
        if self.token is None:
            return False
        value = f"{self.owner}|{self.token}"
        if await self._run(self._renew, [self.key], [value, _ms(self.ttl)]):
            return True
        self.token = None
        return False

    async def release(self) -> None:
        """Give the lease up (only if still ours) so a standby takes it at its next try."""
        token, self.token = self.token, None
        if token is not None:
            await self._run(self._release, [self.key], [f"{self.owner}|{token}"])

    def forget(self) -> None:
        """Stop considering the lease held (it could not be renewed in time)."""
        self.token = None

    async def holder(self) -> str | None:
        """Who holds the lease now (``owner``, without the token), or ``None``."""
        value = await self.redis.call("get", self.key)
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        return text.rpartition("|")[0]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
