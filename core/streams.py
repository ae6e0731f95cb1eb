"""A channel layer on Redis Streams: batched round trips, acknowledged delivery, no silent expiry.

``redis+streams://host:6379/0`` layer paths resolve to :class:`StreamsChannelLayer`
(core/layers.py). It keeps the whole channel layer contract (``send``, ``receive``,
``new_channel``, groups, ``flush``, ``capacity`` and ``channel_capacity`` with ``ChannelFull``,
``!`` process-local channels, several hosts, Sentinel hosts) and changes how Redis is used.

What it promises (DESIGN §3, "The streams layer's contract"), and how:

* **A message stays in Redis until the handler that took it returned.** One stream per channel
  (``{prefix}:stream:{channel}``) with one consumer group (:data:`GROUP`); a fetch
  (``XREADGROUP``) puts entries in the group's pending-entry list (PEL), and only
  :meth:`StreamsChannelLayer.ack` (``XACK`` + ``XDEL``) removes them, so a stream's length is
  exactly what is waiting or in hand, and that is what ``capacity`` bounds.
  :meth:`StreamsChannelLayer.receive` acknowledges as it hands a message out (channels'
  at-most-once); :meth:`StreamsChannelLayer.receive_with_ack` leaves that to the caller
  (``core.worker.ConsumerWorker`` acknowledges after the handler returned).
* **A bad entry never blocks its fetch.** Every field of an entry is decoded inside one ``try``:
  an entry whose ``c`` field is not UTF-8 or whose ``m`` field is not a msgpack dict
  (``undecodable``), or whose ``c`` names a channel that does not belong to the stream
  (``foreign``), is logged once (ERROR), counted in ``gateway_layer_dropped_total{reason}`` and
  acknowledged; the rest of its fetch is delivered.
* **Prefetch does not age into a redelivery.** A fetch takes what the stream's receivers will
  use soon (:data:`PREFETCH_WINDOW` worth at the rate they took messages last, at least one per
  waiting receiver, at most ``batch``), and while fetched entries wait in this process — in the
  layer's buffers, or held by a caller between its receive and its handler
  (:meth:`StreamsChannelLayer.hold`, e.g. a worker's retry backoff) — a refresh resets their
  idle time in Redis (``XCLAIM … JUSTID``, which does not count as a delivery) every
  :attr:`StreamsChannelLayer.refresh_interval`, after checking in the same Lua script that this
  consumer still owns each one (an entry another consumer claimed meanwhile is dropped from
  here, never handed out twice). Entries inside a running handler are not refreshed: a handler
  that outlives ``redelivery_timeout`` is the one way to a duplicate.
* **Redelivery.** Entries pending longer than ``redelivery_timeout`` (their process died) are
  claimed (``XAUTOCLAIM``) by the next fetch of any consumer of the stream and delivered again
  with ``__delivery__`` (:data:`DELIVERY_KEY`) set: the number of times the message may have
  reached a handler, this time included (its first delivery counts as one; each later one counts
  when it is handed to a receiver, recorded in Redis before it is handed out, not when it is only
  fetched). When that number would pass ``max_deliveries`` the message is dead-lettered instead
  (``{channel}.dead``, ``gateways.dead_letter``, as ``ConsumerWorker`` does): a message whose
  handler kills its process does not crash-loop every worker for ever.
* **Lost data is reported.** Each host (each hash slot of a Redis Cluster, see below) keeps a
  marker key (``{prefix}:epoch``) that every write and every claim look at; a marker that
  vanished or changed under this process means the data there was lost (Redis restarted
  without persistence, ``FLUSHALL``, a failover to an empty replica), and a stream or
  consumer group that vanished under a reader that had used it means the same for that
  stream. Either is an ERROR line, ``gateway_layer_vanished_total{what}`` and a reason in
  :meth:`StreamsChannelLayer.health_problems` (for ``/readyz``) for :data:`PROBLEM_PERIOD`
  seconds.
* **group_send reaches every member.** Normal channels get an entry each; the process-local
  members (``name.CLIENT!xyz``) of one process share one entry on that process's stream, its
  ``c`` field naming them all, fanned out in the receiving process (as channels_redis does), so
  a room of 1,000 sockets on one process costs one entry, not 1,000 against one capacity. What
  still cannot be delivered (a full channel) is counted (``reason="group_full"``, one per
  member) and logged at WARNING.
* **Process-local channels** live and die with their process: their stream
  (``{prefix}:stream:name.CLIENT!``) is read by that layer instance only, with ``NOACK``, and each
  entry is deleted as it is fetched into the per-channel buffers (capped at the channel's
  capacity; what overflows is dropped, counted ``local_overflow`` and logged). Their capacity
  bounds what waits in Redis for the process; the stream expires ``local_expiry`` seconds after
  the last send or read (its process is gone).
* **One writer per host and event loop.** ``send``, ``group_send``, acks and group edits go on a
  queue; one task runs everything queued as *one* pipeline, the sends, group_sends (on a single
  host) and acks of a batch in one Lua script that checks each stream's length against its
  capacity before the ``XADD``, so ``ChannelFull`` is exact and each caller gets its own answer;
  without group edits in the batch that is one ``EVALSHA``, no pipeline.
  :meth:`StreamsChannelLayer.send_many` appends an ordered run in one round trip and stops at the
  first full channel (``core.service.Gateway.publish_many`` hands a backlog over that way).
* **Redis Cluster** (``redis+cluster://h1:p1,h2:p2/``, a host ``{"cluster": [urls]}``): every
  key of a channel has the channel's name as its hash tag (``{prefix}:stream:{channel}``,
  ``{prefix}:runs:{channel}``), and the marker above is kept per hash slot
  (``{prefix}:epoch:{tag}``, ``tag`` a string whose slot is the slot's), so every script reads
  and writes one slot. The writer makes one batch script call per slot (a pipeline, which
  redis-py's ``RedisCluster`` sends to each slot's master); ``send_many`` stops its runs at a
  slot change as it does at a host change; ``group_send`` reads the group, then sends to each
  member's stream (process-local members of one process still share one entry). The cluster
  client follows ``MOVED``/``ASK`` and retries connection errors, ``CLUSTERDOWN`` and
  ``TRYAGAIN``; what still fails reaches the caller as :class:`LayerUnavailable`, a Redis
  ``ConnectionError``: an outage to the gateways, never a bad message. Plain hosts keep their
  key names.
* **Durability across a failover** (``durability="replicated"``): after a batch with sends,
  ``WAIT 1 <durability_timeout>`` on the same connection (in a cluster, on each master that
  took sends); no replica confirmed in time, or the slot moved meanwhile → the sends of that
  batch raise :class:`NotReplicated` (an outage: a gateway pushes its transport back, which
  retries; a refused message may then be in Redis twice). Acknowledgements do not wait: a lost
  one is a redelivery. docs/redis.md compares what each Redis set-up loses.
* **Nothing expires in silence.** ``expiry`` defaults to ``None``; with ``expiry=N``, entries
  older than N s are trimmed at the next send to their stream or dropped at fetch, counted
  (``reason="expired"``) and logged. Pending entries deleted before their claim are counted
  ``deleted_pending``.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import msgpack
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer
from channels_redis.utils import decode_hosts
from prometheus_client import Counter
from redis import asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.crc import key_slot

from core.logs import describe_layer
from core.metrics import REGISTRY

__all__ = [
    "DELIVERY_KEY",
    "DURABILITY",
    "GROUP",
    "PROBLEM_PERIOD",
    "AckToken",
    "LayerUnavailable",
    "NotReplicated",
    "StreamsChannelLayer",
]

log = logging.getLogger("gateway.layer")

#: the consumer group every stream has
GROUP: Final = "channels"
#: key set on a redelivered message: how many times it may have reached a handler (2, 3, …)
DELIVERY_KEY: Final = "__delivery__"
#: ``type`` of a dead letter (the same as ``core.worker.DEAD_LETTER_TYPE``)
DEAD_LETTER_TYPE: Final = "gateways.dead_letter"
#: operations in one writer pipeline at most
MAX_BATCH: Final = 1000
#: acknowledgements waiting before they go without a send to carry them
ACK_BATCH: Final = 200
#: seconds an acknowledgement waits at most for a batch to join
ACK_DELAY: Final = 0.01
#: seconds to wait for a TCP connection to Redis
CONNECT_TIMEOUT: Final = 3.0
#: connections for fetches per host (one per stream this process receives on)
FETCH_POOL_SIZE: Final = 10_000
#: seconds a cancelled fetch waits at most for Redis to unblock its read (then it abandons it)
UNBLOCK_PATIENCE: Final = 1.0
#: a fetch takes what the stream's receivers used in this many seconds at their last pace
PREFETCH_WINDOW: Final = 0.1
#: seconds a lost stream or dataset stays among :meth:`StreamsChannelLayer.health_problems`
PROBLEM_PERIOD: Final = 60.0
#: entries one refresh or give-back script call handles at most
REFRESH_CHUNK: Final = 500
#: seconds between two WARNING lines about members a ``group_send`` could not reach, per group
GROUP_FULL_REPORT: Final = 10.0
#: the idle time (ms) an entry handed back at close gets: past any consumer's redelivery_timeout
GIVE_BACK_IDLE_MS: Final = 365 * 86400 * 1000
#: values of the ``durability`` option: ``"async"`` (Redis replication as it is: a write a
#: caller was told about can be lost when a replica that had not received it is promoted) and
#: ``"replicated"`` (a send returns once a replica confirmed it too: ``WAIT 1``)
DURABILITY: Final = ("async", "replicated")
#: hash slots of a Redis Cluster
CLUSTER_SLOTS: Final = 16384


class LayerUnavailable(redis_errors.ConnectionError):
    """Redis cannot take the operation now, for a reason a connection error does not tell: a
    Redis Cluster with no master for a slot (``CLUSTERDOWN``), a slot moving (``TRYAGAIN``,
    ``MOVED``/``ASK`` the cluster client gave up following), or a write that reached a replica
    during a failover (``READONLY``). A ``redis.exceptions.ConnectionError``, so the gateways
    treat it as the outage it is (``core.service.LAYER_ERRORS``: pushed back on the transport,
    retried), never as a bad message; the Redis error is chained as its cause."""


class NotReplicated(LayerUnavailable):
    """``durability="replicated"``: the master took the write but no replica confirmed it
    within ``durability_timeout`` (``WAIT 1``), so it is not accepted. The sender retries
    (a transport is pushed back), so the message may then be there twice, never lost."""


# Redis (Cluster) answers that mean "not now" rather than "never": see LayerUnavailable
_OUTAGES: Final[tuple[type[BaseException], ...]] = (
    redis_errors.ClusterError,  # CLUSTERDOWN, MASTERDOWN
    redis_errors.TryAgainError,
    redis_errors.AskError,  # MovedError too
    redis_errors.SlotNotCoveredError,
    redis_errors.ReadOnlyError,
    getattr(redis_errors, "RedisClusterUnreachableError", redis_errors.SlotNotCoveredError),
)


def _outage(exc: BaseException) -> BaseException:
    """``exc``, or the :class:`LayerUnavailable` it means (see there)."""
    if not isinstance(exc, _OUTAGES):
        return exc
    first = str(exc).split("\n")[0][:300]
    mapped = LayerUnavailable(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
    mapped.__cause__ = exc
    return mapped


_slot_tags: list[str] = []


def _slot_tag(slot: int) -> str:
    """A short hash tag whose keys live in Redis Cluster hash slot ``slot`` (the table of all
    16,384 is made once, on first use, in about 0.2 s)."""
    if not _slot_tags:
        table = [""] * CLUSTER_SLOTS
        missing, number = CLUSTER_SLOTS, 0
        while missing:
            tag = str(number)
            where = key_slot(tag.encode())
            if not table[where]:
                table[where] = tag
                missing -= 1
            number += 1
        _slot_tags.extend(table)
    return _slot_tags[slot]


def _is_local_key(key: str) -> bool:
    """A process-local channel's stream (``…name.CLIENT!``; ``…{name.CLIENT!}`` in a cluster)."""
    return key.endswith("!") or key.endswith("!}")


DROPPED = Counter(
    "gateway_layer_dropped",
    "Messages the streams layer dropped, by reason",
    ["reason"],
    registry=REGISTRY,
)
REDELIVERED = Counter(
    "gateway_layer_redelivered",
    "Messages claimed from a consumer that did not acknowledge them in time",
    registry=REGISTRY,
)
VANISHED = Counter(
    "gateway_layer_vanished",
    "Times the layer found its data gone in Redis (what=dataset: a host's marker key vanished "
    "or changed, e.g. Redis restarted without persistence or FLUSHALL; what=stream: a stream "
    "or its consumer group vanished under a reader)",
    ["what"],
    registry=REGISTRY,
)

# The marker of a host's dataset: read by every write and claim, created when missing; the value
# it had (nil when it was created now) tells the caller whether the data it saw is still there.
_EPOCH = """
local function epoch(marker, candidate)
    local seen = redis.call('GET', marker)
    if not seen then
        redis.call('SET', marker, candidate)
    end
    return seen
end
"""

# One stream entry: create the stream and its group if missing, check capacity, append.
# Used by the batch script and the group script; returns 1 when added, 0 when full. ``target``
# is '' for a normal channel, else the process-local channel(s), comma-separated.
_ADD = (
    _EPOCH
    + """
local function add(key, capacity, payload, target, local_ttl)
    local length = redis.call('XLEN', key)
    if length == 0 and redis.call('EXISTS', key) == 0 then
        redis.call('XGROUP', 'CREATE', key, 'channels', '0', 'MKSTREAM')
    end
    if length >= capacity then
        return 0
    end
    if target == '' then
        redis.call('XADD', key, '*', 'm', payload)
    else
        redis.call('XADD', key, '*', 'm', payload, 'c', target)
        redis.call('EXPIRE', key, local_ttl)
    end
    return 1
end
local trims = {}
local trimmed = {}
local minid = nil
if tonumber(ARGV[1]) > 0 then
    local t = redis.call('TIME')
    minid = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1]))
end
local function trim(key)
    if minid and not trimmed[key] then
        trimmed[key] = true
        local n = redis.call('XTRIM', key, 'MINID', minid)
        if n > 0 then
            table.insert(trims, key)
            table.insert(trims, n)
        end
    end
end
"""
)

# group_send on a single host, a record of the batch script below: read the members of the group
# ``key`` and append ``payload`` to each member's stream; the process-local members of one process
# share one entry naming them all. ``first`` is where ``owned`` (channel, capacity) pairs for
# channels with a capacity of their own start in ARGV. Returns {members, members not reached,
# {some not reached}}.
_GROUP = """
local now = nil
local function group(key, payload, default, expiry, prefix, first, owned)
    local own = {}
    for j = first, first + 2 * owned - 1, 2 do
        own[ARGV[j]] = tonumber(ARGV[j + 1])
    end
    local function capacity(channel)
        return own[channel] or default
    end
    if not now then
        now = tonumber(redis.call('TIME')[1])
    end
    redis.call('ZREMRANGEBYSCORE', key, 0, now - expiry)
    local members = redis.call('ZRANGE', key, 0, -1)
    local full = 0
    local missed = {}
    local function miss(channel)
        if #missed < 10 then
            table.insert(missed, channel)
        end
    end
    local locals = {}
    local order = {}
    for _, channel in ipairs(members) do
        local bang = string.find(channel, '!', 1, true)
        if bang then
            local target = prefix .. string.sub(channel, 1, bang)
            if not locals[target] then
                locals[target] = {}
                table.insert(order, target)
            end
            table.insert(locals[target], channel)
        else
            local target = prefix .. channel
            trim(target)
            if add(target, capacity(channel), payload, '', ARGV[2]) == 0 then
                full = full + 1
                miss(channel)
            end
        end
    end
    for _, target in ipairs(order) do
        local targets = locals[target]
        local room = 0
        for _, channel in ipairs(targets) do
            room = math.max(room, capacity(channel))
        end
        trim(target)
        if add(target, room, payload, table.concat(targets, ','), ARGV[2]) == 0 then
            full = full + #targets
            for _, channel in ipairs(targets) do
                miss(channel)
            end
        end
    end
    return {#members, full, missed}
end
"""

# KEYS: one stream (or group) per record. ARGV[1] expiry ms (0: none), ARGV[2] local TTL, ARGV[3]
# the host's marker key, ARGV[4] a new marker value, then one record per key: 's', capacity,
# payload, target for a send; 'oN' and the same three for a send that is part N of an ordered
# sequence (``send_many``): once one send of a sequence found its stream full, the rest of that
# sequence is not added; 'A', n, then n entry ids to acknowledge (and delete); 'a', entry id,
# the stream's hand-out count hash, to acknowledge a redelivered entry; 'g', payload, capacity,
# group expiry (s), stream key prefix, n, then n (channel, capacity) pairs for channels with a
# capacity of their own, for a group_send to the group KEYS[i] (single host only: the members'
# streams are not among KEYS).
# Returns {results (a list of 1/0 for an 'A' record, {members, not reached, {some not reached}}
# for a 'g' record), {key, trimmed, …}, marker before}. Sends and group_sends run in the order
# they were submitted: one writer round trip is one script call.
_BATCH = (
    _ADD
    + _GROUP
    + """
local seen = epoch(ARGV[3], ARGV[4])
local results = {}
local stopped = {}
local at = 5
for i = 1, #KEYS do
    local key = KEYS[i]
    local op = ARGV[at]
    if op == 'A' then
        local n = tonumber(ARGV[at + 1])
        local done = {}
        for j = 1, n do
            local id = ARGV[at + 1 + j]
            redis.call('XACK', key, 'channels', id)
            done[j] = redis.call('XDEL', key, id)
        end
        results[i] = done
        at = at + 2 + n
    elseif op == 'a' then
        redis.call('XACK', key, 'channels', ARGV[at + 1])
        results[i] = redis.call('XDEL', key, ARGV[at + 1])
        redis.call('HDEL', ARGV[at + 2], ARGV[at + 1])
        at = at + 3
    elseif op == 's' then
        trim(key)
        results[i] = add(key, tonumber(ARGV[at + 1]), ARGV[at + 2], ARGV[at + 3], ARGV[2])
        at = at + 4
    elseif op == 'g' then
        local owned = tonumber(ARGV[at + 5])
        results[i] = group(key, ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]),
            ARGV[at + 4], at + 6, owned)
        at = at + 6 + 2 * owned
    else
        if stopped[op] then
            results[i] = 0
        else
            trim(key)
            results[i] = add(key, tonumber(ARGV[at + 1]), ARGV[at + 2], ARGV[at + 3], ARGV[2])
            if results[i] == 0 then
                stopped[op] = true
            end
        end
        at = at + 4
    end
end
return {results, trims, seen}
"""
)

# Claim entries pending longer than ARGV[3] ms, with their delivery counts.
# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] min idle ms, ARGV[4] start, ARGV[5]
# count, ARGV[6] idle ms after which a consumer with nothing pending is deleted, ARGV[7] marker
# key, ARGV[8] new marker value.
# Returns {next start, {{id, fields, deliveries}, …}, {deleted id, …}, marker before}.
_CLAIM = (
    _EPOCH
    + """
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
    'COUNT', ARGV[5])
local seen = epoch(ARGV[7], ARGV[8])
local out = {}
local deleted = claimed[3] or {}
for _, entry in ipairs(claimed[2]) do
    if entry[2] then
        local pending = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
        local count = 1
        if pending[1] then
            count = pending[1][4]
        end
        table.insert(out, {entry[1], entry[2], count})
    else
        -- Redis 6.2 lists an entry deleted before its claim with nil fields
        redis.call('XACK', KEYS[1], ARGV[1], entry[1])
        table.insert(deleted, entry[1])
    end
end
-- consumers of processes long gone, holding nothing: forget them (a live one that reads again
-- is created again by XREADGROUP; one with pending entries is kept for their claim)
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local info = {}
    for i = 1, #consumer, 2 do
        info[consumer[i]] = consumer[i + 1]
    end
    if info['pending'] == 0 and info['idle'] > tonumber(ARGV[6]) and info['name'] ~= ARGV[2] then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    end
end
return {claimed[1], out, deleted, seen}
"""
)

# A process-local stream being read: keep it from expiring, look at the host's marker.
# KEYS[1] stream; ARGV[1] TTL, ARGV[2] marker key, ARGV[3] new marker value. Returns the
# marker before, and whether the stream exists.
_TOUCH = (
    _EPOCH
    + """
local seen = epoch(ARGV[2], ARGV[3])
return {seen, redis.call('EXPIRE', KEYS[1], ARGV[1])}
"""
)

# Keep entries this consumer holds claimed (ARGV[3] idle ms 0: a refresh), or hand them back to
# the group (ARGV[3] = GIVE_BACK_IDLE_MS: claimable by the next claim), without counting a delivery.
# Checked per entry first: one that another consumer owns now is left alone (and reported).
# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] idle ms, then entry ids.
# Returns the ids another consumer owns.
_REFRESH = """
local owned = {}
local lost = {}
for i = 4, #ARGV do
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
    if pending[1] then
        if pending[1][2] == ARGV[2] then
            table.insert(owned, ARGV[i])
        else
            table.insert(lost, ARGV[i])
        end
    end
end
if #owned > 0 then
    local args = {KEYS[1], ARGV[1], ARGV[2], 0}
    for _, id in ipairs(owned) do
        table.insert(args, id)
    end
    table.insert(args, 'IDLE')
    table.insert(args, ARGV[3])
    table.insert(args, 'JUSTID')
    redis.call('XCLAIM', unpack(args))
end
return lost
"""

# Count one hand-out of a redelivered entry. KEYS[1] the stream's hand-out hash; ARGV[1] entry
# id, ARGV[2] TTL. Returns the hand-outs counted so far (this one included).
_HANDOUT = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return n
"""

# one key at a time: on a Redis Cluster node the keys found are in many slots
_DELETE_PREFIX = """
local cursor = '0'
repeat
    local found = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
    cursor = found[1]
    for _, key in ipairs(found[2]) do
        redis.call('DEL', key)
    end
until cursor == '0'
"""


def _ring_index(value: str, ring_size: int) -> int:
    """The host of ``value`` on a ring of ``ring_size`` hosts (CRC32, like channels_redis)."""
    if ring_size == 1:
        return 0
    return int((binascii.crc32(value.encode()) & 0xFFF) / (4096 / ring_size))


def cluster_startup(host: Mapping[str, Any]) -> tuple[list[ClusterNode], dict[str, Any]]:
    """A cluster host (``{"cluster": urls, …}``) as ``RedisCluster``'s startup nodes and the
    options its URLs carry (user, password, ``rediss`` TLS and its query options), the host's
    other keys last. :mod:`core.redis` builds its own client from the same."""
    options = dict(host)
    urls = options.pop("cluster")
    if isinstance(urls, str):
        urls = [urls]
    first = urlsplit(str(urls[0]))
    found: dict[str, Any] = {}
    if first.username:
        found["username"] = unquote(first.username)
    if first.password:
        found["password"] = unquote(first.password)
    if first.scheme.lower().startswith("rediss"):
        found["ssl"] = True
        found.update(
            (k, v) for k, v in parse_qsl(first.query) if k in ("ssl_cert_reqs", "ssl_ca_certs")
        )
    return [_cluster_node(url) for url in urls], found | options


def _cluster_node(url: Any) -> ClusterNode:
    """A startup node of a cluster host: ``redis://h:p`` (or ``(h, p)``, or ``"h:p"``)."""
    if isinstance(url, (tuple, list)):
        return ClusterNode(str(url[0]), int(url[1]))
    text = str(url)
    parts = urlsplit(text if "://" in text else f"redis://{text}")
    return ClusterNode(parts.hostname or "localhost", parts.port or 6379)


def describe_cluster(nodes: Any) -> str:
    """The startup nodes of a cluster host as ``h1:p1,h2:p2`` (no passwords), for messages."""
    found = [_cluster_node(url) for url in ([nodes] if isinstance(nodes, str) else nodes)]
    return ",".join(f"{node.host}:{node.port}" for node in found)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(message: dict[str, Any]) -> str:
    return f"{message.get('type')!s:.100} (id={message.get('id')!s:.200})"


@dataclasses.dataclass(frozen=True)
class AckToken:
    """What :meth:`StreamsChannelLayer.ack` needs to acknowledge one delivered message."""

    index: int
    key: str
    entry_id: str
    #: 1 for a first delivery; 2 and up (Redis' delivery count) for a message claimed back
    #: from a consumer that did not acknowledge it in time: ``redelivered``, see ``begin``
    delivery: int
    #: ``time.monotonic()`` when the entry was last claimed in Redis (fetched, claimed or
    #: refreshed): its idle time there counts from then
    claimed: float = 0.0

    @property
    def redelivered(self) -> bool:
        """Claimed back from a consumer that did not acknowledge it in time."""
        return self.delivery > 1

    @property
    def local(self) -> bool:
        """A process-local channel's entry: deleted when fetched, nothing to acknowledge."""
        return _is_local_key(self.key)


@dataclasses.dataclass(eq=False)
class _Entry:
    entry_id: str
    channel: str
    message: dict[str, Any]
    #: Redis' delivery count (fetches and claims): 1 for a first fetch, 2 and up once claimed
    delivery: int
    #: ``time.monotonic()`` of its last claim in Redis (see AckToken.claimed)
    claimed: float


class _Foreign(ValueError):
    """An entry whose ``c`` field names a channel that is not this stream's."""


class _Buffers(dict[str, deque[_Entry]]):
    """Fetched entries not handed out yet, by channel.

    For process-local channels it is the layer's ``receive_buffer``, shaped like channels_redis'
    (``gateways/http_ws`` drops the buffers of its finished reply channels with ``pop``): popping
    a channel here drops what it holds for good (counted, logged at DEBUG). For a normal stream
    ``ids`` has the ids buffered, so an entry claimed back while it waits here is not taken twice.
    """

    def __init__(self, layer: StreamsChannelLayer) -> None:
        super().__init__()
        self.layer = layer
        self.ids: set[str] = set()

    def take(self, channel: str) -> _Entry | None:
        buffer = self.get(channel)
        if not buffer:
            return None
        entry = buffer.popleft()
        self.ids.discard(entry.entry_id)
        return entry

    def put(self, entry: _Entry, *, dedupe: bool) -> bool:
        if dedupe:
            if entry.entry_id in self.ids:
                return False  # our own, claimed back while it waited here
            self.ids.add(entry.entry_id)
        self.setdefault(entry.channel, deque()).append(entry)
        return True

    def put_back(self, entry: _Entry, *, dedupe: bool) -> None:
        """Return a taken entry to the front (its receiver was cancelled before it got it)."""
        if dedupe:
            self.ids.add(entry.entry_id)
        self.setdefault(entry.channel, deque()).appendleft(entry)

    def entries(self) -> Iterator[_Entry]:
        for buffer in self.values():
            yield from buffer

    def remove(self, ids: set[str]) -> int:
        """Drop the entries with these ids (another consumer owns them now); how many."""
        removed = 0
        for buffer in self.values():
            kept = [entry for entry in buffer if entry.entry_id not in ids]
            removed += len(buffer) - len(kept)
            if len(kept) != len(buffer):
                buffer.clear()
                buffer.extend(kept)
        self.ids -= ids
        return removed

    def pop(self, channel: str, *default: Any) -> Any:
        entries = super().pop(channel, *default)
        for entry in entries or ():
            self.ids.discard(entry.entry_id)
            self.layer._drop("local_overflow", channel, entry, quiet=True)
        return entries


@dataclasses.dataclass
class _Op:
    kind: str  # "send", "many", "ack", "group", "call"
    key: str = ""
    #: send: (capacity, payload, target); ack: (entry id, hand-out hash or "", ""); many:
    #: ((key, capacity, payload, target), …); group: (payload,)
    args: tuple[Any, ...] = ()
    #: queues this operation's commands on a pipeline; returns how many (the last one answers)
    call: Callable[[Any], int] | None = None
    future: asyncio.Future[Any] | None = None


#: operations that go into the batch script
_STREAM_OPS: Final = ("send", "many", "ack", "group")


class _Writer:
    """Everything one event loop writes to one host, batched into one pipeline per round trip."""

    def __init__(self, layer: StreamsChannelLayer, index: int, client: aioredis.Redis) -> None:
        self.layer = layer
        self.index = index
        self.client = client
        self.queue: deque[_Op] = deque()
        #: acknowledgements wait for the next batch, or ACK_DELAY: nobody waits for them, and
        #: one at a time (a worker acknowledges as each handler returns) they would each make a
        #: round trip of their own
        self.acks: list[_Op] = []
        self.task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._batch: Any = None  # the batch script, registered (EVALSHA) on first use

    def acknowledge(self, key: str, entry_id: str, runs: str = "") -> None:
        """Queue an acknowledgement nobody waits for (a failure only delays it: redelivery)."""
        self.acks.append(_Op("ack", key, (entry_id, runs, "")))
        self._acks_queued()

    def submit(self, op: _Op) -> asyncio.Future[Any]:
        op.future = asyncio.get_running_loop().create_future()
        if op.kind == "ack":
            self.acks.append(op)
            self._acks_queued()
        else:
            self.queue.append(op)
            self.kick()
        return op.future

    def _acks_queued(self) -> None:
        if len(self.acks) >= ACK_BATCH:
            self.kick()
        elif self._timer is None and (self.task is None or self.task.done()):
            self._timer = asyncio.get_running_loop().call_later(ACK_DELAY, self.kick)

    def kick(self) -> None:
        """Make sure the writer task runs (it takes everything queued)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.queue or self.acks:
            # let the callers the last batch answered run first: most send again at once, and
            # their sends then join this batch instead of each making a small one
            await asyncio.sleep(0)
            # acknowledgements first: a send queued after a receive sees the room it made
            batch = self.acks[:MAX_BATCH]
            del self.acks[:MAX_BATCH]
            batch += [self.queue.popleft() for _ in range(min(len(self.queue), MAX_BATCH))]
            # a caller that gave up (cancelled, e.g. a timeout) before its turn was told the send
            # failed: do not do it behind its back (it would retry: a duplicate)
            batch = [op for op in batch if op.future is None or not op.future.done()]
            if not batch:
                continue
            try:
                await self._execute(batch)
            except asyncio.CancelledError:
                # the loop is closing: nobody is left to tell
                for op in (*batch, *self.queue, *self.acks):
                    if op.future is not None and not op.future.done():
                        op.future.cancel()
                raise
            except Exception as exc:
                self._fail(batch, _outage(exc))

    @staticmethod
    def _fail(batch: Iterable[_Op], exc: BaseException) -> None:
        unanswered = 0
        for op in batch:
            if op.future is None:
                unanswered += 1
            elif not op.future.done():
                op.future.set_exception(exc)
        if unanswered:
            log.warning(
                "layer: %d acknowledgement(s) failed (%s); those messages are delivered again "
                "after redelivery_timeout",
                unanswered,
                str(exc) or type(exc).__name__,
            )

    async def _execute(self, batch: list[_Op]) -> None:
        layer = self.layer
        other_ops = [op for op in batch if op.kind not in _STREAM_OPS]
        # One batch script call per marker: the host's, or in a Redis Cluster the hash slot's
        # (every key of one call is in one slot; send_many runs never span two). Plain
        # acknowledgements, per stream, first (a send after a receive sees the room it made);
        # then every other stream operation in its order.
        scripts: dict[str, _Script] = {}

        def script(key: str) -> _Script:
            marker = layer._marker_key(key)
            found = scripts.get(marker)
            if found is None:
                candidate = layer._candidate(self.index, marker)
                found = scripts[marker] = _Script(marker, candidate, key)
            return found

        acks: dict[str, list[_Op]] = {}
        rest: list[_Op] = []
        for op in batch:
            if op.kind == "ack" and not op.args[1]:
                acks.setdefault(op.key, []).append(op)
            elif op.kind in _STREAM_OPS:
                rest.append(op)
        for key, ops in acks.items():
            script(key).add(key, ["A", len(ops), *[op.args[0] for op in ops]], ops)
        for number, op in enumerate(rest):
            if op.kind == "many":
                target = script(op.args[0][0])
                target.writes = True
                target.many.append(op)
                for key, *args in op.args:
                    target.add(key, [f"o{number}", *args], [op])
            elif op.kind == "send":
                target = script(op.key)
                target.writes = True
                target.add(op.key, ["s", *op.args], [op])
            elif op.kind == "group":
                target = script(op.key)
                target.writes = True
                own = layer._own_capacity
                (payload,) = op.args
                target.add(
                    op.key,
                    [
                        "g",
                        payload,
                        layer.capacity,
                        layer.group_expiry,
                        layer._stream_prefix,
                        len(own),
                        *[v for pair in own.items() for v in pair],
                    ],
                    [op],
                )
            else:
                script(op.key).add(op.key, ["a", op.args[0], op.args[1]], [op])
        durable = layer.durability == "replicated"
        writes = any(s.writes for s in scripts.values())
        waits: list[_Wait] = []
        spans: list[int] = []
        if len(scripts) == 1 and not other_ops and not (durable and writes):
            # the common case: one script call (by its SHA), without a pipeline's overhead
            (only,) = scripts.values()
            if self._batch is None:
                self._batch = self.client.register_script(_BATCH)
            try:
                replies: list[Any] = [await self._batch(keys=only.keys, args=only.args(layer))]
            except redis_errors.ResponseError as exc:
                replies = [exc]
        else:
            pipe = self.client.pipeline(transaction=False)
            for one in scripts.values():
                pipe.eval(_BATCH, len(one.keys), *one.keys, *one.args(layer))
            for op in other_ops:
                assert op.call is not None
                spans.append(op.call(pipe))
            if durable and writes:
                waits = await self._queue_waits(pipe, scripts)
            replies = await pipe.execute(raise_on_error=False)
        position = len(scripts)
        for one, reply in zip(scripts.values(), replies, strict=False):
            if isinstance(reply, Exception):
                self._fail([op for ops in one.records for op in ops], _outage(reply))
                continue
            # sends a replica did not confirm fail; acknowledgements in the same call stand
            problem = self._unreplicated(one, waits, replies)
            results, trims, seen = reply
            layer._saw_epoch(self.index, one.marker, seen, one.candidate)
            layer._count_trims(trims)
            added: dict[int, int] = {}  # send_many: how many of its sends went in
            for ops, result in zip(one.records, results, strict=True):
                if ops[0].kind == "group":
                    members, full, missed = result
                    outcome = (int(members), int(full), [_text(m) for m in missed])
                    _answer(ops[0], problem or outcome)
                elif isinstance(result, list):  # an "A" record: one answer per ack
                    for op, single in zip(ops, result, strict=True):
                        _answer(op, bool(single))
                elif ops[0].kind == "many":
                    added[id(ops[0])] = added.get(id(ops[0]), 0) + int(result)
                elif ops[0].kind == "send" and result and problem is not None:
                    _answer(ops[0], problem)
                else:
                    _answer(ops[0], bool(result))
            for op in one.many:  # how many were added: a prefix of the sequence
                _answer(op, problem or added.get(id(op), 0))
        for op, span in zip(other_ops, spans, strict=True):
            answers = replies[position : position + span]
            position += span
            failed = [a for a in answers if isinstance(a, Exception)]
            answer: Any = _outage(failed[0]) if failed else answers[-1]
            if op.future is None or op.future.done():
                continue
            if isinstance(answer, BaseException):
                op.future.set_exception(answer)
            else:
                op.future.set_result(answer)

    async def _queue_waits(self, pipe: Any, scripts: dict[str, _Script]) -> list[_Wait]:
        """``durability="replicated"``: queue ``WAIT 1 <timeout>`` after the writes, on the
        connection that made them (one Redis; in a cluster, each master that took sends)."""
        layer = self.layer
        timeout_ms = max(1, int(layer.durability_timeout * 1000))
        if not layer._cluster:
            pipe.execute_command("WAIT", 1, timeout_ms)
            return [_Wait(None, set(scripts), [])]
        client = cast(RedisCluster, self.client)
        await client.initialize()
        by_node: dict[str, _Wait] = {}
        for marker, one in scripts.items():
            if not one.writes:
                continue
            node = client.get_node_from_key(one.sample)
            assert node is not None
            wait = by_node.get(node.name)
            if wait is None:
                wait = by_node[node.name] = _Wait(node, set(), [])
            wait.markers.add(marker)
            wait.samples.append(one.sample)
        for wait in by_node.values():
            pipe.execute_command("WAIT", 1, timeout_ms, target_nodes=wait.node)
        return list(by_node.values())

    def _unreplicated(
        self, one: _Script, waits: list[_Wait], replies: list[Any]
    ) -> NotReplicated | None:
        """The error for ``one``'s writes (sends, group_sends) when no replica confirmed them in
        time; ``None`` when they count as accepted (or nothing was waited for)."""
        if not waits or not one.writes:
            return None
        for number, wait in enumerate(waits):
            if one.marker not in wait.markers:
                continue
            reply = replies[len(replies) - len(waits) + number]
            if isinstance(reply, dict):  # a cluster client's answer by node
                reply = next(iter(reply.values()), 0)
            timeout = self.layer.durability_timeout
            if isinstance(reply, Exception):
                why = f"WAIT failed: {type(reply).__name__}: {str(reply)[:200]}"
            elif int(reply) < 1:
                why = f"no replica confirmed it within durability_timeout={timeout:g}s"
            elif wait.node is not None and any(
                getattr(cast(RedisCluster, self.client).get_node_from_key(key), "name", None)
                != wait.node.name
                for key in wait.samples
            ):
                # the slot moved during the call: the write may have been redirected to
                # another master, and this WAIT does not cover it
                why = "its hash slot moved to another master while it was written"
            else:
                continue
            return NotReplicated(f"the write is not replicated ({why}); not accepted")
        return None


@dataclasses.dataclass
class _Script:
    """One batch script call: the operations on the streams of one marker (host or slot)."""

    marker: str
    candidate: str
    #: one of its keys (in a cluster: the slot's master is found by it)
    sample: str
    keys: list[str] = dataclasses.field(default_factory=list)
    argv: list[Any] = dataclasses.field(default_factory=list)
    #: the operations each KEYS entry's answer goes to
    records: list[list[_Op]] = dataclasses.field(default_factory=list)
    #: send_many operations (answered with how many of theirs went in)
    many: list[_Op] = dataclasses.field(default_factory=list)
    #: it appends messages (sends), not only acknowledgements
    writes: bool = False

    def add(self, key: str, argv: list[Any], ops: list[_Op]) -> None:
        self.keys.append(key)
        self.argv += argv
        self.records.append(ops)

    def args(self, layer: StreamsChannelLayer) -> list[Any]:
        return [layer._expiry_ms, layer.local_expiry, self.marker, self.candidate, *self.argv]


@dataclasses.dataclass
class _Wait:
    """A ``WAIT`` queued after writes: on which master (``None``: the one host), for which
    markers' scripts, with a key of each (to see whether its slot moved meanwhile)."""

    node: ClusterNode | None
    markers: set[str]
    samples: list[str]


def _answer(op: _Op, answer: Any) -> None:
    if op.future is not None and not op.future.done():
        if isinstance(answer, BaseException):
            op.future.set_exception(answer)
        else:
            op.future.set_result(answer)


class _ReadClient(aioredis.Redis):
    """A reader's client on a connection of its own (``single_connection_client``).

    Channels never closes a layer (runworker does not, nor does a view's ``async_to_sync``
    with its event loop of the moment), so a layer's clients are often collected unclosed. A
    pooled client holds no connection then; this one does, and redis-py would warn about it
    (``ResourceWarning: Unclosed client session``, which pytest turns into a failure in the
    user's own tests). Collected, it closes its connection quietly instead.
    """

    def close_now(self) -> None:
        """Close the connection without awaiting anything. With its event loop closed it
        cannot close here; the transport closes its socket when collected."""
        connection = getattr(self, "connection", None)
        if connection is not None:
            self.connection = None
            with contextlib.suppress(RuntimeError):  # "Event loop is closed"
                connection._close()

    def __del__(self, *_: Any) -> None:
        self.close_now()


class _Reader:
    """Fetches one stream for this event loop and hands the entries out in order."""

    def __init__(
        self, layer: StreamsChannelLayer, index: int, key: str, client: aioredis.Redis
    ) -> None:
        self.layer = layer
        self.index = index
        self.key = key
        #: the host's fetch client (claims, group creation, CLIENT UNBLOCK)
        self.client = client
        #: the blocking reads' own connection, known to Redis by ``conn_id`` (so a cancelled
        #: read can be unblocked: :meth:`_read`); a cluster's client routes by key instead
        self.read_client: Any = self._new_read_client()
        self.read_connection: Any = None
        self.conn_id: int | None = None
        #: a process-local stream: read with NOACK, each entry deleted as it is fetched
        self.local = _is_local_key(key)
        #: the stream's channel (for a process-local stream, the part up to the "!")
        self.channel = layer._stream_channel(key)
        self.buffers = layer.receive_buffer if self.local else _Buffers(layer)
        self.waiting: dict[str, int] = {}
        #: one future per waiting receive, by channel: a fetch wakes only the receives of the
        #: channels it brought entries for (50 sockets' replies on one process-local stream:
        #: waking all of them for each fetch cost more than the fetch)
        self.wakeups: dict[str, list[asyncio.Future[None]]] = {}
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.next_claim = 0.0
        self.claim_start = "0-0"
        #: this reader has read the stream's group: a NOGROUP from now on means it vanished
        self.seen_group = False
        #: entries the last fetch took, and when it ended (the pace of the receivers)
        self.last_count = 0
        self.last_end = 0.0

    async def get(self, channel: str) -> _Entry:
        entry = self.buffers.take(channel)
        if entry is not None:  # the common case under load: no wait
            return entry
        loop = asyncio.get_running_loop()
        self.waiting[channel] = self.waiting.get(channel, 0) + 1
        wakeup: asyncio.Future[None] | None = None
        try:
            while True:
                if (entry := self.buffers.take(channel)) is not None:
                    return entry
                if self.error is not None:
                    error, self.error = self.error, None
                    raise error
                # a fetch cancelled by a receive given up a moment ago ends without a
                # word to the waiters: a receive started meanwhile needs a fetch of its own
                if self.task is None or self.task.done() or self.task.cancelling():
                    self.task = loop.create_task(self._fetch_loop())
                wakeup = loop.create_future()
                self.wakeups.setdefault(channel, []).append(wakeup)
                await wakeup
        except asyncio.CancelledError:
            nobody = self.waiting[channel] == 1 and len(self.waiting) == 1
            if nobody and self.task is not None and not self.local:
                # nobody waits any more: a fetch left running would take messages another
                # consumer waits for. (A process-local fetch runs on: its NOACK entries
                # would be lost with the reply, and nobody else reads that stream.)
                self.task.cancel()
            raise
        finally:
            self.waiting[channel] -= 1
            if not self.waiting[channel]:
                del self.waiting[channel]
            if wakeup is not None:  # a cancelled receive leaves no future behind
                self._forget(channel, wakeup)

    def _forget(self, channel: str, wakeup: asyncio.Future[None]) -> None:
        waiters = self.wakeups.get(channel)
        if waiters is not None and wakeup in waiters:
            waiters.remove(wakeup)
            if not waiters:
                del self.wakeups[channel]

    def _wake(self, channels: Iterable[str]) -> None:
        """Wake the receives waiting on ``channels`` (they look at their buffers again)."""
        for channel in channels:
            for wakeup in self.wakeups.pop(channel, ()):
                if not wakeup.done():
                    wakeup.set_result(None)

    def put_back(self, entry: _Entry) -> None:
        self.buffers.put_back(entry, dedupe=not self.local)
        self._wake((entry.channel,))

    def _wanted(self) -> bool:
        return any(not self.buffers.get(channel) for channel in self.waiting)

    async def _fetch_loop(self) -> None:
        try:
            while self._wanted():
                entries = await self._fetch()
                for entry in entries:
                    self._buffer(entry)
                if entries:
                    self._wake({entry.channel for entry in entries})
                    if not self.local:
                        self.layer._state().start_refresher(self.layer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = _outage(exc)
            self._wake(list(self.wakeups))

    def _buffer(self, entry: _Entry) -> None:
        if not self.buffers.put(entry, dedupe=not self.local) or not self.local:
            return
        if len(self.buffers[entry.channel]) > self.layer.get_capacity(entry.channel):
            dropped = self.buffers.take(entry.channel)
            assert dropped is not None
            self.layer._overflowed(dropped)
        if len(self.buffers) > 10_000:
            # channels nobody receives on any more: keep the map itself bounded
            stale = [c for c in self.buffers if c not in self.waiting][:1000]
            log.warning("layer: dropping the buffers of %d idle local channels", len(stale))
            for channel in stale:
                self.buffers.pop(channel)

    def _count(self) -> int:
        """Entries to fetch: what the waiting receivers take in PREFETCH_WINDOW at the pace
        they took the last fetch, at most twice that fetch (a worker asks for its next message
        before its handler ran: the first two come fast whatever the handler), at least one
        per waiting receiver, at most ``batch``. A process-local stream takes ``batch``."""
        layer = self.layer
        if self.local:
            return layer.batch
        wanted = sum(self.waiting.values())
        if self.last_count:
            pace = self.last_count / max(time.monotonic() - self.last_end, 1e-4)
            wanted = max(wanted, min(2 * self.last_count, int(pace * PREFETCH_WINDOW) + 1))
        return max(1, min(layer.batch, wanted))

    async def _fetch(self) -> list[_Entry]:
        layer = self.layer
        now = time.monotonic()
        if now >= self.next_claim:
            self.next_claim = now + layer.claim_interval
            if self.local:
                await self._touch()
            else:
                claimed = await self._claim()
                if claimed:
                    return claimed
        block = max(1, int((self.next_claim - time.monotonic()) * 1000))
        try:
            reply: Any = await self._read(self._count(), block)
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            self._gone(exc)
            await self._create_group()
            return []
        return self._entries(reply)

    async def _read(self, count: int, block: int) -> Any:
        """XREADGROUP for new entries, blocking up to ``block`` ms.

        Cancelled while Redis holds the read blocked, the read is unblocked (CLIENT UNBLOCK)
        and its reply taken into the buffers, not abandoned: Redis hands the next entry to an
        abandoned read as readily as to a live one (a close on the way does not stop it), and
        that entry would wait, pending for this consumer with nobody to take it, until a claim
        redelivered it ``redelivery_timeout`` later.
        """
        read = asyncio.ensure_future(self._read_on_own_connection(count, block))
        try:
            return await asyncio.shield(read)
        except asyncio.CancelledError:
            await self._unblock(read)
            raise

    async def _read_on_own_connection(self, count: int, block: int) -> Any:
        while True:
            fresh = await self._ready_read_connection()
            try:
                return await self.read_client.xreadgroup(
                    GROUP,
                    self.layer.consumer,
                    {self.key: ">"},
                    count=count,
                    block=block,
                    noack=self.local,
                )
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
                # the next read takes a connection from the pool, which checks it (and asks
                # Sentinel); a held one closed while idle (a Redis restart, Redis' idle
                # `timeout`) gets that once before the error counts as an outage
                await self._renew_read_client()
                if fresh:
                    raise

    async def _ready_read_connection(self) -> bool:
        """Take the read connection from the pool if there is none; True if it was just taken
        (the pool checked it), or if reads share the host's client (a cluster)."""
        if self.read_client is self.client:
            return True
        if self.read_connection is None:
            await self.read_client.initialize()
            self.read_connection = self.read_client.connection
            self.read_connection.register_connect_callback(self._on_connect)
            await self._on_connect(self.read_connection)
            return True
        if self.conn_id is None:
            await self._on_connect(self.read_connection)  # a cancel came before it knew
        return False

    def _new_read_client(self) -> Any:
        if self.layer._cluster:
            return self.client
        return _ReadClient(
            connection_pool=self.client.connection_pool, single_connection_client=True
        )

    async def _renew_read_client(self) -> None:
        """The next read takes a connection from the pool again: a connection held across a
        Sentinel failover would reconnect to the address it had, the old master (redis-py
        reconnects a held connection without asking Sentinel; the pool asks)."""
        if self.read_client is self.client:
            return
        old, connection = self.read_client, self.read_connection
        self.read_client, self.read_connection, self.conn_id = self._new_read_client(), None, None
        if connection is not None:
            connection.deregister_connect_callback(self._on_connect)
        await old.aclose()

    def forget_read_connection(self) -> None:
        """Close the read connection at once (its event loop has ended: nothing can be
        awaited, and a client left holding it warns when collected)."""
        if isinstance(self.read_client, _ReadClient):
            self.read_client.close_now()
            self.read_connection = None

    async def _on_connect(self, connection: Any) -> None:
        """The read connection (re)connected: learn its id, before any read goes out on it."""
        if connection is not self.read_connection:
            return
        self.conn_id = None
        await connection.send_command("CLIENT", "ID", check_health=False)
        self.conn_id = int(await connection.read_response())

    async def _unblock(self, read: asyncio.Future[Any]) -> None:
        """End a read whose fetch was cancelled; buffer what it brought (see :meth:`_read`)."""
        try:
            async with asyncio.timeout(UNBLOCK_PATIENCE):  # a stalled Redis: abandon it
                # not yet at Redis, or Redis answers it meanwhile: UNBLOCK finds nothing
                # blocked (0); it is tried again until the read ends
                while self.conn_id is not None and not read.done():
                    if not self.read_connection.is_connected:
                        break  # its read failed: nothing to unblock (an id is one server's)
                    await self.client.client_unblock(self.conn_id)
                    await asyncio.wait([read], timeout=0.02)
        except (asyncio.CancelledError, Exception):  # cancelled again, or Redis is gone
            pass  # the read goes with it
        finally:
            if not read.done():  # never sent (no id yet), or Redis does not answer
                read.cancel()
                read.add_done_callback(_retrieve)
        if not read.done() or read.cancelled() or read.exception() is not None:
            return  # a read Redis failed is the next fetch's concern
        entries = self._entries(read.result())
        for entry in entries:
            self._buffer(entry)
        self._wake({entry.channel for entry in entries})

    def _entries(self, reply: Any) -> list[_Entry]:
        """The entries of an XREADGROUP reply (acknowledged at once on a process-local stream)."""
        layer = self.layer
        fetched = time.monotonic()
        self.seen_group = True
        entries: list[_Entry] = []
        count = 0
        writer = layer._writer(self.index) if self.local else None
        for _key, items in reply or []:
            for raw_id, fields in items:
                count += 1
                entry_id = _text(raw_id)
                if writer is not None:  # NOACK: ours now; delete it, the buffer has it
                    writer.acknowledge(self.key, entry_id)
                entries += self._decode(entry_id, fields, 1, fetched)
        self.last_count, self.last_end = count, time.monotonic()
        return entries

    async def _touch(self) -> None:
        """A process-local stream: renew its TTL, look at the host's marker."""
        layer = self.layer
        marker = layer._marker_key(self.key)
        candidate = layer._candidate(self.index, marker)
        seen, _exists = await self.client.eval(
            _TOUCH, 1, self.key, layer.local_expiry, marker, candidate
        )
        layer._saw_epoch(self.index, marker, seen, candidate)

    async def _claim(self) -> list[_Entry]:
        layer = self.layer
        marker = layer._marker_key(self.key)
        candidate = layer._candidate(self.index, marker)
        try:
            start, claimed, deleted, seen = await self.client.eval(
                _CLAIM,
                1,
                self.key,
                GROUP,
                layer.consumer,
                int(layer.redelivery_timeout * 1000),
                self.claim_start,
                layer.batch,
                int(layer.consumer_expiry * 1000),
                marker,
                candidate,
            )
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._gone(exc)
            await self._create_group()
            return []
        layer._saw_epoch(self.index, marker, seen, candidate)
        self.seen_group = True
        self.claim_start = _text(start)
        if deleted:
            DROPPED.labels("deleted_pending").inc(len(deleted))
            log.error(
                "layer: %d pending message(s) on stream %r were deleted before anyone "
                "acknowledged them (expiry or a manual XDEL)",
                len(deleted),
                self.key,
            )
        now = time.monotonic()
        entries: list[_Entry] = []
        for entry_id, flat, count in claimed:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            entries += self._decode(_text(entry_id), fields, max(2, int(count)), now)
        if claimed and self.claim_start != "0-0":
            self.next_claim = now  # more to claim: at the next fetch, not in claim_interval
        if entries:
            REDELIVERED.inc(len(entries))
            log.warning(
                "layer: claimed %d message(s) on stream %r that were not acknowledged within "
                "%.0f s; delivering them again",
                len(entries),
                self.key,
                layer.redelivery_timeout,
            )
        return entries

    def _gone(self, exc: Exception) -> None:
        """NOGROUP (or a blocked read unblocked because the key went): report it if this reader
        had used the stream's group; a brand-new channel gives the same answer."""
        if not self.seen_group:
            return
        self.seen_group = False
        self.layer._vanished(
            "stream",
            f"stream {self.key!r} or its consumer group vanished while this process read it "
            f"({str(exc).split(chr(10))[0][:120]}): what was waiting there is lost",
        )

    async def _create_group(self) -> None:
        try:
            await self.client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        if self.local:
            await self.client.expire(self.key, self.layer.local_expiry)

    def _decode(
        self, entry_id: str, fields: dict[Any, Any], delivery: int, claimed: float
    ) -> list[_Entry]:
        """The entry's deliveries (one per target channel); a bad entry is dropped here."""
        layer = self.layer
        try:
            raw_target = fields.get(b"c")
            if raw_target is None:
                if self.local:
                    raise _Foreign("it names no process-local channel")
                targets = [self.channel]
            else:
                # strict UTF-8: an entry written by someone else must not stop the fetch
                text = raw_target.decode() if isinstance(raw_target, bytes) else str(raw_target)
                targets = text.split(",")
                for target in targets:
                    ours = target.startswith(self.channel) if self.local else target == self.channel
                    if not ours:
                        raise _Foreign(f"it is addressed to {target[:200]!r}")
            if layer.expiry:
                born = int(entry_id.partition("-")[0]) / 1000
                if born < time.time() - layer.expiry:
                    entry = _Entry(entry_id, targets[0], {}, delivery, claimed)
                    where = None if self.local else self.index
                    layer._drop("expired", entry.channel, entry, index=where, key=self.key)
                    return []
            message = msgpack.unpackb(fields[b"m"], raw=False)
            if not isinstance(message, dict):
                raise ValueError(f"not a dict but {type(message).__name__}")
        except _Foreign as exc:
            self._bad(entry_id, delivery, "foreign", str(exc))
            return []
        except Exception as exc:
            self._bad(entry_id, delivery, "undecodable", f"{type(exc).__name__}: {exc}")
            return []
        if len(targets) == 1:
            return [_Entry(entry_id, targets[0], message, delivery, claimed)]
        # a group_send to several process-local channels of this process: one copy each
        return [_Entry(entry_id, t, dict(message), delivery, claimed) for t in targets]

    def _bad(self, entry_id: str, delivery: int, reason: str, problem: str) -> None:
        DROPPED.labels(reason).inc()
        log.error(
            "layer: dropped message %s on %r (%s): %s",
            entry_id,
            self.channel,
            reason,
            problem[:300],
        )
        if not self.local:  # a process-local entry is deleted as it is fetched
            runs = self.layer._runs_key(self.key) if delivery > 1 else ""
            self.layer._writer(self.index).acknowledge(self.key, entry_id, runs)


@dataclasses.dataclass
class _Held:
    """An entry a caller holds between its receive and its handler (see ``hold``)."""

    #: ``time.monotonic()`` of its last claim in Redis
    claimed: float


@dataclasses.dataclass
class _LoopState:
    writers: dict[int, _Writer] = dataclasses.field(default_factory=dict)
    readers: dict[tuple[int, str], _Reader] = dataclasses.field(default_factory=dict)
    fetch_clients: dict[int, aioredis.Redis] = dataclasses.field(default_factory=dict)
    sentinels: list[Any] = dataclasses.field(default_factory=list)
    #: entries held by callers, by (host, stream, entry id)
    held: dict[tuple[int, str, str], _Held] = dataclasses.field(default_factory=dict)
    #: held entries another consumer claimed meanwhile (``release`` answers False)
    lost: set[tuple[int, str, str]] = dataclasses.field(default_factory=set)
    refresher: asyncio.Task[None] | None = None

    def start_refresher(self, layer: StreamsChannelLayer) -> None:
        if self.refresher is None or self.refresher.done():
            self.refresher = asyncio.get_running_loop().create_task(layer._refresh_loop(self))

    def tracked(self) -> dict[tuple[int, str], list[tuple[str, float]]]:
        """(entry id, last claim) of every entry this loop keeps claimed, by stream."""
        out: dict[tuple[int, str], list[tuple[str, float]]] = {}
        for reader in self.readers.values():
            if not reader.local:
                found = [(e.entry_id, e.claimed) for e in reader.buffers.entries()]
                if found:
                    out.setdefault((reader.index, reader.key), []).extend(found)
        for (index, key, entry_id), held in self.held.items():
            out.setdefault((index, key), []).append((entry_id, held.claimed))
        return out


@dataclasses.dataclass
class _GroupReport:
    """``group_send`` refusals of one group since its last WARNING line."""

    members: int = 0
    messages: int = 0


class StreamsChannelLayer(BaseChannelLayer):  # type: ignore[misc]
    """A channels layer on Redis Streams; see the module docstring.

    Options (Django ``CONFIG`` keys, and query parameters of ``redis+streams://`` paths):

    * ``hosts``: as channels_redis (``[{"address": "redis://…"}]``, ``(host, port)`` pairs,
      or Sentinel hosts ``{"sentinels": [(h, p)], "master_name": "…"}``);
    * ``prefix`` (``"asgi"``), ``capacity`` (100), ``channel_capacity`` (``{glob: n}``),
      ``group_expiry`` (86400 s): as channels_redis;
    * ``expiry`` (``None``: never): seconds after which a waiting message is dropped, counted
      and logged;
    * ``redelivery_timeout`` (30 s): a message handed to a handler and not acknowledged for this
      long is delivered again to whichever consumer fetches next (what waits in a process
      before its handler is kept claimed: see the module docstring);
    * ``batch`` (100): entries one fetch takes at most;
    * ``max_deliveries`` (8): hand-outs of one message to a receiver (see ``__delivery__``)
      after which the next claim dead-letters it to ``{channel}.dead`` instead;
    * ``local_expiry`` (86400 s): TTL of a process-local stream, renewed by each send to it and
      while its process reads it;
    * ``consumer_expiry`` (3600 s): a consumer (one per layer instance and stream) idle this long
      with nothing pending is removed from the stream's group, so dead processes do not pile up;
    * ``durability`` (``"async"``): ``"replicated"`` makes every send (``send``, ``send_many``,
      ``group_send``) wait after its write for a replica to confirm it (``WAIT 1``), and raise
      :class:`NotReplicated` (an outage to the gateways) when none did within
      ``durability_timeout`` (1 s): what a gateway acknowledged to its transport then survives
      a failover (docs/redis.md);
    * Redis Cluster: a host ``{"cluster": ["redis://h1:p1", "redis://h2:p2", …]}`` (the
      startup nodes, any of them; further keys go to ``redis.asyncio.RedisCluster``) instead of
      the hosts above; a channel's keys then share a hash tag (``{prefix}:stream:{channel}``),
      so each script runs in one slot, and ``group_send`` sends per member's slot.
    """

    extensions = ["groups", "flush"]

    def __init__(
        self,
        hosts: Any = None,
        prefix: str = "asgi",
        expiry: float | None = None,
        group_expiry: int = 86400,
        capacity: int = 100,
        channel_capacity: dict[Any, int] | None = None,
        redelivery_timeout: float = 30.0,
        batch: int = 100,
        local_expiry: int = 86400,
        consumer_expiry: float = 3600.0,
        max_deliveries: int = 8,
        durability: str = "async",
        durability_timeout: float = 1.0,
    ) -> None:
        super().__init__(expiry=expiry, capacity=capacity)
        if redelivery_timeout <= 0 or batch <= 0 or capacity <= 0 or max_deliveries <= 0:
            raise ValueError(
                "redelivery_timeout, batch, capacity and max_deliveries must be positive"
            )
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self.prefix = prefix
        self.group_expiry = group_expiry
        self.redelivery_timeout = float(redelivery_timeout)
        #: how often a fetching reader looks for messages to claim (and at its host's marker)
        self.claim_interval = max(0.05, self.redelivery_timeout / 2)
        #: how often entries waiting in this process are claimed again (their idle time reset)
        self.refresh_interval = min(1.0, self.redelivery_timeout / 10)
        self.batch = batch
        self.max_deliveries = int(max_deliveries)
        self.local_expiry = local_expiry
        #: seconds after which a stream's consumer (a process) holding nothing is forgotten
        self.consumer_expiry = consumer_expiry
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY)}")
        if durability_timeout <= 0:
            raise ValueError("durability_timeout must be positive")
        self.durability = durability
        self.durability_timeout = float(durability_timeout)
        self.hosts = decode_hosts(hosts)
        self.ring_size = len(self.hosts)
        clusters = sum(1 for host in self.hosts if "cluster" in host)
        if clusters and clusters != len(self.hosts):
            raise ValueError("a Redis Cluster host cannot share the ring with other hosts")
        #: the hosts are Redis Clusters: keys carry hash tags (see _stream_key)
        self._cluster = bool(clusters)
        #: the ``!`` part of this instance's process-local channels
        self.client_prefix = uuid.uuid4().hex
        #: this instance's consumer name in every stream's group
        self.consumer = f"{self.client_prefix}"
        self._stream_prefix = f"{prefix}:stream:"
        #: the key whose value names the dataset of a host (see the module docstring)
        self._marker = f"{prefix}:epoch"
        #: fetched messages of process-local channels not handed out yet, by channel
        self.receive_buffer = _Buffers(self)
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._own_capacity: dict[str, int] = {}
        self._places: dict[str, tuple[int, str]] = {}
        self._epochs: dict[tuple[int, str], str] = {}
        self._retired: set[str] = set()
        self._candidates: dict[tuple[int, str], str] = {}
        self._problems: dict[str, float] = {}
        self._group_reports: dict[str, _GroupReport] = {}
        #: local_overflow drops since the last WARNING: [count, channels], None when not armed
        self._overflows: list[Any] | None = None

    @property
    def _expiry_ms(self) -> int:
        return int(self.expiry * 1000) if self.expiry else 0

    def __str__(self) -> str:
        return f"{type(self).__name__}(hosts={len(self.hosts)}, prefix={self.prefix!r})"

    # -- keys ----------------------------------------------------------------------------------

    def _stream_key(self, name: str) -> str:
        """The stream of the (non-local) channel name ``name``: ``{prefix}:stream:{name}``, in
        a Redis Cluster with the name as its hash tag, so every key of the channel (its runs
        hash, its slot's marker) is in one slot."""
        if self._cluster:
            return f"{self._stream_prefix}{{{name}}}"
        return self._stream_prefix + name

    def _stream_channel(self, key: str) -> str:
        """The channel name of the stream ``key`` (what :meth:`_stream_key` was given)."""
        body = key[len(self._stream_prefix) :]
        return body[1:-1] if self._cluster else body

    def _marker_key(self, key: str) -> str:
        """The marker the scripts on ``key`` look at: the host's, or in a Redis Cluster the
        marker of ``key``'s hash slot (a key with a hash tag that lands in the same slot)."""
        if not self._cluster:
            return self._marker
        return f"{self._marker}:{{{_slot_tag(key_slot(key.encode()))}}}"

    def _slot(self, key: str) -> int:
        """``key``'s hash slot in a Redis Cluster; 0 for every key on plain hosts."""
        return key_slot(key.encode()) if self._cluster else 0

    # -- connections ---------------------------------------------------------------------------

    def _pool(self, index: int, max_connections: int, *, blocking: bool = False) -> Any:
        host = dict(self.hosts[index])
        options: dict[str, Any] = {
            "socket_timeout": None,
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "max_connections": max_connections,
        }
        options.update({k: v for k, v in host.items() if k not in ("address", "timeout")})
        if "address" in host:
            kind = aioredis.BlockingConnectionPool if blocking else aioredis.ConnectionPool
            return kind.from_url(host["address"], **options)
        if "master_name" in host:
            master = options.pop("master_name")
            sentinels = options.pop("sentinels")
            sentinel_kwargs = options.pop("sentinel_kwargs", None)
            # redis-py types these constructors from 8.2 on and not before: called through Any,
            # so the same line type-checks against every redis-py this package allows
            sentinel = cast(Any, Sentinel)(sentinels, sentinel_kwargs=sentinel_kwargs)
            self._state().sentinels.append(sentinel)  # its clients are closed with the pools
            return cast(Any, SentinelConnectionPool)(master, sentinel, **options)
        return aioredis.ConnectionPool(**options)

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            for old in [lp for lp in self._loops if lp.is_closed()]:
                for reader in self._loops.pop(old).readers.values():
                    reader.forget_read_connection()  # its loop is gone: nothing to await
            state = self._loops[loop] = _LoopState()
        return state

    def _cluster_client(self, index: int, max_connections: int) -> Any:
        """A ``RedisCluster`` for the cluster host ``index`` (it follows MOVED and ASK itself,
        and retries connection errors, CLUSTERDOWN and TRYAGAIN with its backoff)."""
        nodes, options = cluster_startup(self.hosts[index])
        bounded = {
            "socket_timeout": None,
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "max_connections": max_connections,
        }
        return cast(Any, RedisCluster)(startup_nodes=nodes, **(bounded | options))

    def _writer(self, index: int, state: _LoopState | None = None) -> _Writer:
        state = state or self._state()
        writer = state.writers.get(index)
        if writer is None:
            client: Any
            if self._cluster:
                # one pipeline at a time (a connection per master), and a few spare
                client = self._cluster_client(index, 8)
            else:
                # two connections: the writer's pipeline, and a spare while one reconnects
                client = aioredis.Redis(connection_pool=self._pool(index, 2, blocking=True))
            writer = state.writers[index] = _Writer(self, index, client)
        return writer

    def _reader(self, index: int, key: str) -> _Reader:
        state = self._state()
        reader = state.readers.get((index, key))
        if reader is None:
            client = state.fetch_clients.get(index)
            if client is None and self._cluster:
                client = state.fetch_clients[index] = self._cluster_client(index, FETCH_POOL_SIZE)
            elif client is None:
                pool = self._pool(index, FETCH_POOL_SIZE)
                client = state.fetch_clients[index] = aioredis.Redis(connection_pool=pool)
            reader = state.readers[(index, key)] = _Reader(self, index, key, client)
        return reader

    def connection(self, index: int) -> aioredis.Redis:
        """A client for host ``index`` (for :func:`core.layers.probe_layer`'s PING)."""
        return self._writer(index).client

    def _where(self, channel: str) -> tuple[int, str]:
        non_local = self.non_local_name(channel)
        return _ring_index(non_local, self.ring_size), self._stream_key(non_local)

    def _runs_key(self, key: str) -> str:
        """The hash counting the hand-outs of the stream ``key``'s redelivered entries."""
        return f"{self.prefix}:runs:{key[len(self._stream_prefix) :]}"

    # -- capacities ----------------------------------------------------------------------------

    def set_channel_capacity(self, channel: str, capacity: int) -> None:
        """Give ``channel`` (an exact, non-local name) a capacity of its own, above
        ``channel_capacity`` patterns and ``capacity``: a gateway's ``inbound_capacity``."""
        self.require_valid_channel_name(channel)
        if "!" in channel or capacity <= 0:
            raise ValueError(f"{channel!r}: a capacity of its own needs a normal channel and n > 0")
        self._own_capacity[channel] = int(capacity)

    def get_capacity(self, channel: str) -> int:
        own = self._own_capacity.get(channel)
        return own if own is not None else int(super().get_capacity(channel))

    # -- the channel layer API -----------------------------------------------------------------

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Append ``message`` to ``channel``; ``ChannelFull`` when it holds ``capacity``."""
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        payload = msgpack.packb(message, use_bin_type=True)
        index, key = self._where(channel)
        target = channel if "!" in channel else ""
        op = _Op("send", key, (self.get_capacity(channel), payload, target))
        try:
            added = await self._writer(index).submit(op)
        except redis_errors.ResponseError as exc:
            if _out_of_memory(exc):  # Redis at maxmemory: push back as for a full channel
                raise ChannelFull(channel) from exc
            raise
        if not added:
            raise ChannelFull(channel)

    async def send_many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> int:
        """Append ``(channel, message)`` pairs in order; stop at the first channel that is full.

        Returns how many were appended: always a prefix of ``messages``, so whatever is not
        appended can be sent again later without overtaking anything. Pairs for one host go in
        one round trip (one script call); with several hosts (or hash slots of a Redis
        Cluster), each run of pairs for one host (slot) is a round trip of its own, in order.
        A sender with several messages waiting (a gateway draining its broker) uses this
        instead of one ``send`` per message.
        """
        runs: list[tuple[int, int, list[tuple[str, int, bytes, str]]]] = []
        for channel, message in messages:
            assert isinstance(message, dict), "message is not a dict"
            self.require_valid_channel_name(channel)
            index, key = self._where(channel)
            payload = msgpack.packb(message, use_bin_type=True)
            target = channel if "!" in channel else ""
            slot = self._slot(key)  # a Redis Cluster: one script call per slot
            if not runs or runs[-1][:2] != (index, slot):
                runs.append((index, slot, []))
            runs[-1][2].append((key, self.get_capacity(channel), payload, target))
        added = 0
        for index, _slot, run in runs:
            try:
                count = await self._writer(index).submit(_Op("many", args=tuple(run)))
            except redis_errors.ResponseError as exc:
                if _out_of_memory(exc):  # Redis at maxmemory: as a full channel
                    break
                raise
            added += count
            if count < len(run):
                break
        return added

    async def receive(self, channel: str) -> dict[str, Any]:
        """The next message on ``channel``, acknowledged as it is handed out (at-most-once).

        Handing it out is its handler's start: a redelivered message is counted
        (:meth:`begin`) first.
        """
        index, key = self._place(channel)
        reader = self._reader(index, key)
        while True:
            entry = await reader.get(channel)
            redelivered = entry.delivery > 1  # AckToken.redelivered, without building one
            if redelivered:
                token = AckToken(index, key, entry.entry_id, entry.delivery, entry.claimed)
                try:
                    delivery = await self.begin(token, entry.message)
                except BaseException:
                    reader.put_back(entry)  # a layer error or a cancel: it is not lost
                    raise
                if delivery is None:
                    continue  # dead-lettered
            if not reader.local:  # a process-local entry was deleted as it was fetched
                runs = self._runs_key(key) if redelivered else ""
                self._writer(index).acknowledge(key, entry.entry_id, runs)
            return entry.message

    def _place(self, channel: str) -> tuple[int, str]:
        """Where a receive on ``channel`` reads (checked once per channel name)."""
        place = self._places.get(channel)
        if place is None:
            self.require_valid_channel_name(channel)
            if "!" in channel:
                assert self.non_local_name(channel).endswith(self.client_prefix + "!"), (
                    "Wrong client prefix"
                )
            place = self._where(channel)
            if len(self._places) >= 10_000:
                self._places.clear()  # reply channels come and go: keep the cache bounded
            self._places[channel] = place
        return place

    async def receive_with_ack(self, channel: str) -> tuple[dict[str, Any], AckToken]:
        """The next message on ``channel`` and the token to :meth:`ack` it with.

        Until acknowledged the message stays pending in Redis; a handler that has not
        acknowledged it after ``redelivery_timeout`` gets it delivered again (to this or
        another process). The caller says when its handler starts: :meth:`begin` (which counts
        a redelivered message, ``token.redelivered``, sets its ``__delivery__`` and applies
        ``max_deliveries``); and when it holds the message a while before that:
        :meth:`hold`.
        """
        index, key = self._place(channel)
        entry = await self._reader(index, key).get(channel)
        return entry.message, AckToken(index, key, entry.entry_id, entry.delivery, entry.claimed)

    def receive_with_ack_nowait(self, channel: str) -> tuple[dict[str, Any], AckToken] | None:
        """:meth:`receive_with_ack` for a message this process fetched already, at once;
        ``None`` when there is none at hand (no wait, no Redis, never raises for Redis)."""
        state = self._loops.get(asyncio.get_running_loop())
        if state is None:
            return None
        index, key = self._place(channel)
        reader = state.readers.get((index, key))
        entry = reader.buffers.take(channel) if reader is not None else None
        if entry is None:
            return None
        return entry.message, AckToken(index, key, entry.entry_id, entry.delivery, entry.claimed)

    async def begin(self, token: AckToken, message: dict[str, Any]) -> int | None:
        """The handler of ``token``'s ``message`` starts now: its ``__delivery__``, or ``None``
        when it must not run.

        A first delivery is 1, at no cost. A redelivered message (``token.redelivered``) is
        counted in Redis first, awaited, so a process that dies in the handler has counted it:
        ``__delivery__`` is the number of times a handler took it, this one included, its
        first delivery counting one (whether or not that process reached the handler), and it
        is set on ``message``. When that would pass ``max_deliveries`` the message is
        dead-lettered and acknowledged instead, and this returns ``None``.
        """
        if not token.redelivered:
            return 1
        runs = self._runs_key(token.key)

        def call(pipe: Any) -> int:
            pipe.eval(_HANDOUT, 1, runs, token.entry_id, self.local_expiry)
            return 1

        handed = int(await self._writer(token.index).submit(_Op("call", call=call)))
        delivery = handed + 1  # the first delivery is not recorded (no round trip): it is one
        if delivery > self.max_deliveries:
            await self._give_up(token, message, handed)
            return None
        message[DELIVERY_KEY] = delivery
        return delivery

    def ack(self, token: AckToken) -> asyncio.Future[Any]:
        """Acknowledge (and delete) a delivered message. Queued at once; await to know it
        reached Redis (``True``: it was still there). Ends a :meth:`hold`."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is not None and (state.held or state.lost):
            ident = (token.index, token.key, token.entry_id)
            state.held.pop(ident, None)
            state.lost.discard(ident)
        if token.local:
            done = loop.create_future()
            done.set_result(True)
            return done
        runs = self._runs_key(token.key) if token.redelivered else ""
        return self._writer(token.index).submit(_Op("ack", token.key, (token.entry_id, runs, "")))

    def hold(self, token: AckToken) -> None:
        """Keep ``token``'s message claimed while the caller holds it before a handler runs
        (it waits for a busy consumer, or for a retry after a backoff), so that waiting does
        not count towards ``redelivery_timeout``. Until :meth:`release` or :meth:`ack`."""
        if token.local:
            return
        state = self._state()
        state.held[(token.index, token.key, token.entry_id)] = _Held(token.claimed)
        state.start_refresher(self)

    def release(self, token: AckToken) -> bool:
        """End a :meth:`hold`: a handler takes the message now. ``False`` when another
        consumer claimed it meanwhile (this process stalled for longer than
        ``redelivery_timeout``): it delivers it, so this one must not."""
        if token.local:
            return True
        state = self._loops.get(asyncio.get_running_loop())
        if state is None:
            return True
        ident = (token.index, token.key, token.entry_id)
        state.held.pop(ident, None)
        if ident in state.lost:
            state.lost.discard(ident)
            return False
        return True

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-local channel name, received on by this layer instance only."""
        return f"{prefix}.{self.client_prefix}!{uuid.uuid4().hex}"

    # -- redelivery: hand-outs counted, the cap, dead letters ----------------------------------

    async def _give_up(self, token: AckToken, message: dict[str, Any], handed: int) -> None:
        channel = self._stream_channel(token.key)
        what = _describe(message)
        reason = (
            f"handed to a receiver {handed} time(s) without an acknowledgement "
            f"(max_deliveries {self.max_deliveries}): its handler may kill its process"
        )
        target = None if "!" in channel else f"{channel}.dead"
        if target is not None:
            letter = {
                "type": DEAD_LETTER_TYPE,
                "channel": channel,
                "error": reason,
                "attempts": handed,
                "message": {k: v for k, v in message.items() if k != DELIVERY_KEY},
            }
            try:
                await self._send_patiently(target, letter)
            except Exception as exc:
                log.error(
                    "layer: gave up on %s from %r (%s), and could not send it to %r either "
                    "(%s); it stays pending and is claimed again later",
                    what,
                    channel,
                    reason,
                    target,
                    f"{type(exc).__name__}: {exc}",
                )
                return
        DROPPED.labels("max_deliveries").inc()
        log.error(
            "layer: gave up on %s from %r: %s; %s",
            what,
            channel,
            reason,
            f"sent to {target!r}" if target else "dropped (a process-local channel)",
        )
        self._writer(token.index).acknowledge(token.key, token.entry_id, self._runs_key(token.key))

    async def _send_patiently(
        self, channel: str, message: dict[str, Any], timeout: float = 10.0
    ) -> None:
        """``send``, retried while the channel is full or Redis unreachable, up to ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.05
        while True:
            try:
                await self.send(channel, message)
                return
            except (ChannelFull, redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    # -- keeping what waits here claimed -------------------------------------------------------

    async def _refresh_loop(self, state: _LoopState) -> None:
        """Every ``refresh_interval``: claim again (idle time 0) what this loop holds that was
        last claimed over an interval ago. Ends when nothing is held (restarted on demand)."""
        interval = self.refresh_interval
        while True:
            await asyncio.sleep(interval)
            tracked = state.tracked()
            if not tracked:
                return
            stale = time.monotonic() - interval
            due = {
                where: [entry_id for entry_id, claimed in items if claimed <= stale]
                for where, items in tracked.items()
            }
            due = {where: ids for where, ids in due.items() if ids}
            if due:
                await self._refresh(state, due)

    def _refresh_call(self, key: str, ids: list[str], idle_ms: int) -> Callable[[Any], int]:
        def call(pipe: Any) -> int:
            pipe.eval(_REFRESH, 1, key, GROUP, self.consumer, idle_ms, *ids)
            return 1

        return call

    async def _refresh(self, state: _LoopState, due: dict[tuple[int, str], list[str]]) -> None:
        started = time.monotonic()
        calls: list[tuple[int, str, list[str], asyncio.Future[Any]]] = []
        for (index, key), ids in due.items():
            for start in range(0, len(ids), REFRESH_CHUNK):
                chunk = ids[start : start + REFRESH_CHUNK]
                op = _Op("call", call=self._refresh_call(key, chunk, 0))
                calls.append((index, key, chunk, self._writer(index, state).submit(op)))
        for index, key, chunk, future in calls:
            try:
                reply = await future
            except Exception as exc:
                # Redis unreachable or the stream gone: tried again next time; a reader reports
                # an outage or a loss. What is held here is handed out either way.
                log.debug("layer: could not refresh %d entries on %r: %s", len(chunk), key, exc)
                continue
            lost = {_text(entry_id) for entry_id in reply}
            kept = set(chunk) - lost
            reader = state.readers.get((index, key))
            if reader is not None:
                for entry in reader.buffers.entries():
                    if entry.entry_id in kept:
                        entry.claimed = started
            for entry_id in kept:
                held = state.held.get((index, key, entry_id))
                if held is not None:
                    held.claimed = started
            if lost:
                self._lost_claims(state, index, key, lost, reader)

    def _lost_claims(
        self,
        state: _LoopState,
        index: int,
        key: str,
        lost: set[str],
        reader: _Reader | None,
    ) -> None:
        dropped = reader.buffers.remove(lost) if reader is not None else 0
        for entry_id in lost:
            if state.held.pop((index, key, entry_id), None) is not None:
                state.lost.add((index, key, entry_id))
        log.warning(
            "layer: %d message(s) on stream %r waiting in this process were claimed by another "
            "consumer (this process or Redis stalled for over redelivery_timeout=%ss); they are "
            "not handed out here (%d dropped from the buffer, %d held by the worker)",
            len(lost),
            key,
            self.redelivery_timeout,
            dropped,
            len(lost) - dropped,
        )

    # -- lost data -----------------------------------------------------------------------------

    def _candidate(self, index: int, marker: str) -> str:
        """The value a script sets ``marker`` on host ``index`` to if the marker is missing."""
        candidate = self._candidates.get((index, marker))
        if candidate is None:
            if len(self._candidates) >= CLUSTER_SLOTS:
                self._candidates.clear()
            candidate = self._candidates[(index, marker)] = uuid.uuid4().hex
        return candidate

    def _saw_epoch(self, index: int, marker: str, seen: Any, candidate: str) -> None:
        """A script read ``marker`` on host ``index`` (``seen``; ``None``: it set
        ``candidate``)."""
        where = (index, marker)
        if seen:
            current = _text(seen)
            if current == self._candidates.get(where):
                # ours, set by a script whose reply never came back (it failed after setting it)
                self._candidates.pop(where, None)
        else:
            current = candidate
            self._candidates.pop(where, None)  # used: the next script gets a new one
        known = self._epochs.get(where)
        if known == current or current in self._retired:
            return  # the same dataset (or a late reply from before a loss already reported)
        self._epochs[where] = current
        if known is None:
            return
        if len(self._retired) > 100:
            self._retired.clear()
        self._retired.add(known)
        host = self._host_name(index)
        self._vanished(
            "dataset",
            f"the data on Redis {host} is gone: its marker key {marker!r} vanished or "
            "changed under this process (Redis restarted without persistence, FLUSHALL or "
            "FLUSHDB, or a failover to an empty replica); every message that was waiting, "
            "pending or in flight there is lost",
            f"Redis {host} lost its data (marker {marker!r} vanished)",
        )

    def _host_name(self, index: int) -> str:
        host = self.hosts[index]
        if "address" in host:
            return describe_layer(str(host["address"]))
        if "master_name" in host:
            return f"sentinel master {host['master_name']!r}"
        if "cluster" in host:
            return "Cluster " + describe_cluster(host["cluster"])
        return f"host {index}"

    def _vanished(self, what: str, text: str, reason: str | None = None) -> None:
        VANISHED.labels(what).inc()
        log.error("layer: %s", text)
        if len(self._problems) >= 100:
            self._problems.pop(next(iter(self._problems)))
        self._problems[reason or text] = time.monotonic()

    def health_problems(self) -> list[str]:
        """What keeps this layer from being healthy, for ``/readyz`` (``[]``: nothing).

        Data found lost in Redis (a host's dataset, or a stream under its reader; see the
        module docstring) stays here for :data:`PROBLEM_PERIOD` seconds after it was last
        seen, so a probe sees it without the process staying unready for ever; the ERROR line
        and ``gateway_layer_vanished_total`` keep it for good.
        """
        now = time.monotonic()
        for reason in [r for r, at in self._problems.items() if now - at > PROBLEM_PERIOD]:
            del self._problems[reason]
        return [f"layer: {reason} {now - at:.0f} s ago" for reason, at in self._problems.items()]

    # -- groups --------------------------------------------------------------------------------

    def _group_key(self, group: str) -> str:
        return f"{self.prefix}:group:{group}"

    def _group_writer(self, group: str) -> _Writer:
        return self._writer(_ring_index(group, self.ring_size))

    async def group_add(self, group: str, channel: str) -> None:
        """Add ``channel`` to ``group`` for ``group_expiry`` seconds."""
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        key = self._group_key(group)

        def call(pipe: Any) -> int:
            pipe.zadd(key, {channel: time.time()})
            pipe.expire(key, self.group_expiry)
            return 2

        await self._group_writer(group).submit(_Op("call", call=call))

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group`` (nothing if it is not a member)."""
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        key = self._group_key(group)

        def call(pipe: Any) -> int:
            pipe.zrem(key, channel)
            return 1

        await self._group_writer(group).submit(_Op("call", call=call))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send ``message`` to every member of ``group``.

        The process-local members of one process share one entry (see the module docstring).
        A member whose channel is full does not get it: counted
        (``gateway_layer_dropped_total{reason="group_full"}``) and logged at WARNING.
        """
        self.require_valid_group_name(group)
        payload = msgpack.packb(message, use_bin_type=True)
        key = self._group_key(group)
        writer = self._group_writer(group)
        if self.ring_size == 1 and not self.channel_capacity and not self._cluster:
            members, full, missed = await writer.submit(_Op("group", key, (payload,)))
        else:
            members, full, missed = await self._group_send_sharded(writer, key, payload)
        if full:
            self._group_full(group, members, full, missed)

    async def _group_send_sharded(
        self, writer: _Writer, key: str, payload: bytes
    ) -> tuple[int, int, list[str]]:
        horizon = time.time() - self.group_expiry

        def read(pipe: Any) -> int:
            pipe.zremrangebyscore(key, 0, horizon)
            pipe.zrange(key, 0, -1)
            return 2

        members = [_text(m) for m in await writer.submit(_Op("call", call=read))]
        targets: dict[str, list[str]] = {}  # by stream: normal channels alone, locals together
        for channel in members:
            targets.setdefault(self.non_local_name(channel), []).append(channel)
        sends: list[tuple[list[str], Awaitable[Any]]] = []
        for names in targets.values():
            index, stream = self._where(names[0])
            room = max(self.get_capacity(name) for name in names)
            target = ",".join(names) if "!" in names[0] else ""
            op = _Op("send", stream, (room, payload, target))
            sends.append((names, self._writer(index).submit(op)))
        accepted = await asyncio.gather(*(answer for _, answer in sends))
        missed = [
            name for (names, _), ok in zip(sends, accepted, strict=True) if not ok for name in names
        ]
        return len(members), len(missed), missed[:10]

    def _group_full(self, group: str, members: int, full: int, missed: list[str]) -> None:
        DROPPED.labels("group_full").inc(full)
        report = self._group_reports.get(group)
        if report is not None:  # logged less than GROUP_FULL_REPORT s ago: summed up later
            report.members += full
            report.messages += 1
            return
        self._group_reports[group] = _GroupReport()
        asyncio.get_running_loop().call_later(GROUP_FULL_REPORT, self._report_group, group)
        log.warning(
            "layer: group_send to %r reached %d of %d member(s): %d channel(s) full (%s); the "
            "message is lost for them",
            group,
            members - full,
            members,
            full,
            ", ".join(repr(name) for name in missed) + (", …" if full > len(missed) else ""),
        )

    def _report_group(self, group: str) -> None:
        report = self._group_reports.pop(group, None)
        if report is None or not report.members:
            return
        log.warning(
            "layer: group_send to %r: %d more member delivery(ies) refused (full channels) in "
            "%d message(s) over the last %.0f s",
            group,
            report.members,
            report.messages,
            GROUP_FULL_REPORT,
        )
        self._group_reports[group] = _GroupReport()
        asyncio.get_running_loop().call_later(GROUP_FULL_REPORT, self._report_group, group)

    # -- flush and close -----------------------------------------------------------------------

    async def flush(self) -> None:
        """Delete every stream and group under the prefix on every host, then close."""
        pattern = f"{self.prefix}:*"

        def delete(pipe: Any) -> int:
            pipe.eval(_DELETE_PREFIX, 0, pattern)
            return 1

        # this loop's fetches stop first: the streams they read vanishing is no loss to report
        readers = [r.task for r in self._state().readers.values() if r.task is not None]
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for index in range(self.ring_size):
            if self._cluster:  # on every master (the script finds its keys with SCAN)
                client = cast(Any, self._writer(index).client)
                await client.initialize()
                for node in client.get_primaries():
                    await client.execute_command(
                        "EVAL", _DELETE_PREFIX, 0, pattern, target_nodes=node
                    )
            else:
                await self._writer(index).submit(_Op("call", call=delete))
        self._epochs.clear()  # deleted on purpose: a new marker is no loss to report
        await self._close(give_back=False)

    async def close_pools(self) -> None:
        """Stop this event loop's fetches and writers and close their connections.

        What this process fetched and did not hand to a handler (its buffers, and entries
        held with :meth:`hold`) is handed back to the group first, claimable by the next
        fetch of any consumer at once; acknowledgements still queued are written.
        """
        await self._close(give_back=True)

    async def _close(self, *, give_back: bool) -> None:
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is None:
            return
        tasks = [r.task for r in state.readers.values() if r.task is not None]
        if state.refresher is not None:
            tasks.append(state.refresher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if give_back:
            idle = GIVE_BACK_IDLE_MS
            for (index, key), items in state.tracked().items():
                ids = [entry_id for entry_id, _ in items]
                for start in range(0, len(ids), REFRESH_CHUNK):
                    chunk = ids[start : start + REFRESH_CHUNK]
                    op = _Op("call", call=self._refresh_call(key, chunk, idle))
                    self._writer(index, state).submit(op).add_done_callback(_retrieve)
        for writer in state.writers.values():
            if writer.acks or writer.queue:
                writer.kick()  # acknowledgements waiting for their delay go now
        writers = [w.task for w in state.writers.values() if w.task is not None]
        await asyncio.gather(*writers, return_exceptions=True)  # let queued writes finish
        for reader in state.readers.values():
            if reader.read_client is not reader.client:  # its connection goes back to the pool
                await reader.read_client.aclose()
        for client in [w.client for w in state.writers.values()] + [*state.fetch_clients.values()]:
            if self._cluster:  # its own connections per node, closed with it
                await cast(Any, client).aclose()
            else:
                await client.aclose(close_connection_pool=True)
        for sentinel in state.sentinels:
            for client in sentinel.sentinels:
                await client.aclose()

    # -- counting what is dropped --------------------------------------------------------------

    def _count_trims(self, trims: list[Any]) -> None:
        for key, count in zip(trims[::2], trims[1::2], strict=True):
            DROPPED.labels("expired").inc(int(count))
            log.warning(
                "layer: %d message(s) on stream %r were older than expiry=%ss: dropped",
                count,
                _text(key),
                self.expiry,
            )

    def _overflowed(self, entry: _Entry) -> None:
        """A process-local channel's buffer was full (nobody receives on it, or too slowly):
        its oldest message is dropped. Counted each time; logged once, then summed up every
        GROUP_FULL_REPORT seconds (a dead socket still in a room would log every broadcast)."""
        DROPPED.labels("local_overflow").inc()
        if self._overflows is not None:
            self._overflows[0] += 1
            self._overflows[1].add(entry.channel)
            return
        self._overflows = [0, set()]
        asyncio.get_running_loop().call_later(GROUP_FULL_REPORT, self._report_overflows)
        log.warning(
            "layer: dropped message %s on %r: local_overflow (its buffer holds capacity=%d "
            "messages nobody took)",
            entry.entry_id,
            entry.channel,
            self.get_capacity(entry.channel),
        )

    def _report_overflows(self) -> None:
        overflows, self._overflows = self._overflows, None
        if overflows is None or not overflows[0]:
            return
        count, channels = overflows
        log.warning(
            "layer: dropped %d more message(s) on %d process-local channel(s) whose buffers were "
            "full (local_overflow) over the last %.0f s",
            count,
            len(channels),
            GROUP_FULL_REPORT,
        )
        self._overflows = [0, set()]
        asyncio.get_running_loop().call_later(GROUP_FULL_REPORT, self._report_overflows)

    def _drop(
        self,
        reason: str,
        channel: str,
        entry: _Entry,
        *,
        quiet: bool = False,
        index: int | None = None,
        key: str = "",
    ) -> None:
        """Count (and log) a dropped entry; with ``index``, acknowledge it in Redis too (a
        process-local entry is deleted as it is fetched)."""
        DROPPED.labels(reason).inc()
        if not quiet:
            log.warning("layer: dropped message %s on %r: %s", entry.entry_id, channel, reason)
        if index is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # dropped outside a loop: it is claimed again, then dropped again
            return
        runs = self._runs_key(key) if entry.delivery > 1 else ""
        self._writer(index).acknowledge(key, entry.entry_id, runs)


def _out_of_memory(exc: Exception) -> bool:
    """Redis at ``maxmemory`` (policy ``noeviction``) refuses writes with ``OOM …``."""
    return isinstance(exc, redis_errors.OutOfMemoryError) or str(exc).startswith("OOM")


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Done-callback of a write nobody waits for: its failure only delays a redelivery."""
    if not future.cancelled():
        future.exception()
