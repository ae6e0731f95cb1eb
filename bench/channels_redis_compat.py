"""channels_redis' own test suite, run against ``core.streams.StreamsChannelLayer``.

    python -m bench.channels_redis_compat PATH/TO/channels_redis/tests/test_core.py

Their file is not part of this repository (another project's code): get it from the
channels_redis 4.3.0 sdist (``pip download channels_redis==4.3.0 --no-binary :all: --no-deps``,
``tests/test_core.py`` inside) or its git tag. This script copies it into a temporary directory
with the *construction* adapted and nothing else:

* ``from channels_redis.core import ChannelFull, RedisChannelLayer`` becomes channels'
  ``ChannelFull`` and a ``RedisChannelLayer`` that builds a ``StreamsChannelLayer`` with the
  same arguments, on a private ``redis-server`` (a free port, never the default one) when the
  test names no hosts;
* ``redis://localhost:6379`` becomes that server (the ten-database list stays ten databases);
* ``import async_timeout`` becomes the standard library's ``asyncio.timeout`` (the same
  ``async with …timeout(n)``; the package is not a dependency here).

Every assertion is theirs. The tests that fail on purpose are listed in :data:`EXPECTED`, with
why (docs/layers.md's "channels_redis' own tests" lists them too); the script exits 0 when exactly
those fail and everything else passes, 1 otherwise.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    sys.exit("run it as a module from the repository root: python -m bench.channels_redis_compat")

import argparse
import re
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

#: tests of channels_redis 4.3.0's tests/test_core.py that fail here on purpose, and why
EXPECTED: dict[str, str] = {
    "test_group_send_capacity": (
        "group_send to a full channel logs a WARNING (core.streams' contract: never silent) "
        "instead of channels_redis' INFO line, which the test requires of every record"
    ),
    "test_group_send_capacity_multiple_channels": "the same WARNING",
    "test_default_group_key_format": (
        "_group_key() (a private method) returns a str, not bytes; the key is the same"
    ),
    "test_custom_group_key_format": "the same private method",
    "test_receive_buffer_respects_capacity": (
        "receive_buffer holds fetched entries per channel (deques, capped at the channel's "
        "capacity, dropping the oldest with a count and a log line), not channels_redis' "
        "BoundedQueue objects this test fills by hand"
    ),
}

_LAYER_SHIM = '''
import asyncio as _asyncio
from channels.exceptions import ChannelFull
from core.streams import StreamsChannelLayer as _StreamsChannelLayer

_OUR_HOST = "{url}"


def RedisChannelLayer(hosts=None, **kwargs):
    """channels_redis' constructor, building core.streams' layer (on our Redis by default)."""
    return _StreamsChannelLayer(hosts=hosts or [_OUR_HOST], **kwargs)
'''


def adapt(source: str, url: str) -> str:
    """Their test module with the construction adapted (see the module docstring)."""
    replaced = source.replace(
        "from channels_redis.core import ChannelFull, RedisChannelLayer",
        _LAYER_SHIM.format(url=url),
    )
    if replaced == source:
        raise SystemExit("not channels_redis 4.3.0's tests/test_core.py: its import line differs")
    replaced = re.sub(
        r"^import async_timeout$",
        "import asyncio as async_timeout  # asyncio.timeout: the same context manager",
        replaced,
        flags=re.MULTILINE,
    )
    host = url.rsplit("/", 1)[0]  # redis://127.0.0.1:PORT, without the database
    return replaced.replace("redis://localhost:6379", host)


def run(test_file: Path, extra: list[str]) -> int:
    from core.testing import RedisServer

    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="cr-compat-") as tmp:
        directory = Path(tmp)
        target = directory / "test_core.py"
        target.write_text(adapt(test_file.read_text(), server.url))
        (directory / "pytest.ini").write_text(
            "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        )
        report = directory / "report.xml"
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        argv += ["--rootdir", tmp, "-c", str(directory / "pytest.ini"), f"--junitxml={report}"]
        argv += [str(target), *extra]
        subprocess.run(argv, cwd=Path(__file__).resolve().parents[1], check=False)
        outcomes = _outcomes(report)
    failed = {name for name, outcome in outcomes.items() if outcome == "failed"}
    base = {name.split("[")[0] for name in failed}
    print()
    for name, outcome in sorted(outcomes.items()):
        why = EXPECTED.get(name.split("[")[0], "")
        print(
            f"{outcome:8} {name}" + (f"  (expected: {why})" if outcome == "failed" and why else "")
        )
    unexpected = sorted(name for name in failed if name.split("[")[0] not in EXPECTED)
    missing = sorted(set(EXPECTED) - base)
    passed = sum(1 for outcome in outcomes.values() if outcome == "passed")
    print(
        f"\n{passed} passed, {len(failed)} failed ({len(failed) - len(unexpected)} expected), "
        f"{sum(1 for o in outcomes.values() if o in ('xfailed', 'skipped'))} xfailed/skipped"
    )
    if unexpected:
        print("unexpected failures: " + ", ".join(unexpected))
    if missing:
        print(
            "expected to fail but did not (update EXPECTED and docs/layers.md): "
            + ", ".join(missing)
        )
    return 1 if unexpected or missing else 0


def _outcomes(report: Path) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "?")
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            outcomes[name] = "failed"
        elif "skipped" in kinds:
            skipped = case.find("skipped")
            xfail = skipped is not None and "xfail" in (skipped.get("type") or "")
            outcomes[name] = "xfailed" if xfail else "skipped"
        else:
            outcomes[name] = "passed"
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.channels_redis_compat", description=__doc__.split("\n")[0]
    )
    parser.add_argument("test_file", type=Path, help="channels_redis 4.3.0's tests/test_core.py")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    return run(args.test_file, args.pytest_args)


if __name__ == "__main__":
    sys.exit(main())
