"""Every gateway folder is registered everywhere a gateway must be (issue 23, item 3).

The set of gateways is not written down here: it is every ``gateways/<proto>/`` with a
``gateway.py``. Each registration point of the checklist in ``core/__init__.py`` ("Where to
register a gateway") is checked against it, both ways, so a seventh folder fails this test until
it is registered everywhere, and a registration left behind by a removed gateway fails too.
"""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

import core
import gateways
from gateways import entry
from tests import test_import_rules

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = sorted(p.parent.name for p in (ROOT / "gateways").glob("*/gateway.py"))


def binary(proto: str) -> str:
    """The console script of a gateway: ``gateway-http-ws`` for ``http_ws``."""
    return f"gateway-{proto.replace('_', '-')}"


def readme_table() -> dict[str, str]:
    """The README's gateway table: binary → the spec it links."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(
        r"^\|[^|\n]*\| `(gateway-[a-z-]+)` \|[^|\n]*\| \[[^]]*\]\(([^)]+)\) \|$", text, re.M
    )
    return dict(rows)


def test_the_gateways_are_found() -> None:
    assert len(FOLDERS) >= 6 and "mqtt" in FOLDERS


@pytest.mark.parametrize("proto", FOLDERS)
def test_a_gateway_folder_is_registered_everywhere(proto: str) -> None:
    missing = []
    # 1. gateways/__init__.py: the YAML `gateway:` value → its class
    target = gateways.GATEWAYS.get(proto)
    if target is None:
        missing.append(f"gateways/__init__.py GATEWAYS[{proto!r}]")
    else:
        module, _, name = target.partition(":")
        cls = getattr(importlib.import_module(module), name)
        if module != f"gateways.{proto}.gateway" or cls.protocol != proto:
            missing.append(f"GATEWAYS[{proto!r}] = {target!r}: not gateways.{proto}.gateway")
    # 2. gateways/entry.py: the binary runs its cli.py after the shadowed-core check
    if entry.BINARIES.get(binary(proto)) != f"gateways.{proto}.cli":
        missing.append(f"gateways/entry.py BINARIES[{binary(proto)!r}] = 'gateways.{proto}.cli'")
    if not callable(getattr(entry, proto, None)):
        missing.append(f"gateways/entry.py: def {proto}() -> int: return run({binary(proto)!r})")
    # 3. pyproject.toml: the console script, through gateways.entry
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    if scripts.get(binary(proto)) != f"gateways.entry:{proto}":
        missing.append(
            f"pyproject.toml [project.scripts] {binary(proto)} = 'gateways.entry:{proto}'"
        )
    # 4. tests/test_import_rules.py: what of its transport library does I/O
    if proto not in test_import_rules.TRANSPORT_IO:
        missing.append(f"tests/test_import_rules.py TRANSPORT_IO[{proto!r}]")
    # 5. README.md: a row of the gateway table, linking the gateway's own README
    spec = f"gateways/{proto}/README.md"
    if readme_table().get(binary(proto)) != spec:
        missing.append(f"README.md gateway table: a row with `{binary(proto)}` and [..]({spec})")
    # 6. the rooms every gateway has (DESIGN §2), its spec, its tests
    for room in ("config.py", "translate.py", "connection.py", "cli.py", "consumers.py"):
        if not (ROOT / "gateways" / proto / room).is_file():
            missing.append(f"gateways/{proto}/{room}")
    if not (ROOT / spec).is_file():
        missing.append(spec)
    if not (ROOT / "tests" / "gateways" / proto / "__init__.py").is_file():
        missing.append(f"tests/gateways/{proto}/__init__.py")
    assert not missing, (
        f"gateways/{proto}/ is not registered (core/__init__.py, 'Where to "
        "register a gateway'):\n" + "\n".join(missing)
    )


def test_nothing_is_registered_without_its_folder() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    registered = {
        "GATEWAYS": set(gateways.GATEWAYS),
        "entry.BINARIES": set(entry.BINARIES) - {"gateways"},
        "[project.scripts]": set(scripts) - {"gateways"},
        "TRANSPORT_IO": set(test_import_rules.TRANSPORT_IO),
        "README table": set(readme_table()),
    }
    expected = {
        "GATEWAYS": set(FOLDERS),
        "entry.BINARIES": {binary(p) for p in FOLDERS},
        "[project.scripts]": {binary(p) for p in FOLDERS},
        "TRANSPORT_IO": set(FOLDERS),
        "README table": {binary(p) for p in FOLDERS},
    }
    assert registered == expected


def test_the_checklist_names_every_registration_point() -> None:
    doc = core.__doc__ or ""
    assert "Where to register a gateway" in doc
    for point in ("GATEWAYS", "BINARIES", "[project.scripts]", "TRANSPORT_IO", "README.md"):
        assert point in doc, point
