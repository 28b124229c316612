"""FaultProxy behind TLS: a throwaway CA and server certificate, and aws-chunked refusal."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.faultproxy import Fault, FaultProxy, Rule

_HELLO_TIMEOUT = 30.0  # a client that connects and never says hello


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA clients trust (AWS_CA_BUNDLE), the server's chain and key."""

    ca: Path
    chain: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.chain, self.key)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls_files(folder: Path) -> TlsFiles:
    """A CA and a certificate for 127.0.0.1/localhost it signed, written into `folder`.

    Built so that strict verification (OpenSSL's X509_STRICT, as Python 3.13 sets by default)
    accepts them: key usages, key identifiers and a critical CA constraint.
    """
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("encfs-cloud test CA"))
        .issuer_name(_name("encfs-cloud test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.pem", folder / "server-chain.pem", folder / "server-key.pem")
    pem = serialization.Encoding.PEM
    files.ca.write_bytes(ca.public_bytes(pem))
    files.chain.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    files.key.touch(mode=0o600)
    files.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


def is_aws_chunked(headers: dict[str, str]) -> bool:
    """botocore's trailer-checksum body: aws-chunked encoding or a STREAMING-* payload hash."""
    encodings = [e.strip().lower() for e in headers.get("content-encoding", "").split(",")]
    payload = headers.get("x-amz-content-sha256", "").upper()
    return "aws-chunked" in encodings or payload.startswith("STREAMING-")


class TlsProxy(FaultProxy):
    """A FaultProxy that accepts only TLS and forwards plain HTTP, like a TLS load balancer.

    `seen` records every request head (lower-cased header names), so a test can tell how
    a client framed its bodies. With `refuse_aws_chunked`, a request whose body is
    aws-chunked is answered 400 InvalidRequest without reaching the server, as some S3
    providers and proxies do. The trickle faults' abort detection needs plain TCP.
    """

    def __init__(self, upstream: str, tls: TlsFiles, *, refuse_aws_chunked: bool = False) -> None:
        super().__init__(upstream)
        self._context = tls.server_context()
        self.refuse_aws_chunked = refuse_aws_chunked
        self.failed_handshakes = 0  # clients that did not trust us, or gave up before TLS

    @property
    def endpoint_url(self) -> str:
        return super().endpoint_url.replace("http://", "https://", 1)

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(_HELLO_TIMEOUT)
            wrapped = self._context.wrap_socket(sock, server_side=True)
            wrapped.settimeout(None)
        except (OSError, ValueError):
            with self._lock:
                self.failed_handshakes += 1
                self._sockets.discard(sock)
            sock.close()  # a client that does not trust our CA, or the proxy stopping
            return
        with self._lock:  # stop() shuts down what it tracks: track the TLS side instead
            self._sockets.discard(sock)
            self._sockets.add(wrapped)
        super()._serve(wrapped)

    def _take(self, method: str, target: str, headers: dict[str, str]) -> Rule | None:
        if not (self.refuse_aws_chunked and is_aws_chunked(headers)):
            return super()._take(method, target, headers)
        with self._lock:  # recorded like any request, but no injected fault is used up
            self.requests += 1
            self.seen.append((method, target, headers))
        return Rule(Fault.HTTP_400, 0, hits=1)

    def aws_chunked_requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """The requests seen so far whose body was aws-chunked."""
        with self._lock:
            return [seen for seen in self.seen if is_aws_chunked(seen[2])]
