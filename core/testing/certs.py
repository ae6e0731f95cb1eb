"""A throw-away certificate authority and server certificates for TLS tests."""

from __future__ import annotations

import dataclasses
import os
import ssl
from pathlib import Path

from core.testing.base import ServiceMissing

# --------------------------------------------------------------------------------------------
# Certificates


@dataclasses.dataclass(frozen=True)
class Certs:
    """PEM files of a throwaway CA, a server certificate and a client certificate.

    The server certificate is valid for ``localhost`` and ``127.0.0.1``; the client
    certificate (common name ``client``) is signed by the same CA, for mutual TLS.
    """

    dir: Path
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path

    def client_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        """An SSL context trusting this CA, presenting the client certificate if asked."""
        context = ssl.create_default_context(cafile=str(self.ca_crt))
        if client_cert:
            context.load_cert_chain(str(self.client_crt), str(self.client_key))
        return context

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """An SSL context serving the server certificate (for servers written in Python)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_crt))
        context.load_cert_chain(str(self.server_crt), str(self.server_key))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        return context


def make_certs(directory: str | os.PathLike[str]) -> Certs:
    """Write a CA, a server and a client certificate (ECDSA P-256) into ``directory``.

    File names: ``ca.crt ca.key server.crt server.key client.crt client.key``. Uses ``trustme``;
    raises :class:`ServiceMissing` if it is not installed.
    """
    try:
        import trustme
    except ImportError:
        raise ServiceMissing(
            "the 'trustme' package is not installed (pip install trustme)"
        ) from None
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="channels-gateways tests")
    server = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    client = ca.issue_cert("client.test.local", common_name="client")
    certs = Certs(
        dir=path,
        ca_crt=path / "ca.crt",
        ca_key=path / "ca.key",
        server_crt=path / "server.crt",
        server_key=path / "server.key",
        client_crt=path / "client.crt",
        client_key=path / "client.key",
    )
    ca.cert_pem.write_to_path(str(certs.ca_crt))
    ca.private_key_pem.write_to_path(str(certs.ca_key))
    server.cert_chain_pems[0].write_to_path(str(certs.server_crt))
    server.private_key_pem.write_to_path(str(certs.server_key))
    client.cert_chain_pems[0].write_to_path(str(certs.client_crt))
    client.private_key_pem.write_to_path(str(certs.client_key))
    for key in (certs.ca_key, certs.server_key, certs.client_key):
        key.chmod(0o600)
    return certs
