"""core.types: the one channel-name check, and the optional capabilities of a layer."""

from __future__ import annotations

import pytest
from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer

from core.streams import StreamsChannelLayer
from core.types import (
    CHANNEL_NAME_RULE,
    AcknowledgingLayer,
    BatchSendingLayer,
    ChannelLayer,
    check_channel_name,
    is_channel_name,
)


@pytest.mark.parametrize("name", ["ops", "a.b-c_d", "x" * 99])
def test_channel_names_a_worker_can_listen_on(name: str) -> None:
    assert is_channel_name(name)
    assert check_channel_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 100, "specific.abc!xyz", "a b", "é", 7, None])
def test_what_is_no_channel_name(name: object) -> None:
    assert not is_channel_name(name)
    if isinstance(name, str):
        with pytest.raises(ValueError, match=CHANNEL_NAME_RULE):
            check_channel_name(name)


def test_none_passes_the_check_for_an_optional_key() -> None:
    assert check_channel_name(None) is None


def test_only_the_streams_layer_has_the_optional_capabilities() -> None:
    streams = StreamsChannelLayer(hosts=[{"address": "redis://127.0.0.1:1/0"}])
    others = [InMemoryChannelLayer(), RedisChannelLayer(hosts=["redis://127.0.0.1:1/0"])]
    assert isinstance(streams, ChannelLayer)
    assert isinstance(streams, BatchSendingLayer) and isinstance(streams, AcknowledgingLayer)
    for layer in others:
        assert isinstance(layer, ChannelLayer)
        assert not isinstance(layer, BatchSendingLayer)
        assert not isinstance(layer, AcknowledgingLayer)
