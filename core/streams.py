"""A channel layer on Redis Streams: batched round trips, acknowledged delivery, no silent expiry.

``redis+streams://host:6379/0`` layer paths resolve to :class:`StreamsChannelLayer`
(core/layers.py). It keeps the whole channel layer contract (``send``, ``receive``,
``new_channel``, groups, ``flush``, ``capacity`` and ``channel_capacity`` with ``ChannelFull``,
``!`` process-local channels, several hosts, Sentinel hosts) and changes how Redis is used.

House rules:

* **One stream per channel** (``{prefix}:stream:{channel}``), one consumer group
  (:data:`GROUP`) on each, one consumer name per layer instance. Process-local channels
  (``name.CLIENT!xyz``) share their process's stream ``{prefix}:stream:name.CLIENT!``, the target
  channel in the entry's ``c`` field, like channels_redis' shared list. Channels are placed on a
  host by a CRC32 ring of the non-local name (all channels, not only ``!`` ones: a stream has one
  home, where its consumer group lives).
* **One writer per host and event loop.** ``send``, ``group_send``, acks and group edits go on a
  queue; one task takes everything queued and runs it as *one* pipeline, the sends and acks of
  a batch in one Lua script that checks each stream's length against its capacity before the
  ``XADD``, so ``ChannelFull`` is exact and each caller gets its own answer. A thousand
  concurrent senders cost a few round trips, on one connection (redis-py 8's 100-connection
  pool limit cannot be reached).
* **Ordered batches.** :meth:`StreamsChannelLayer.send_many` appends a run of messages in one
  round trip and stops at the first full channel (a prefix is appended, never a message after
  a refused one): ``core.service.Gateway.publish_many`` hands a gateway's backlog over that way.
* **Receiving fetches a batch.** One fetch task per stream runs ``XREADGROUP COUNT batch BLOCK``
  while somebody waits on that stream and hands the entries out in order. What was fetched is in
  the group's pending-entry list (PEL) until acknowledged, so a process that dies with a fetched
  batch in memory loses nothing: see redelivery.
* **Acknowledgement.** :meth:`StreamsChannelLayer.receive` acknowledges an entry when it hands it
  to its caller (at-most-once from there on: a caller that dies while handling it loses it, as
  with every channels layer). :meth:`StreamsChannelLayer.receive_with_ack` hands out
  ``(message, token)`` and leaves the entry pending until :meth:`StreamsChannelLayer.ack`;
  ``core.worker.ConsumerWorker`` acknowledges after the consumer's handler returned. An
  acknowledged entry is deleted (``XACK`` + ``XDEL``), so a stream's length is exactly what is
  waiting or in hand, and that is what capacity bounds.
* **Redelivery.** Entries pending for longer than ``redelivery_timeout`` seconds (their
  consumer died, or holds them that long) are claimed (``XAUTOCLAIM``) by the next fetch of any
  consumer of that stream and delivered again, with their ``id`` and every other key unchanged
  and ``__delivery__`` set to the delivery count (2, 3, …). ``redelivery_timeout`` must exceed the
  longest handler, or a slow handler's message is delivered twice.
* **Nothing expires in silence.** ``expiry`` defaults to ``None``: capacity bounds a channel,
  nothing is dropped for age. With ``expiry=N``, entries older than N s are trimmed at the next
  send to their stream or dropped at fetch; either way they are counted
  (``gateway_layer_dropped{reason="expired"}``) and logged. Other drops, counted and logged the
  same way: entries that cannot be decoded (``undecodable``), entries for a process-local
  channel nobody receives on beyond ``capacity`` (``local_overflow``), pending entries deleted
  before their claim (``deleted_pending``).
* A process-local stream nobody sent to for ``local_expiry`` seconds (a day) is removed by Redis
  key expiry: its process is gone or did not read it for that long.
"""

from __future__ import annotations

import asyncio
import binascii
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, cast

import msgpack
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer
from channels_redis.utils import decode_hosts
from prometheus_client import Counter
from redis import asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from core.metrics import REGISTRY

__all__ = ["DELIVERY_KEY", "GROUP", "AckToken", "StreamsChannelLayer"]

log = logging.getLogger("gateway.layer")

#: the consumer group every stream has
GROUP: Final = "channels"
#: key set on a redelivered message: how many times it has been delivered (2, 3, …)
DELIVERY_KEY: Final = "__delivery__"
#: operations in one writer pipeline at most
MAX_BATCH: Final = 1000
#: acknowledgements waiting before they go without a send to carry them
ACK_BATCH: Final = 200
#: seconds an acknowledgement waits at most for a batch to join
ACK_DELAY: Final = 0.01
#: seconds to wait for a TCP connection to Redis
CONNECT_TIMEOUT: Final = 3.0
#: connections for fetches per host (one per stream being received at once)
FETCH_POOL_SIZE: Final = 10_000

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

# One stream entry: create the stream and its group if missing, check capacity, append.
# Used by the batch script and the group script; returns 1 when added, 0 when full.
_ADD = """
local function add(key, capacity, payload, channel, local_ttl)
    local length = redis.call('XLEN', key)
    if length == 0 and redis.call('EXISTS', key) == 0 then
        redis.call('XGROUP', 'CREATE', key, 'channels', '0', 'MKSTREAM')
    end
    if length >= capacity then
        return 0
    end
    if channel == '' then
        redis.call('XADD', key, '*', 'm', payload)
    else
        redis.call('XADD', key, '*', 'm', payload, 'c', channel)
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

# KEYS: one stream per operation. ARGV[1] expiry ms (0: none), ARGV[2] local TTL, then four
# values per operation: 's', capacity, payload, channel ('' unless process-local) for a send;
# 'oN', the same three, for a send that is part N of an ordered sequence (``send_many``): once
# one send of a sequence found its stream full, the rest of that sequence is not added;
# 'a', entry id, '', '' for an acknowledgement. Returns {results, {key, trimmed, …}}.
_BATCH = (
    _ADD
    + """
local results = {}
local stopped = {}
for i = 1, #KEYS do
    local key = KEYS[i]
    local base = 4 * i - 1
    local op = ARGV[base]
    if op == 's' then
        trim(key)
        results[i] = add(key, tonumber(ARGV[base + 1]), ARGV[base + 2], ARGV[base + 3], ARGV[2])
    elseif string.sub(op, 1, 1) == 'o' then
        if stopped[op] then
            results[i] = 0
        else
            trim(key)
            results[i] = add(key, tonumber(ARGV[base + 1]), ARGV[base + 2], ARGV[base + 3],
                ARGV[2])
            if results[i] == 0 then
                stopped[op] = true
            end
        end
    else
        redis.call('XACK', key, 'channels', ARGV[base + 1])
        results[i] = redis.call('XDEL', key, ARGV[base + 1])
    end
end
return {results, trims}
"""
)

# group_send on a single host without per-channel capacities: read the members and append to
# each member's stream in one call. KEYS[1] group key; ARGV[1] expiry ms, ARGV[2] local TTL,
# ARGV[3] stream key prefix, ARGV[4] payload, ARGV[5] capacity, ARGV[6] group expiry (s).
# Returns {members, full, {key, trimmed, …}}.
_GROUP = (
    _ADD
    + """
local now = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, tonumber(now[1]) - tonumber(ARGV[6]))
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local full = 0
for _, channel in ipairs(members) do
    local bang = string.find(channel, '!', 1, true)
    local key
    local target = ''
    if bang then
        key = ARGV[3] .. string.sub(channel, 1, bang)
        target = channel
    else
        key = ARGV[3] .. channel
    end
    trim(key)
    if add(key, tonumber(ARGV[5]), ARGV[4], target, ARGV[2]) == 0 then
        full = full + 1
    end
end
return {#members, full, trims}
"""
)

# Claim entries pending longer than ARGV[3] ms, with their delivery counts.
# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] min idle ms, ARGV[4] start, ARGV[5]
# count, ARGV[6] idle ms after which a consumer with nothing pending is deleted.
# Returns {next start, {{id, fields, deliveries}, …}, deleted count}.
_CLAIM = """
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
    'COUNT', ARGV[5])
local out = {}
for _, entry in ipairs(claimed[2]) do
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
    local count = 1
    if pending[1] then
        count = pending[1][4]
    end
    table.insert(out, {entry[1], entry[2], count})
end
local deleted = 0
if claimed[3] then
    deleted = #claimed[3]
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
return {claimed[1], out, deleted}
"""

_DELETE_PREFIX = """
local cursor = '0'
repeat
    local found = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
    cursor = found[1]
    if #found[2] > 0 then
        redis.call('DEL', unpack(found[2]))
    end
until cursor == '0'
"""


def _ring_index(value: str, ring_size: int) -> int:
    """The host of ``value`` on a ring of ``ring_size`` hosts (CRC32, like channels_redis)."""
    if ring_size == 1:
        return 0
    return int((binascii.crc32(value.encode()) & 0xFFF) / (4096 / ring_size))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class AckToken:
    """What :meth:`StreamsChannelLayer.ack` needs to acknowledge one delivered message."""

    index: int
    key: str
    entry_id: str
    #: how many times this message has been delivered (1 the first time)
    delivery: int


@dataclasses.dataclass
class _Entry:
    entry_id: str
    channel: str
    message: dict[str, Any] | None
    delivery: int
    error: str = ""
    index: int = 0
    key: str = ""


class _Buffers(dict[str, deque[_Entry]]):
    """Fetched entries not handed out yet, by channel; ``held`` has their (stream, id).

    For process-local channels it is the layer's ``receive_buffer``, shaped like channels_redis'
    (``gateways/http_ws`` drops the buffers of its finished reply channels with ``pop``): popping
    a channel here drops what it holds for good (acknowledged, counted, logged), or it would come
    back at the next claim.
    """

    def __init__(self, layer: StreamsChannelLayer) -> None:
        super().__init__()
        self.layer = layer
        self.held: set[tuple[str, str]] = set()

    def take(self, channel: str) -> _Entry | None:
        buffer = self.get(channel)
        if not buffer:
            return None
        entry = buffer.popleft()
        self.held.discard((entry.key, entry.entry_id))
        return entry

    def put(self, entry: _Entry) -> bool:
        if (entry.key, entry.entry_id) in self.held:
            return False  # our own, claimed back while it waited here
        self.setdefault(entry.channel, deque()).append(entry)
        self.held.add((entry.key, entry.entry_id))
        return True

    def pop(self, channel: str, *default: Any) -> Any:
        entries = super().pop(channel, *default)
        for entry in entries or ():
            self.held.discard((entry.key, entry.entry_id))
            self.layer._drop("local_overflow", channel, entry, entry.index, entry.key, quiet=True)
        return entries


@dataclasses.dataclass
class _Op:
    kind: str  # "send", "many", "ack", "group", "call"
    key: str = ""
    #: send: (capacity, payload, target); ack: (entry id, "", ""); many: ((key, capacity,
    #: payload, target), …); group: (payload, capacity)
    args: tuple[Any, ...] = ()
    #: queues this operation's commands on a pipeline; returns how many (the last one answers)
    call: Callable[[Any], int] | None = None
    future: asyncio.Future[Any] | None = None


#: operations that go into the batch script
_STREAM_OPS: Final = ("send", "many", "ack")


class _Writer:
    """Everything one event loop writes to one host, batched into one pipeline per round trip."""

    def __init__(self, layer: StreamsChannelLayer, client: aioredis.Redis) -> None:
        self.layer = layer
        self.client = client
        self.queue: deque[_Op] = deque()
        #: acknowledgements wait for the next batch, or ACK_DELAY: nobody waits for them, and
        #: one at a time (a worker acknowledges as each handler returns) they would each make a
        #: round trip of their own
        self.acks: list[_Op] = []
        self.task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def acknowledge(self, key: str, entry_id: str) -> None:
        """Queue an acknowledgement nobody waits for (a failure only delays it: redelivery)."""
        self.acks.append(_Op("ack", key, (entry_id, "", "")))
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
                self._fail(batch, exc)

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
        pipe = self.client.pipeline(transaction=False)
        stream_ops = [op for op in batch if op.kind in _STREAM_OPS]
        other_ops = [op for op in batch if op.kind not in _STREAM_OPS]
        if stream_ops:
            argv: list[Any] = [layer._expiry_ms, layer.local_expiry]
            keys: list[str] = []
            for number, op in enumerate(stream_ops):
                if op.kind == "many":
                    for key, *args in op.args:
                        keys.append(key)
                        argv += [f"o{number}", *args]
                else:
                    keys.append(op.key)
                    argv += ["s" if op.kind == "send" else "a", *op.args]
            if other_ops:
                pipe.eval(_BATCH, len(keys), *keys, *argv)
        spans: list[int] = []
        for op in other_ops:
            spans.append(1)
            if op.kind == "group":
                payload, capacity = op.args
                pipe.eval(
                    _GROUP,
                    1,
                    op.key,
                    layer._expiry_ms,
                    layer.local_expiry,
                    layer._stream_prefix,
                    payload,
                    capacity,
                    layer.group_expiry,
                )
            else:
                assert op.call is not None
                spans[-1] = op.call(pipe)
        if other_ops:
            replies = await pipe.execute(raise_on_error=False)
        else:  # the common case: one script call, without the pipeline's overhead
            try:
                replies = [await self.client.eval(_BATCH, len(keys), *keys, *argv)]
            except redis_errors.ResponseError as exc:
                replies = [exc]
        position = 0
        if stream_ops:
            reply = replies[0]
            position = 1
            if isinstance(reply, Exception):
                self._fail(stream_ops, reply)
            else:
                results, trims = reply
                layer._count_trims(trims)
                answers = iter(results)
                for op in stream_ops:
                    if op.kind == "many":  # how many were added: a prefix of the sequence
                        answer: Any = sum(next(answers) for _ in op.args)
                    else:
                        answer = bool(next(answers))
                    if op.future is not None and not op.future.done():
                        op.future.set_result(answer)
        for op, span in zip(other_ops, spans, strict=True):
            answers = replies[position : position + span]
            position += span
            failed = [a for a in answers if isinstance(a, Exception)]
            reply = failed[0] if failed else answers[-1]
            if op.future is None or op.future.done():
                continue
            if isinstance(reply, Exception):
                op.future.set_exception(reply)
                continue
            if op.kind == "group":
                layer._count_trims(reply[2])
            op.future.set_result(reply)


class _Reader:
    """Fetches one stream for this event loop and hands the entries out in order."""

    def __init__(
        self, layer: StreamsChannelLayer, index: int, key: str, client: aioredis.Redis
    ) -> None:
        self.layer = layer
        self.index = index
        self.key = key
        self.client = client
        self.local = key.endswith("!")
        self.buffers = layer.receive_buffer if self.local else _Buffers(layer)
        self.waiting: dict[str, int] = {}
        self.changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.next_claim = 0.0
        self.claim_start = "0-0"

    async def get(self, channel: str) -> _Entry:
        entry = self.buffers.take(channel)
        if entry is not None:  # the common case under load: no lock, no wait
            return entry
        async with self.changed:
            self.waiting[channel] = self.waiting.get(channel, 0) + 1
            try:
                while True:
                    if (entry := self.buffers.take(channel)) is not None:
                        return entry
                    if self.error is not None:
                        error, self.error = self.error, None
                        raise error
                    if self.task is None or self.task.done():
                        self.task = asyncio.get_running_loop().create_task(self._fetch_loop())
                    await self.changed.wait()
            except asyncio.CancelledError:
                if self.waiting[channel] == 1 and len(self.waiting) == 1 and self.task is not None:
                    # nobody waits any more: a fetch left running would take messages another
                    # consumer waits for, and hold them until redelivery_timeout
                    self.task.cancel()
                raise
            finally:
                self.waiting[channel] -= 1
                if not self.waiting[channel]:
                    del self.waiting[channel]

    def _wanted(self) -> bool:
        return any(not self.buffers.get(channel) for channel in self.waiting)

    async def _fetch_loop(self) -> None:
        try:
            while self._wanted():
                entries = await self._fetch()
                async with self.changed:
                    for entry in entries:
                        self._buffer(entry)
                    self.changed.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            async with self.changed:
                self.error = exc
                self.changed.notify_all()

    def _buffer(self, entry: _Entry) -> None:
        if not self.buffers.put(entry) or not self.local:
            return
        if len(self.buffers[entry.channel]) > self.layer.get_capacity(entry.channel):
            dropped = self.buffers.take(entry.channel)
            assert dropped is not None
            self.layer._drop("local_overflow", dropped.channel, dropped, self.index, self.key)
        if len(self.buffers) > 10_000:
            # channels nobody receives on any more: keep the map itself bounded
            stale = [c for c in self.buffers if c not in self.waiting][:1000]
            log.warning("layer: dropping the buffers of %d idle local channels", len(stale))
            for channel in stale:
                self.buffers.pop(channel)

    async def _fetch(self) -> list[_Entry]:
        layer = self.layer
        now = time.monotonic()
        if now >= self.next_claim:
            self.next_claim = now + layer.claim_interval
            claimed = await self._claim()
            if claimed:
                return claimed
        block = max(1, int((self.next_claim - time.monotonic()) * 1000))
        try:
            reply: Any = await self.client.xreadgroup(
                GROUP, layer.consumer, {self.key: ">"}, count=layer.batch, block=block
            )
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            await self._create_group()
            return []
        entries: list[_Entry] = []
        for _key, items in reply or []:
            for entry_id, fields in items:
                entry = self._decode(_text(entry_id), fields, 1)
                if entry is not None:
                    entries.append(entry)
        return entries

    async def _claim(self) -> list[_Entry]:
        layer = self.layer
        try:
            start, claimed, deleted = await self.client.eval(
                _CLAIM,
                1,
                self.key,
                GROUP,
                layer.consumer,
                int(layer.redelivery_timeout * 1000),
                self.claim_start,
                layer.batch,
                int(layer.consumer_expiry * 1000),
            )
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._create_group()
            return []
        self.claim_start = _text(start)
        if deleted:
            DROPPED.labels("deleted_pending").inc(deleted)
            log.error(
                "layer: %d pending message(s) on stream %r were deleted before anyone "
                "acknowledged them (expiry or a manual XDEL)",
                deleted,
                self.key,
            )
        entries: list[_Entry] = []
        for entry_id, flat, count in claimed:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            entry = self._decode(_text(entry_id), fields, int(count))
            if entry is not None:
                entries.append(entry)
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

    async def _create_group(self) -> None:
        try:
            await self.client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        if self.local:
            await self.client.expire(self.key, self.layer.local_expiry)

    def _decode(self, entry_id: str, fields: dict[Any, Any], delivery: int) -> _Entry | None:
        layer = self.layer
        raw_channel = fields.get(b"c")
        channel = _text(raw_channel) if raw_channel else self.key[len(layer._stream_prefix) :]
        if layer.expiry:
            born = int(entry_id.partition("-")[0]) / 1000
            if born < time.time() - layer.expiry:
                entry = _Entry(entry_id, channel, None, delivery, "", self.index, self.key)
                layer._drop("expired", channel, entry, self.index, self.key)
                return None
        try:
            message = msgpack.unpackb(fields[b"m"], raw=False)
            if not isinstance(message, dict):
                raise ValueError(f"not a dict but {type(message).__name__}")
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            return _Entry(entry_id, channel, None, delivery, error, self.index, self.key)
        if delivery > 1:
            message[DELIVERY_KEY] = delivery
        return _Entry(entry_id, channel, message, delivery, "", self.index, self.key)


@dataclasses.dataclass
class _LoopState:
    writers: dict[int, _Writer] = dataclasses.field(default_factory=dict)
    readers: dict[tuple[int, str], _Reader] = dataclasses.field(default_factory=dict)
    fetch_clients: dict[int, aioredis.Redis] = dataclasses.field(default_factory=dict)
    sentinels: list[Any] = dataclasses.field(default_factory=list)


class StreamsChannelLayer(BaseChannelLayer):  # type: ignore[misc]
    """A channels layer on Redis Streams; see the module docstring.

    Options (Django ``CONFIG`` keys, and query parameters of ``redis+streams://`` paths):

    * ``hosts``: as channels_redis (``[{"address": "redis://…"}]``, ``(host, port)`` pairs,
      or Sentinel hosts ``{"sentinels": [(h, p)], "master_name": "…"}``);
    * ``prefix`` (``"asgi"``), ``capacity`` (100), ``channel_capacity`` (``{glob: n}``),
      ``group_expiry`` (86400 s): as channels_redis;
    * ``expiry`` (``None``: never): seconds after which a waiting message is dropped, counted
      and logged;
    * ``redelivery_timeout`` (30 s): a message fetched but not acknowledged for this long is
      delivered again to whichever consumer fetches next;
    * ``batch`` (100): entries one fetch takes at most;
    * ``local_expiry`` (86400 s): TTL of a process-local stream, renewed by each send to it;
    * ``consumer_expiry`` (3600 s): a consumer (one per layer instance and stream) idle this long
      with nothing pending is removed from the stream's group, so dead processes do not pile up.
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
    ) -> None:
        super().__init__(expiry=expiry, capacity=capacity)
        if redelivery_timeout <= 0 or batch <= 0 or capacity <= 0:
            raise ValueError("redelivery_timeout, batch and capacity must be positive")
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self.prefix = prefix
        self.group_expiry = group_expiry
        self.redelivery_timeout = float(redelivery_timeout)
        #: how often a fetching reader looks for messages to claim
        self.claim_interval = max(0.05, self.redelivery_timeout / 2)
        self.batch = batch
        self.local_expiry = local_expiry
        #: seconds after which a stream's consumer (a process) holding nothing is forgotten
        self.consumer_expiry = consumer_expiry
        self.hosts = decode_hosts(hosts)
        self.ring_size = len(self.hosts)
        #: the ``!`` part of this instance's process-local channels
        self.client_prefix = uuid.uuid4().hex
        #: this instance's consumer name in every stream's group
        self.consumer = f"{self.client_prefix}"
        self._stream_prefix = f"{prefix}:stream:"
        #: fetched messages of process-local channels not handed out yet, by channel
        self.receive_buffer = _Buffers(self)
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}

    @property
    def _expiry_ms(self) -> int:
        return int(self.expiry * 1000) if self.expiry else 0

    def __str__(self) -> str:
        return f"{type(self).__name__}(hosts={len(self.hosts)}, prefix={self.prefix!r})"

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
                del self._loops[old]
            state = self._loops[loop] = _LoopState()
        return state

    def _writer(self, index: int) -> _Writer:
        state = self._state()
        writer = state.writers.get(index)
        if writer is None:
            # two connections: the writer's pipeline, and a spare while one reconnects
            client = aioredis.Redis(connection_pool=self._pool(index, 2, blocking=True))
            writer = state.writers[index] = _Writer(self, client)
        return writer

    def _reader(self, index: int, key: str) -> _Reader:
        state = self._state()
        reader = state.readers.get((index, key))
        if reader is None:
            client = state.fetch_clients.get(index)
            if client is None:
                pool = self._pool(index, FETCH_POOL_SIZE)
                client = state.fetch_clients[index] = aioredis.Redis(connection_pool=pool)
            reader = state.readers[(index, key)] = _Reader(self, index, key, client)
        return reader

    def connection(self, index: int) -> aioredis.Redis:
        """A client for host ``index`` (for :func:`core.layers.probe_layer`'s PING)."""
        return self._writer(index).client

    def _where(self, channel: str) -> tuple[int, str]:
        non_local = self.non_local_name(channel)
        return _ring_index(non_local, self.ring_size), self._stream_prefix + non_local

    # -- the channel layer API -----------------------------------------------------------------

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Append ``message`` to ``channel``; ``ChannelFull`` when it holds ``capacity``."""
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        payload = msgpack.packb(message, use_bin_type=True)
        index, key = self._where(channel)
        target = channel if "!" in channel else ""
        op = _Op("send", key, (self.get_capacity(channel), payload, target))
        if not await self._writer(index).submit(op):
            raise ChannelFull(channel)

    async def send_many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> int:
        """Append ``(channel, message)`` pairs in order; stop at the first channel that is full.

        Returns how many were appended: always a prefix of ``messages``, so whatever is not
        appended can be sent again later without overtaking anything. Pairs for one host go in
        one round trip (one script call); with several hosts, each run of pairs for one host is
        a round trip of its own, in order. A sender with several messages waiting (a gateway
        draining its broker) uses this instead of one ``send`` per message.
        """
        runs: list[tuple[int, list[tuple[str, int, bytes, str]]]] = []
        for channel, message in messages:
            assert isinstance(message, dict), "message is not a dict"
            self.require_valid_channel_name(channel)
            index, key = self._where(channel)
            payload = msgpack.packb(message, use_bin_type=True)
            target = channel if "!" in channel else ""
            if not runs or runs[-1][0] != index:
                runs.append((index, []))
            runs[-1][1].append((key, self.get_capacity(channel), payload, target))
        added = 0
        for index, run in runs:
            count = await self._writer(index).submit(_Op("many", args=tuple(run)))
            added += count
            if count < len(run):
                break
        return added

    async def receive(self, channel: str) -> dict[str, Any]:
        """The next message on ``channel``, acknowledged as it is handed out (at-most-once)."""
        message, token = await self.receive_with_ack(channel)
        self._writer(token.index).acknowledge(token.key, token.entry_id)
        return message

    async def receive_with_ack(self, channel: str) -> tuple[dict[str, Any], AckToken]:
        """The next message on ``channel`` and the token to :meth:`ack` it with.

        Until acknowledged the message stays pending in Redis; after ``redelivery_timeout``
        it is delivered again (to this or another process). An entry that cannot be decoded is
        acknowledged (dropped, counted) and raises ``ValueError``.
        """
        self.require_valid_channel_name(channel)
        if "!" in channel:
            assert self.non_local_name(channel).endswith(self.client_prefix + "!"), (
                "Wrong client prefix"
            )
        index, key = self._where(channel)
        entry = await self._reader(index, key).get(channel)
        token = AckToken(index, key, entry.entry_id, entry.delivery)
        if entry.message is None:
            # counted and dropped here, logged by the caller the error reaches (once)
            self._drop("undecodable", channel, entry, index, key, quiet=True)
            raise ValueError(f"undecodable entry {entry.entry_id} on {channel!r}: {entry.error}")
        return entry.message, token

    def ack(self, token: AckToken) -> asyncio.Future[Any]:
        """Acknowledge (and delete) a delivered message. Queued at once; await to know it
        reached Redis (``True``: it was still there)."""
        return self._writer(token.index).submit(_Op("ack", token.key, (token.entry_id, "", "")))

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-local channel name, received on by this layer instance only."""
        return f"{prefix}.{self.client_prefix}!{uuid.uuid4().hex}"

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
        """Send ``message`` to every member of ``group``; full members are skipped and logged."""
        self.require_valid_group_name(group)
        payload = msgpack.packb(message, use_bin_type=True)
        key = self._group_key(group)
        writer = self._group_writer(group)
        if self.ring_size == 1 and not self.channel_capacity:
            members, full, _ = await writer.submit(_Op("group", key, (payload, self.capacity)))
        else:
            members, full = await self._group_send_sharded(writer, key, payload)
        if full:
            log.info("layer: %d of %d channels over capacity in group %s", full, members, group)

    async def _group_send_sharded(
        self, writer: _Writer, key: str, payload: bytes
    ) -> tuple[int, int]:
        horizon = time.time() - self.group_expiry

        def read(pipe: Any) -> int:
            pipe.zremrangebyscore(key, 0, horizon)
            pipe.zrange(key, 0, -1)
            return 2

        names = await writer.submit(_Op("call", call=read))
        members = [_text(m) for m in names]
        answers: list[Awaitable[Any]] = []
        for channel in members:
            index, stream = self._where(channel)
            target = channel if "!" in channel else ""
            op = _Op("send", stream, (self.get_capacity(channel), payload, target))
            answers.append(self._writer(index).submit(op))
        accepted = await asyncio.gather(*answers)
        return len(members), sum(1 for ok in accepted if not ok)

    # -- flush and close -----------------------------------------------------------------------

    async def flush(self) -> None:
        """Delete every stream and group under the prefix on every host, then close."""
        pattern = f"{self.prefix}:*"

        def delete(pipe: Any) -> int:
            pipe.eval(_DELETE_PREFIX, 0, pattern)
            return 1

        for index in range(self.ring_size):
            await self._writer(index).submit(_Op("call", call=delete))
        await self.close_pools()

    async def close_pools(self) -> None:
        """Stop this event loop's fetches and writers and close their connections.

        A fetch stopped here may leave entries pending: they are delivered again after
        ``redelivery_timeout``.
        """
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is None:
            return
        tasks = [r.task for r in state.readers.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        for writer in state.writers.values():
            if writer.acks:
                writer.kick()  # acknowledgements waiting for their delay go now
        writers = [w.task for w in state.writers.values() if w.task is not None]
        await asyncio.gather(*writers, return_exceptions=True)  # let queued writes finish
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in state.writers.values():
            await writer.client.aclose(close_connection_pool=True)
        for client in state.fetch_clients.values():
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

    def _drop(
        self, reason: str, channel: str, entry: _Entry, index: int, key: str, *, quiet: bool = False
    ) -> None:
        DROPPED.labels(reason).inc()
        if not quiet:
            log.warning("layer: dropped message %s on %r: %s", entry.entry_id, channel, reason)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # dropped outside a loop: it is claimed again, then dropped again
            return
        self._writer(index).acknowledge(key, entry.entry_id)
