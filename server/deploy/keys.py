"""The keys of a deployment in :mod:`server.deploy`: its own certificate authority, the
SuperLink's TLS certificate for configurable SANs, each SuperNode's authentication key
pair (NIST P-384, OpenSSH) and Ed25519 ledger key, where :class:`KeyLayout` puts them, and
the check that a deployment finds every file it needs.

Layout of a keys folder (``create_keys``)::

    ca.crt  ca.key                   the deployment's own certificate authority
    superlink.crt  superlink.key     the SuperLink's TLS certificate (SANs configurable)
    nodes/node-<i>/auth.key          SuperNode authentication key, NIST P-384, OpenSSH
    nodes/node-<i>/auth.pub          its public half, registered with ``flwr supernode register``
    nodes/node-<i>/ledger.pem        the subscriber's Ed25519 ledger key (PKCS#8)

Private keys are written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ledger.keys import Signer
from server.deploy.errors import DeployError, MissingFile

DEFAULT_SANS = ("127.0.0.1", "localhost")
NODE_AUTH_CURVE = ec.SECP384R1()  # Flower wants a NIST curve for node keys, not Ed25519
TLS_CURVE = ec.SECP256R1()


@dataclass(frozen=True)
class KeyLayout:
    """Where ``create_keys`` puts each file under ``root``."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def superlink_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.root / "superlink.key"

    def node_dir(self, index: int) -> Path:
        return self.root / "nodes" / node_name(index)

    def auth_key(self, index: int) -> Path:
        return self.node_dir(index) / "auth.key"

    def auth_pub(self, index: int) -> Path:
        return self.node_dir(index) / "auth.pub"

    def ledger_key(self, index: int) -> Path:
        return self.node_dir(index) / "ledger.pem"

    def node_files(self, index: int) -> tuple[Path, Path, Path]:
        return self.auth_key(index), self.auth_pub(index), self.ledger_key(index)


def node_name(index: int) -> str:
    return f"node-{index}"


@dataclass(frozen=True)
class KeysResult:
    created: tuple[Path, ...]
    kept: tuple[Path, ...]


def write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600; refuses to replace an existing file
    (``FileExistsError``)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def _make_ca(*, valid_days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(TLS_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "poi deployment CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *,
                      sans: Sequence[str], valid_days: int
                      ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(TLS_CURVE)
    now = datetime.now(UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + timedelta(days=valid_days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_general_name(s) for s in sans]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def create_node_auth_key(private_path: Path, public_path: Path) -> None:
    """A SuperNode authentication key pair: NIST P-384 in OpenSSH format (what
    ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
    read). The private half is written 0600."""
    key = ec.generate_private_key(NODE_AUTH_CURVE)
    write_private(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    _write_public(public_path, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")


def create_keys(root: Path, *, nodes: int, sans: Sequence[str] = DEFAULT_SANS,
                valid_days: int = 365) -> KeysResult:
    """Create what is missing under ``root``: the CA, the SuperLink certificate for
    ``sans`` and, for nodes 0..nodes-1, the authentication key pair and the ledger key.
    Existing files are kept (so nodes can be added later), never overwritten.
    ``nodes=0`` makes the SuperLink's files only (subscribers create their own keys).

    Raises :class:`DeployError` for no SANs, ``nodes`` < 0, or a half-present pair (a
    certificate without its key, or the reverse).
    """
    if nodes < 0:
        raise DeployError(f"--nodes: expected 0 or more, got {nodes}")
    sans = [s.strip() for s in sans if s.strip()]
    if not sans:
        raise DeployError("--san: expected at least one host name or IP address, got none")
    layout = KeyLayout(root)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    created: list[Path] = []
    kept: list[Path] = []

    def pair(cert: Path, key: Path) -> bool:
        if cert.exists() != key.exists():
            have, lack = (cert, key) if cert.exists() else (key, cert)
            raise DeployError(f"found {have} without {lack}: remove it or restore the pair")
        return cert.exists()

    if pair(layout.ca_cert, layout.ca_key):
        ca_key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise DeployError(f"{layout.ca_key}: expected an EC private key")
        ca_cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
        kept += [layout.ca_cert, layout.ca_key]
    else:
        ca_key, ca_cert = _make_ca(valid_days=valid_days)
        write_private(layout.ca_key, _pem_private(ca_key))
        _write_public(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        created += [layout.ca_cert, layout.ca_key]

    if pair(layout.superlink_cert, layout.superlink_key):
        kept += [layout.superlink_cert, layout.superlink_key]
    else:
        key, cert = _make_server_cert(ca_key, ca_cert, sans=sans, valid_days=valid_days)
        write_private(layout.superlink_key, _pem_private(key))
        _write_public(layout.superlink_cert, cert.public_bytes(serialization.Encoding.PEM))
        created += [layout.superlink_cert, layout.superlink_key]

    for index in range(nodes):
        if pair(layout.auth_pub(index), layout.auth_key(index)):
            kept += [layout.auth_key(index), layout.auth_pub(index)]
        else:
            create_node_auth_key(layout.auth_key(index), layout.auth_pub(index))
            created += [layout.auth_key(index), layout.auth_pub(index)]
        if layout.ledger_key(index).exists():
            kept.append(layout.ledger_key(index))
        else:
            layout.ledger_key(index).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            Signer.generate().save(layout.ledger_key(index), private=True)
            created.append(layout.ledger_key(index))
    return KeysResult(tuple(created), tuple(kept))


def certificate_sans(path: Path) -> list[str]:
    """The subject alternative names of a PEM certificate, as strings."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in names]


def check_keys(layout: KeyLayout, nodes: int) -> None:
    """Raise :class:`MissingFile` naming every certificate or key a deployment of
    ``nodes`` nodes needs and does not find under ``layout.root``."""
    wanted = [layout.ca_cert, layout.superlink_cert, layout.superlink_key]
    for index in range(nodes):
        wanted += list(layout.node_files(index))
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        raise MissingFile(
            f"missing certificate or key file{'s' if len(missing) > 1 else ''}: "
            f"{', '.join(missing)} (create them with: poi deploy keys {layout.root} "
            f"--nodes {nodes})")
