"""gateways/email/config.py through core.config.load_config, on real YAML files."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from core.config import ConfigError, load_config
from core.logs import redact
from gateways.email.config import EmailGatewayConfig, ParserConfig
from gateways.email.translate import MailLimits

SECRET = "hunter2-very-secret"


def write(tmp_path: Path, text: str, name: str = "mail.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, email_section: str, **env: str) -> EmailGatewayConfig:
    """Load a file with the usual top-level keys and ``email_section`` (indented YAML)."""
    text = "gateway: email\nname: support-mail\nemail:\n" + textwrap.indent(
        textwrap.dedent(email_section), "  "
    )
    return load_config(write(tmp_path, text), EmailGatewayConfig, env=env)


def errors(tmp_path: Path, email_section: str, **env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, email_section, **env)
    assert SECRET not in str(caught.value)
    return caught.value.errors


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    # only their existence is checked by the model; the server loads them later
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("cert")
    key.write_text("key")
    return cert, key


def test_minimal_file_and_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "accept: [example.com]")
    assert config.gateway == "email" and config.name == "support-mail"
    assert config.inbound_channel == "support-mail"
    assert config.command_channel == "support-mail.send"
    email = config.email
    assert (email.host, email.port) == ("127.0.0.1", 2525)
    assert email.max_message_size == 10 * 1024 * 1024
    assert email.bare_lf == "reject" and email.include_raw is False
    assert email.tls is None and email.auth is None and email.relay is None
    assert email.attachment_store is None


def test_accept_is_required_and_normalised(tmp_path: Path) -> None:
    config = load(tmp_path, "accept: [' Example.COM ', '@Help.Example.org', Support@Example.NET]")
    assert config.email.accept == ["example.com", "help.example.org", "support@example.net"]
    assert errors(tmp_path, "port: 25") == ["email.accept: Field required"]
    (empty,) = errors(tmp_path, "accept: []")
    assert empty.startswith("email.accept: ") and "at least 1 item" in empty
    for bad in ("'two words.com'", "'a@b@c.com'", "' '", "'@'"):
        (error,) = errors(tmp_path, f"accept: [example.com, {bad}]")
        assert error.startswith("email.accept: ") and "is not a domain or an address" in error


def test_auth_without_tls_is_rejected(tmp_path: Path) -> None:
    problems = errors(tmp_path, f"accept: [example.com]\nauth: {{users: {{alice: {SECRET}}}}}")
    assert problems == ["email: auth needs tls: AUTH is only offered after STARTTLS"]


def test_auth_with_tls(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    cert, key = certs
    config = load(
        tmp_path,
        f"""\
        accept: [example.com]
        tls: {{cert_file: {cert}, key_file: {key}, required: true}}
        auth: {{users: {{alice: {SECRET}}}, required: true}}
        """,
    )
    assert config.email.tls is not None and config.email.tls.required
    assert config.email.auth is not None and config.email.auth.required
    assert config.email.auth.users["alice"].get_secret_value() == SECRET
    assert SECRET not in repr(config)
    # every secret the file held is registered with the log redactor
    assert redact(f"password={SECRET}") == "password=***"


def test_tls_files_must_exist(tmp_path: Path) -> None:
    problems = errors(
        tmp_path,
        f"accept: [example.com]\ntls: {{cert_file: {tmp_path}/nope.crt, key_file: {tmp_path}}}",
    )
    assert [p.split(":")[0] for p in problems] == ["email.tls.cert_file", "email.tls.key_file"]


def test_users_file(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    cert, key = certs
    users = tmp_path / "users"
    users.write_text(f"# who may send\n\nalice:{SECRET}\n  bob:pa:ss:word  \ncarol:\n")
    config = load(
        tmp_path,
        f"""\
        accept: [example.com]
        tls: {{cert_file: {cert}, key_file: {key}}}
        auth: {{users_file: {users}, users: {{dave: inline-pw}}}}
        """,
    )
    assert config.email.auth is not None
    passwords = {u: p.get_secret_value() for u, p in config.email.auth.users.items()}
    assert passwords == {"dave": "inline-pw", "alice": SECRET, "bob": "pa:ss:word", "carol": ""}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f"alice:{SECRET}\n{SECRET}\n", "users_file line 2: expected user:password"),
        (f":{SECRET}\n", "users_file line 1: expected user:password"),
        ("# nobody\n", "no users: set users or users_file"),
    ],
)
def test_users_file_errors_name_the_line_not_the_secret(
    tmp_path: Path, certs: tuple[Path, Path], content: str, message: str
) -> None:
    cert, key = certs
    users = tmp_path / "users"
    users.write_text(content)
    problems = errors(
        tmp_path,
        f"""\
        accept: [example.com]
        tls: {{cert_file: {cert}, key_file: {key}}}
        auth: {{users_file: {users}}}
        """,
    )
    assert problems == [f"email.auth: {message}"]


def test_users_file_must_exist(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    cert, key = certs
    problems = errors(
        tmp_path,
        f"""\
        accept: [example.com]
        tls: {{cert_file: {cert}, key_file: {key}}}
        auth: {{users_file: {tmp_path}/missing}}
        """,
    )
    assert len(problems) == 1 and problems[0].startswith("email.auth.users_file: ")


def test_relay_password_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "relay-password"
    secret_file.write_text(SECRET + "\n")
    config = load(
        tmp_path,
        f"""\
        accept: [example.com]
        relay:
          host: smtp.example.net
          username: bot
          password_file: {secret_file}
        """,
    )
    relay = config.email.relay
    assert relay is not None and relay.password is not None
    assert relay.password.get_secret_value() == SECRET  # trailing newline stripped
    assert (relay.port, relay.tls, relay.validate_certs) == (587, "starttls", True)
    assert SECRET not in repr(config)


def test_relay_password_from_environment(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        accept: [example.com]
        relay: {host: smtp.example.net, tls: implicit, port: 465, username: bot,
                password: "${RELAY_PASSWORD}"}
        """,
        RELAY_PASSWORD=SECRET,
    )
    assert config.email.relay is not None and config.email.relay.password is not None
    assert config.email.relay.password.get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("relay", "message"),
    [
        (
            f"{{host: localhost, tls: none, username: bot, password: {SECRET}}}",
            "email.relay: username needs tls: starttls or implicit (no AUTH in clear text)",
        ),
        (f"{{host: localhost, password: {SECRET}}}", "email.relay: username and password go"),
        ("{host: localhost, username: bot}", "email.relay: username and password go together"),
        (
            f"{{host: localhost, username: bot, password: {SECRET}, password_file: /x}}",
            "email.relay: set either password or password_file, not both",
        ),
        (
            "{host: localhost, username: bot, password_file: /nonexistent/relay-pw}",
            "email.relay: password_file: cannot read /nonexistent/relay-pw",
        ),
        ("{host: localhost, tls: ssl}", "email.relay.tls: Input should be 'starttls', 'implicit'"),
        ("{host: localhost, port: 0}", "email.relay.port: Input should be greater than or equal"),
        ("{port: 25}", "email.relay.host: Field required"),
        (
            f"{{host: localhost, username: bot, password: [{SECRET}]}}",
            "email.relay.password: Input should be a valid string",
        ),
    ],
)
def test_relay_errors(tmp_path: Path, relay: str, message: str) -> None:
    problems = errors(tmp_path, f"accept: [example.com]\nrelay: {relay}")
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_unknown_keys_are_rejected_with_their_path(tmp_path: Path) -> None:
    text = f"""\
    gateway: email
    name: support-mail
    colour: blue
    email:
      accept: [example.com]
      acept: [typo.example.com]
      relay: {{host: localhost, username: bot, password: {SECRET}, pasword: {SECRET}}}
    """
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), EmailGatewayConfig, env={})
    problems = caught.value.errors
    assert sorted(problems) == [
        "colour: Extra inputs are not permitted",
        "email.acept: Extra inputs are not permitted",
        "email.relay.pasword: Extra inputs are not permitted",
    ]
    assert SECRET not in str(caught.value)
    assert str(caught.value).startswith(f"{tmp_path / 'mail.yaml'}: ")


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    problems = errors(
        tmp_path,
        f"""\
        accept: [example.com]
        port: 70000
        bare_lf: maybe
        max_message_size: 0
        relay: {{host: localhost, username: bot, password: {SECRET}, timeout: -1}}
        """,
        UNUSED="x",
    )
    assert sorted(p.split(":")[0] for p in problems) == [
        "email.bare_lf",
        "email.max_message_size",
        "email.port",
        "email.relay.timeout",
    ]


def test_wrong_gateway_and_missing_env(tmp_path: Path) -> None:
    text = "gateway: mqtt\nname: x\nemail: {accept: ['${DOMAIN}']}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), EmailGatewayConfig, env={})
    assert "email.accept[0]: environment variable DOMAIN is not set" in caught.value.errors
    assert any(e.startswith("gateway: Input should be 'email'") for e in caught.value.errors)


def test_attachment_store_and_limits(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f"""\
        accept: [example.com]
        port: 0
        attachment_store: {tmp_path}/store
        max_inline_attachment: 0
        include_raw: true
        bare_lf: accept
        accept_timeout: 0.5
        """,
    )
    email = config.email
    assert email.port == 0 and email.attachment_store == tmp_path / "store"
    assert email.max_inline_attachment == 0 and email.include_raw
    assert email.bare_lf == "accept" and email.accept_timeout == 0.5


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, "accept: [example.com]")
    with pytest.raises(ValueError, match="frozen"):
        config.email.port = 25  # type: ignore[misc]


def test_verify_defaults_and_shorthand(tmp_path: Path) -> None:
    verify = load(tmp_path, "accept: [example.com]\n").email.verify
    assert verify.mode == "report" and verify.trusted_relays == []
    assert verify.dns.nameservers == [] and verify.dns.budget == 5.0
    assert load(tmp_path, "accept: [example.com]\nverify: enforce\n").email.verify.mode == "enforce"
    full = load(
        tmp_path,
        """
        accept: [example.com]
        verify:
          mode: report
          authserv_id: mx.example.com
          dns: {nameservers: ["127.0.0.1:5353", "[::1]:53", "192.0.2.1"], timeout: 1, cache_size: 0}
          trusted_relays:
            - {networks: [10.0.0.0/8], authserv_id: edge.example.com}
            - {arc_domains: [Lists.Example.ORG.]}
        """,
    ).email.verify
    assert full.dns.nameservers == ["127.0.0.1:5353", "[::1]:53", "192.0.2.1"]
    assert full.trusted_relays[1].arc_domains == ["lists.example.org"]


def test_verify_errors(tmp_path: Path) -> None:
    found = errors(
        tmp_path,
        """
        accept: [example.com]
        verify:
          mode: strict
          dns: {nameservers: ["host:99999", "a b"], budget: 0}
          trusted_relays:
            - {networks: [10.0.0.0/8]}
            - {authserv_id: x.example}
            - {networks: [not-a-net], authserv_id: y}
        """,
    )
    text = "\n".join(found)
    assert "email.verify.mode" in text
    assert "email.verify.dns.nameservers" in text and "email.verify.dns.budget" in text
    assert "email.verify.trusted_relays[0]" in text and "needs authserv_id" in text
    assert "email.verify.trusted_relays[1]" in text and "arc_domains" in text
    assert "email.verify.trusted_relays[2].networks" in text


def test_dkim_signing_key_from_a_file(tmp_path: Path) -> None:
    key = tmp_path / "dkim.pem"
    key.write_text(f"-----BEGIN RSA PRIVATE KEY-----\n{SECRET}\n-----END RSA PRIVATE KEY-----\n")
    relay = f"""
        accept: [example.com]
        relay:
          host: relay.example.com
          dkim: {{domain: Example.com, selector: s2026, private_key_file: {key}}}
        """
    dkim = load(tmp_path, relay).email.relay.dkim  # type: ignore[union-attr]
    assert dkim is not None and dkim.domain == "example.com"
    assert SECRET in dkim.private_key.get_secret_value() and SECRET not in repr(dkim)
    key.write_text(SECRET)
    (error,) = errors(tmp_path, relay)
    assert "email.relay.dkim" in error and "not a PEM RSA private key" in error


def test_proxy_protocol_and_implicit_tls(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    cert, key = certs
    cfg = load(
        tmp_path,
        f"""
        accept: [example.com]
        tls: {{cert_file: {cert}, key_file: {key}, implicit_port: 465}}
        proxy_protocol: {{trusted: [10.0.0.0/8, "2001:db8::/32"]}}
        """,
    ).email
    assert cfg.tls is not None and cfg.tls.implicit_port == 465
    assert cfg.proxy_protocol is not None and cfg.proxy_protocol.timeout == 5.0
    found = errors(tmp_path, "accept: [example.com]\nproxy_protocol: {trusted: []}\n")
    assert any("email.proxy_protocol.trusted" in e for e in found)


def test_parser_defaults_and_keys(tmp_path: Path) -> None:
    parser = load(tmp_path, "accept: [example.com]").email.parser
    assert parser.processes is None  # min(4, CPUs), decided by the pool
    assert (parser.max_queued, parser.cpu_limit, parser.timeout) == (64, 2.0, 30.0)
    assert parser.over_limit == "reject"
    assert parser.limits == MailLimits()
    assert (parser.max_header_fields, parser.max_header_length) == (1000, 100 * 1024)
    assert parser.max_encoded_words == 1000
    parser = load(
        tmp_path,
        """\
        accept: [example.com]
        parser:
          processes: 3
          max_queued: 0
          cpu_limit: 0.5
          timeout: 5
          max_header_fields: 200
          max_header_length: 20000
          max_encoded_words: 50
          over_limit: raw
        """,
    ).email.parser
    assert parser.processes == 3 and parser.max_queued == 0 and parser.over_limit == "raw"
    assert parser.limits == MailLimits(200, 20000, 50)


def test_parser_errors_name_their_key(tmp_path: Path) -> None:
    problems = errors(
        tmp_path,
        """\
        accept: [example.com]
        parser: {processes: 0, over_limit: drop, max_encoded_words: 0, colour: blue}
        """,
    )
    assert sorted(p.split(":")[0] for p in problems) == [
        "email.parser.colour",
        "email.parser.max_encoded_words",
        "email.parser.over_limit",
        "email.parser.processes",
    ]
    (problem,) = errors(tmp_path, "accept: [example.com]\nparser: {cpu_limit: 10, timeout: 10}")
    assert problem.startswith("email.parser: ") and "timeout must be above cpu_limit" in problem


def test_the_readme_documents_every_parser_key_with_its_default() -> None:
    readme = (Path(__file__).parents[3] / "gateways" / "email" / "README.md").read_text()
    section = readme.split("## Parsing", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, re.MULTILINE))
    defaults = ParserConfig()
    assert set(rows) == set(ParserConfig.model_fields)
    for key, documented in rows.items():
        value = getattr(defaults, key)
        expected = "min(4, CPUs)" if key == "processes" else f"`{value}`"
        if isinstance(value, int | float) and key != "processes":
            expected = str(value)
        assert documented.strip() == expected, key
