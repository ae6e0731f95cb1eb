"""Print pip constraints that pin each direct runtime dependency to its lowest allowed version.

``pyproject.toml`` stays the one list: every ``name>=X`` (or ``~=X`` / ``==X``) in
``[project].dependencies`` becomes ``name==X``. A dependency without a lower bound is an error,
since "the lowest version" would then be whatever an index happens to hold. ``.ci/run`` installs
the package with these constraints in a fresh virtualenv and runs the tests, so the lower bounds
in ``pyproject.toml`` are true, not hopes.

Usage: ``python .ci/lowest.py [pyproject.toml] > constraints.txt``
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# name, optional [extras], the specifiers, an optional ; marker (PEP 508, without URLs)
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)(;.*)?$")
_LOWER = re.compile(r"^(>=|~=|==)\s*([0-9][A-Za-z0-9.+!-]*)$")


def lowest(requirement: str) -> str:
    """``name==X`` for ``requirement``'s lower bound; ``ValueError`` if it has none."""
    match = _REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot read the requirement {requirement!r}")
    name, _extras, specifiers, marker = match.groups()
    bounds = []
    for specifier in filter(None, (s.strip() for s in specifiers.split(","))):
        found = _LOWER.match(specifier)
        if found is not None:
            bounds.append(found.group(2))
    if len(bounds) != 1:
        raise ValueError(f"{requirement!r}: needs exactly one lower bound (>=, ~= or ==)")
    return f"{name}=={bounds[0]}{marker or ''}"


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "pyproject.toml")
    dependencies = tomllib.loads(path.read_text())["project"]["dependencies"]
    try:
        pins = [lowest(requirement) for requirement in dependencies]
    except ValueError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
