"""The layout rules of DESIGN §2, checked on every import statement (also those inside functions).

* ``translate.py`` is pure: no asyncio, sockets, threads or layer; nothing of the transport
  library that does I/O.
* A gateway never imports another gateway, and core imports no gateway.
* ``config.py`` imports only core.config, core.types (the channel-name check), pydantic and
  typing-level stdlib (and its own gateway's pure ``translate.py``, where YAML and commands
  share one validator).
* Only ``connection.py`` imports the transport library's I/O parts and the stdlib's sockets.
* ``consumers.py`` (the Django-side helpers, run in the worker) imports channels,
  ``core.consumers`` and its own gateway's pure ``translate.py`` / ``config.py``, so it checks a
  command with the gateway's own parser and never drags the gateway's I/O into the worker.

A new gateway adds its transport library's I/O parts to ``TRANSPORT_IO``;
tests/gateways/test_registration.py fails until it does, so nobody forgets.

And core's own graph: no import cycle, not even through an import inside a function, and the
consumer side (``core.worker``, ``core.receiving``, ``core.consumers``) never loads the gateway
base (``core.service``).
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GATEWAYS = sorted(p.name for p in (ROOT / "gateways").iterdir() if (p / "translate.py").is_file())

#: module → imported names that do I/O ("*": the whole module)
TRANSPORT_IO: dict[str, dict[str, set[str]]] = {
    "email": {"aiosmtplib": {"*"}, "aiosmtpd.smtp": {"SMTP"}, "aiosmtpd.controller": {"*"}},
    "mqtt": {"paho.mqtt.client": {"Client"}, "paho.mqtt": {"client"}},
    "http_ws": {"uvicorn": {"*"}, "websockets": {"*"}},
    "slack": {
        "slack_sdk.web": {"*"},
        "slack_sdk.webhook": {"*"},
        "slack_sdk.socket_mode": {"*"},
        "aiohttp": {"*"},
        "websockets": {"*"},
    },
    # the scheduler's transport is the clock; its I/O is the state store
    "scheduler": {"sqlite3": {"*"}, "fcntl": {"*"}},
    "irc": {
        "irc.client_aio": {"*"},
        "irc.connection": {"*"},
        "irc.client": {"Reactor", "ServerConnection", "SimpleIRCClient", "DCCConnection"},
        "irc.bot": {"*"},
        "jaraco.stream": {"*"},
    },
}
#: stdlib I/O that belongs in connection.py only
STDLIB_IO = {"socket", "ssl", "selectors", "asyncio.streams"}
#: what makes a module impure
IMPURE = {
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "threading",
    "subprocess",
    "channels",
    "channels_redis",
    "redis",
    "core.service",
    "core.layers",
    "core.streams",
    "core.client",
    "core.redis",
    "core.cli",
    "core.health",
}
CONFIG_STDLIB = {"__future__", "typing", "collections.abc", "pathlib", "enum", "re"}


@dataclass(frozen=True)
class Import:
    module: str
    names: frozenset[str]  # "*" for a plain `import module`
    line: int

    def within(self, prefix: str) -> bool:
        return self.module == prefix or self.module.startswith(prefix + ".")


def imports(path: Path) -> list[Import]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(a.name, frozenset({"*"}), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = frozenset(a.name for a in node.names)
            found.append(Import(node.module, names, node.lineno))
    return found


def where(path: Path, item: Import) -> str:
    return f"{path.relative_to(ROOT)}:{item.line}: {item.module} {sorted(item.names)}"


def does_io(proto: str, item: Import) -> bool:
    if any(item.within(m) for m in STDLIB_IO):
        return True
    for module, names in TRANSPORT_IO[proto].items():
        if item.module == module and ("*" in names or "*" in item.names or item.names & names):
            return True
        if item.within(module) and item.module != module and "*" in names:
            return True
    return False


@pytest.mark.parametrize("proto", GATEWAYS)
def test_translate_is_pure(proto: str) -> None:
    path = ROOT / "gateways" / proto / "translate.py"
    bad = [
        where(path, i)
        for i in imports(path)
        if any(i.within(m) for m in IMPURE) or i.within("gateways") or does_io(proto, i)
    ]
    assert bad == []


#: other pure modules beside translate.py (same rule)
PURE_MODULES = ["email/verdicts.py"]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_other_pure_modules_are_pure(module: str) -> None:
    proto = module.split("/")[0]
    path = ROOT / "gateways" / module
    bad = [
        where(path, i)
        for i in imports(path)
        if any(i.within(m) for m in IMPURE) or i.within("gateways") or does_io(proto, i)
    ]
    assert bad == []


@pytest.mark.parametrize("proto", GATEWAYS)
def test_a_gateway_never_imports_another(proto: str) -> None:
    bad = []
    for path in sorted((ROOT / "gateways" / proto).rglob("*.py")):
        for item in imports(path):
            # the package root (gateways/__init__.py: the registry, the shadowed-core check)
            # is shared; another gateway's package is not
            others = [g for g in GATEWAYS if g != proto]
            if any(item.within(f"gateways.{other}") for other in others):
                bad.append(where(path, item))
    assert bad == []


def test_core_imports_no_gateway() -> None:
    bad = [
        where(path, item)
        for path in sorted((ROOT / "core").rglob("*.py"))
        for item in imports(path)
        if item.within("gateways")
    ]
    assert bad == []


@pytest.mark.parametrize("proto", GATEWAYS)
def test_config_imports_only_core_config_and_pydantic(proto: str) -> None:
    path = ROOT / "gateways" / proto / "config.py"
    allowed = {*CONFIG_STDLIB, "pydantic", "core.config", "core.types"}
    allowed.add(f"gateways.{proto}.translate")
    bad = [where(path, i) for i in imports(path) if i.module not in allowed]
    assert bad == []


@pytest.mark.parametrize("proto", GATEWAYS)
def test_only_connection_does_transport_io(proto: str) -> None:
    bad = []
    for path in sorted((ROOT / "gateways" / proto).glob("*.py")):
        if path.name == "connection.py":
            continue
        bad += [where(path, item) for item in imports(path) if does_io(proto, item)]
    assert bad == []


#: what a gateway's consumers.py may import besides its own translate.py and config.py
CONSUMERS_ALLOWED = {
    *CONFIG_STDLIB,
    "dataclasses",
    "datetime",
    "logging",
    "math",
    "time",
    "uuid",
    "channels",
    "core.consumers",
}


@pytest.mark.parametrize("proto", GATEWAYS)
def test_consumers_import_only_channels_and_their_own_pure_parts(proto: str) -> None:
    path = ROOT / "gateways" / proto / "consumers.py"
    assert path.is_file(), f"gateways/{proto}/consumers.py: every gateway has consumer helpers"
    allowed = {*CONSUMERS_ALLOWED, f"gateways.{proto}.translate", f"gateways.{proto}.config"}
    bad = [
        where(path, i)
        for i in imports(path)
        if not any(i.within(module) for module in allowed) or does_io(proto, i)
    ]
    assert bad == []


# -- core's own import graph (issue 23) ----------------------------------------------------------

#: the consumer side: what runs in a Django worker, which never needs the gateway base
CONSUMER_SIDE = ["core.worker", "core.receiving", "core.consumers"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> list[Import]:
    """:func:`imports`, less those under ``if TYPE_CHECKING:`` (annotations only, never run)."""

    class Visitor(ast.NodeVisitor):
        found: list[Import] = []

        def visit_If(self, node: ast.If) -> None:
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            self.found += [Import(a.name, frozenset({"*"}), node.lineno) for a in node.names]

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module and node.level == 0:
                names = frozenset(a.name for a in node.names)
                self.found.append(Import(node.module, names, node.lineno))

    visitor = Visitor()
    visitor.found = []
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.found


def core_graph() -> dict[str, dict[str, int]]:
    """core module → the core modules it imports when it runs (also inside functions) → line."""
    paths = {_module_name(p): p for p in sorted((ROOT / "core").rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for name, path in paths.items():
        edges = graph.setdefault(name, {})
        for item in runtime_imports(path):
            targets = [f"{item.module}.{n}" for n in item.names if f"{item.module}.{n}" in paths]
            if not targets and item.module in paths:
                targets = [item.module]
            for target in targets:
                if target != name:
                    edges.setdefault(target, item.line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str]:
    """One cycle of ``graph`` as ``[a, b, …, a]``; ``[]`` when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in graph.get(node, {}):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1}}) == []


def test_core_has_no_import_cycle() -> None:
    """Not even through an import inside a function: that only hides the cycle."""
    graph = core_graph()
    cycle = find_cycle(graph)
    lines = [f"{a} imports {b} at line {graph[a][b]}" for a, b in itertools.pairwise(cycle)]
    assert lines == []


@pytest.mark.parametrize("module", CONSUMER_SIDE)
def test_the_consumer_side_never_loads_the_gateway_base(module: str) -> None:
    """A Django worker loads neither ``core.service`` (the Gateway class) nor ``core.client``."""
    graph = core_graph()
    seen, todo = {module: [module]}, [module]
    while todo:
        current = todo.pop()
        for target in graph[current]:
            if target not in seen:
                seen[target] = [*seen[current], target]
                todo.append(target)
    assert [" → ".join(seen[m]) for m in ("core.service", "core.client") if m in seen] == []
