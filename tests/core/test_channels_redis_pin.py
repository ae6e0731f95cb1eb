"""core.layers.RedisChannelLayer overrides private methods of channels_redis: pin and check.

pyproject.toml pins channels_redis to the versions these overrides were read against. This test
fails when the installed version leaves that range, or when the private methods we replace (or
the calls that reach them) changed: then read channels_redis' new receive path, adapt
core/layers.py, and widen the pin.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from channels_redis.core import RedisChannelLayer as Upstream

from core.layers import RedisChannelLayer

ROOT = Path(__file__).resolve().parents[2]

#: the range in pyproject.toml, as the versions it allows: [lower, upper)
TESTED = ((4, 3), (4, 4))
#: sha256 of upstream's source of each method we replace, as of 4.2.1 to 4.3.0 (identical)
UPSTREAM_SOURCE = {
    "_brpop_with_clean": "363a120edcef61d5ea5d37cd2a55cae6a5e0d2f136c479d32e45ded43bbbcd7d",
    "_clean_receive_backup": "7142822d70070e399f09c84c1cafac698dee21f70e0d2df6cf684e66bee84929",
}


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _digest(name: str) -> str:
    source = inspect.getsource(getattr(Upstream, name))
    return hashlib.sha256(source.encode()).hexdigest()


def test_pyproject_pins_the_tested_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if d.lower().startswith("channels_redis")]
    lower, upper = (".".join(map(str, v)) for v in TESTED)
    assert pins == [f"channels_redis>={lower},<{upper}"]


def test_the_installed_channels_redis_is_a_tested_version() -> None:
    installed = _release(version("channels_redis"))
    assert TESTED[0] <= installed < TESTED[1], (
        f"channels_redis {version('channels_redis')} is outside the tested range; "
        "check core.layers.RedisChannelLayer against it"
    )


def test_the_overridden_methods_keep_their_signatures_and_callers() -> None:
    for name in UPSTREAM_SOURCE:
        ours = inspect.signature(getattr(RedisChannelLayer, name))
        theirs = inspect.signature(getattr(Upstream, name))
        assert list(ours.parameters) == list(theirs.parameters), name
    # the receive path still reaches them the way the overrides expect
    receive = inspect.getsource(Upstream.receive_single)
    assert "await self._brpop_with_clean(" in receive
    assert "self._clean_receive_backup(index, channel_key)" in receive
    assert list(inspect.signature(Upstream.connection).parameters) == ["self", "index"]
    assert list(inspect.signature(Upstream._backup_channel_name).parameters) == [
        "self",
        "channel",
    ]


def test_the_replaced_upstream_code_is_the_code_we_read() -> None:
    changed = [name for name, digest in UPSTREAM_SOURCE.items() if _digest(name) != digest]
    assert changed == [], f"channels_redis changed {changed}: re-read them, update core/layers.py"
