"""docs/configuration.md is generated from the config models (gateways/config_reference.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field, SecretStr

from core.config import Section, YamlType
from gateways.config_reference import MISSING, UNSET, Row, gateway_models, main, render, rows
from gateways.irc.config import IrcGatewayConfig

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"


def test_the_page_is_what_the_models_say() -> None:
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is out of date: a config model changed. "
        "Run `python -m gateways.config_reference` and commit the page."
    )


def test_every_key_has_a_description() -> None:
    missing = [line for line in render().splitlines() if MISSING in line]
    assert missing == []


def test_every_registered_gateway_has_a_section() -> None:
    page = render()
    for name in gateway_models():
        assert f"## `gateway: {name}`" in page
        assert f"| `{name}` | mapping |" in page  # its own section, its keys below
    assert page.count("| `shutdown_grace` |") == 1  # the common keys once, not per gateway


class _Inner(Section):
    """``toy.inner``: a nested section."""

    secret: SecretStr | None = Field(None, description="A secret; or secret_file.")
    every: Annotated[float, BeforeValidator(float), YamlType("duration")] = Field(
        30.0, description="How often."
    )

    secret_files: ClassVar[tuple[str, ...]] = ("secret",)


class _Toy(Section):
    """``toy:`` — a section with every shape."""

    host: str = Field(description="Where.")
    port: int = Field(8000, ge=1, le=65535, description="Port.")
    mode: Literal["on", "off"] = Field("on", description="A choice.")
    grace: float | None = Field(None, gt=0, description="Optional seconds.")
    names: list[str] = Field(default_factory=lambda: ["a", "b"], description="Names.")
    inner: _Inner = Field(default_factory=_Inner, description="Nested.")
    entries: list[_Inner] = Field(default_factory=list, description="A list of sections.")
    by_name: dict[str, _Inner] = Field(default_factory=dict, description="A map of sections.")
    undocumented: bool = False


def test_rows_of_every_field_shape() -> None:
    got = {row.key: row for row in rows(_Toy, "toy.")}
    assert got["`toy.host`"] == Row("`toy.host`", "str", "required", "Where.")
    assert got["`toy.port`"] == Row("`toy.port`", "int (≥ 1, ≤ 65535)", "`8000`", "Port.")
    assert got["`toy.mode`"].type == "`on` \\| `off`"
    assert got["`toy.grace`"] == Row("`toy.grace`", "float (> 0)", UNSET, "Optional seconds.")
    assert got["`toy.names`"].default == "`[a, b]`"
    assert got["`toy.inner`"].default == "see below"
    secret = got["`toy.inner.secret` / `toy.inner.secret_file`"]
    assert (secret.type, secret.default) == ("secret", UNSET)
    assert got["`toy.inner.every`"] == Row("`toy.inner.every`", "duration", "`30`", "How often.")
    assert got["`toy.entries`"].type == "list of mappings"
    assert "`toy.entries[].every`" in got
    assert got["`toy.by_name`"].type == "mapping of name → mapping"
    assert "`toy.by_name.<name>.every`" in got
    assert got["`toy.undocumented`"].description == MISSING


def test_a_new_key_reaches_the_page_and_stale_pages_are_caught(tmp_path: Path) -> None:
    class WithNewKey(IrcGatewayConfig):
        key_added_later: int = Field(100, ge=1, description="A key added later.")

    models = {**gateway_models(), "irc": WithNewKey}
    assert "| `key_added_later` | int (≥ 1) | `100` | A key added later. |" in render(models)
    assert "key_added_later" not in render()

    page = tmp_path / "configuration.md"
    assert main(["--check", "--output", str(page)]) == 1  # missing
    assert main(["--output", str(page)]) == 0
    assert main(["--check", "--output", str(page)]) == 0
    page.write_text(page.read_text() + "edited by hand\n")
    assert main(["--check", "--output", str(page)]) == 1
