"""Flower's deployment engine on loopback or on several hosts: keys, a SuperLink with TLS
and SuperNode authentication, SuperNodes with their own data and ledger keys, runs
followed to their recorded status, and a teardown by process group.

Everything here is what docs/deployment.md tells a user to do by hand with
``flower-superlink``, ``flower-supernode`` and ``flwr``; this module saves the typing and
keeps what it started in ``WORK/deploy.json`` so that ``run`` and ``down`` find it.

Layout of a keys folder (``create_keys``)::

    ca.crt  ca.key                   the deployment's own certificate authority
    superlink.crt  superlink.key     the SuperLink's TLS certificate (SANs configurable)
    nodes/node-<i>/auth.key          SuperNode authentication key, NIST P-384, OpenSSH
    nodes/node-<i>/auth.pub          its public half, registered with ``flwr supernode register``
    nodes/node-<i>/ledger.pem        the subscriber's Ed25519 ledger key (PKCS#8)

Private keys are written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ledger.keys import Signer

__all__ = [
    "DEFAULT_SANS",
    "DeployError",
    "DeployState",
    "KeyLayout",
    "MissingFile",
    "NodeRecord",
    "PortInUse",
    "UpOptions",
    "NewNode",
    "add_nodes",
    "certificate_sans",
    "check_keys",
    "create_keys",
    "down",
    "ensure_port_free",
    "follow",
    "load_state",
    "submit",
    "up",
]

DEFAULT_SANS = ("127.0.0.1", "localhost")
CONNECTION = "poi-deploy"  # the connection name in WORK/flwr-home/config.toml
STATE_FILE = "deploy.json"
STATE_VERSION = 1
NODE_AUTH_CURVE = ec.SECP384R1()  # Flower wants a NIST curve for node keys, not Ed25519
TLS_CURVE = ec.SECP256R1()
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL: the one polling interval Flower 1.41 lets us set.
EXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
ISOLATIONS = ("subprocess", "process")
_TOOLS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")


# ---------------------------------------------------------------------------- errors
class DeployError(RuntimeError):
    """A deployment could not start, run or stop; the message says which part and why."""


class MissingFile(DeployError):
    """A certificate, key or other file the deployment needs is not there."""


class PortInUse(DeployError):
    """A port the deployment must listen on is taken by another process."""


# ------------------------------------------------------------------------------ keys
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


# ----------------------------------------------------------------------------- ports
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_port_free(host: str, port: int, *, role: str) -> None:
    """Raise :class:`PortInUse` when ``host:port`` cannot be bound (``role`` says who
    wanted it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUse(
                f"port {port} on {host} is already in use ({role}): stop what holds it, "
                f"or choose another port ({exc.strerror})") from None


# ------------------------------------------------------------------- config strings
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_value(value: object) -> str:
    """A TOML literal for a run- or node-config value (bool, int, float, str)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = []
        for char in value:
            if char in '"\\':
                escaped.append("\\" + char)
            elif ord(char) < 0x20 or ord(char) == 0x7F:
                escaped.append(f"\\u{ord(char):04x}")
            else:
                escaped.append(char)
        return '"' + "".join(escaped) + '"'
    raise DeployError(f"config value: expected a bool, number or string, got {value!r}")


def config_toml(mapping: Mapping[str, object]) -> str:
    """``key = value`` lines that ``flwr run --run-config FILE.toml`` reads."""
    lines = []
    for key, value in mapping.items():
        if not _KEY.match(key):
            raise DeployError(f"config key: expected letters, digits, - or _, got {key!r}")
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def node_config_string(mapping: Mapping[str, object]) -> str:
    """Flower's ``--node-config "k=v k=v"``; strings become single-quoted TOML literals
    (Flower's parser splits on spaces outside quotes and allows no escapes)."""
    parts = []
    for key, value in mapping.items():
        if not _KEY.match(key):
            raise DeployError(f"node config key: expected letters, digits, - or _, got {key!r}")
        if isinstance(value, str):
            if "'" in value or "\n" in value:
                raise DeployError(f"node config {key}: a quote or newline in {value!r} cannot "
                                  "pass through --node-config; rename the file")
            parts.append(f"{key}='{value}'")
        else:
            parts.append(f"{key}={toml_value(value)}")
    return " ".join(parts)


# ------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    pgid: int
    zombie: bool
    args: str


def list_processes() -> list[ProcessInfo]:
    """Every process on the machine (``ps``; Linux and macOS)."""
    out = subprocess.run(["ps", "-A", "-ww", "-o", "pid=,ppid=,pgid=,stat=,args="],
                         capture_output=True, text=True, check=True).stdout
    procs = []
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) < 4:
            continue
        procs.append(ProcessInfo(int(parts[0]), int(parts[1]), int(parts[2]),
                                 parts[3].startswith("Z"), parts[4] if len(parts) > 4 else ""))
    return procs


def live_members(procs: Iterable[ProcessInfo], pgids: Iterable[int]) -> list[ProcessInfo]:
    """Processes, zombies excepted, whose group is one of ``pgids``."""
    groups = set(pgids)
    return [p for p in procs if p.pgid in groups and not p.zombie]


def descendant_groups(procs: Sequence[ProcessInfo], roots: Iterable[int]) -> set[int]:
    """The process groups of every live descendant of ``roots`` (a SuperLink starts its
    SuperExec in a new session, so killing the SuperLink's group alone misses it)."""
    children: dict[int, list[ProcessInfo]] = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
    groups: set[int] = set()
    stack = list(roots)
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        for child in children.get(pid, []):
            if child.pid in seen or child.zombie:
                continue
            seen.add(child.pid)
            groups.add(child.pgid)
            stack.append(child.pid)
    return groups


def stop_groups(pgids: Iterable[int], *, timeout: float = 10.0) -> list[int]:
    """SIGTERM each process group, wait up to ``timeout`` s, SIGKILL what is left.
    Returns the groups that needed SIGKILL."""
    groups = sorted(set(pgids))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not live_members(list_processes(), groups):
            return []
        time.sleep(0.1)
    stubborn = sorted({p.pgid for p in live_members(list_processes(), groups)})
    for pgid in stubborn:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while live_members(list_processes(), stubborn) and time.monotonic() < deadline:
        time.sleep(0.1)
    return stubborn


def _spawn(cmd: Sequence[str], *, env: Mapping[str, str], log_path: Path,
           cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session (so its own process group); stdout and stderr go
    to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
                                start_new_session=True)


def _alive(pid: int) -> bool:
    for proc in list_processes():
        if proc.pid == pid:
            return not proc.zombie
    return False


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ----------------------------------------------------------------------------- state
@dataclass
class ProcessRecord:
    """A process group ``up`` started; ``marker`` is a string its command line holds,
    checked before signalling so a recycled group id is never killed."""

    name: str
    pid: int
    pgid: int
    marker: str
    log: str = ""


@dataclass
class NodeRecord:
    name: str
    node_id: str
    process: ProcessRecord
    runtime_port: int
    flwr_home: str
    data_path: str
    ledger_key: str
    auth_key: str
    partition_id: int


@dataclass
class RunRecord:
    run_id: int
    out_dir: str
    status: str = "submitted"


@dataclass
class DeployState:
    """What ``up`` started, saved as ``WORK/deploy.json``."""

    work: str
    keys: str
    host: str
    port: int
    connect_host: str
    flwr_home: str
    isolation: str
    exec_poll_seconds: float | None
    superexec: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    superlink: ProcessRecord | None = None
    nodes: list[NodeRecord] = field(default_factory=list)
    extra: list[ProcessRecord] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    stopped: bool = False
    version: int = STATE_VERSION

    @property
    def address(self) -> str:
        return f"{self.connect_host}:{self.port}"

    @property
    def path(self) -> Path:
        return Path(self.work) / STATE_FILE

    def records(self) -> list[ProcessRecord]:
        heads = [self.superlink] if self.superlink else []
        return [*heads, *self.extra, *(n.process for n in self.nodes)]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeployState:
        data = dict(data)
        if data.get("version") != STATE_VERSION:
            raise DeployError(f"deploy.json: expected version {STATE_VERSION}, "
                              f"got {data.get('version')!r}")
        link = data.pop("superlink")
        nodes = data.pop("nodes")
        extra = data.pop("extra")
        runs = data.pop("runs")
        return cls(
            **data,
            superlink=ProcessRecord(**link) if link else None,
            nodes=[NodeRecord(**{**n, "process": ProcessRecord(**n["process"])}) for n in nodes],
            extra=[ProcessRecord(**e) for e in extra],
            runs=[RunRecord(**r) for r in runs],
        )


def load_state(work: Path) -> DeployState:
    """The deployment recorded in ``work``; raises :class:`DeployError` when there is
    none or it cannot be read."""
    path = work / STATE_FILE
    if not path.is_file():
        raise DeployError(f"no deployment in {work} (expected {path}; run poi deploy up)")
    try:
        return DeployState.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise DeployError(f"{path}: cannot read it ({exc})") from exc


def _is_ours(record: ProcessRecord, procs: Sequence[ProcessInfo]) -> bool:
    return any(p.pgid == record.pgid and not p.zombie and record.marker in p.args
               for p in procs)


def running_records(state: DeployState) -> list[ProcessRecord]:
    procs = list_processes()
    return [r for r in state.records() if _is_ours(r, procs)]


# ------------------------------------------------------------------ environment, flwr
def tool(name: str) -> str:
    """A Flower executable: next to this interpreter first (the virtual environment),
    then on PATH. Raises :class:`MissingFile` when neither has it."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise MissingFile(f"cannot find the {name} executable (is flwr installed?)")
    return found


def child_env(flwr_home: Path, *, exec_poll_seconds: float | None = None,
              extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every process we start: its own FLWR_HOME, the virtual
    environment's bin first on PATH (Flower starts flower-superexec, flwr-serverapp and
    flwr-clientapp by name), no runtime dependency installation, no update check, no
    telemetry; then ``extra``."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.pop(EXEC_POLL_ENV, None)
    if exec_poll_seconds is not None:
        env[EXEC_POLL_ENV] = repr(float(exec_poll_seconds))
    env.update(extra or {})
    return env


def run_flwr(args: Sequence[str], *, flwr_home: Path, timeout: float = 120.0,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI with ``flwr_home``'s connections."""
    try:
        return subprocess.run([tool("flwr"), *args], capture_output=True, text=True,
                              env=child_env(flwr_home), cwd=cwd, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DeployError(f"flwr {' '.join(args[:2])} did not answer within {timeout:.0f} s"
                          ) from exc


def last_json(text: str) -> dict[str, Any]:
    """The last JSON object printed on stdout (flwr may print other lines first)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    with contextlib.suppress(ValueError):
        start = text.index("{")
        value = json.loads(text[start:])
        if isinstance(value, dict):
            return value
    raise DeployError(f"expected JSON from flwr, got: {text.strip()[-500:]!r}")


def flwr_json(args: Sequence[str], *, flwr_home: Path, timeout: float = 120.0,
              cwd: Path | None = None) -> dict[str, Any]:
    done = run_flwr([*args, "--format", "json"], flwr_home=flwr_home, timeout=timeout, cwd=cwd)
    try:
        payload = last_json(done.stdout)
    except DeployError:
        raise DeployError(f"flwr {' '.join(args[:2])} failed (exit {done.returncode}): "
                          f"{(done.stdout + done.stderr).strip()[-800:]}") from None
    if not payload.get("success", False):
        raise DeployError(f"flwr {' '.join(args[:2])} failed: "
                          f"{payload.get('error-message', payload)}")
    return payload


def write_connection(flwr_home: Path, *, address: str, ca_cert: Path) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection, the default: where
    ``flwr run``, ``flwr ls`` and ``flwr supernode`` read addresses and the root CA."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f"address = {toml_value(address)}\n"
        f"root-certificates = {toml_value(str(ca_cert.resolve()))}\n"
    )
    return path


# -------------------------------------------------------------------------------- up
@dataclass(frozen=True)
class UpOptions:
    """``poi deploy up``: where, how many nodes, which keys, and the isolation mode."""

    work: Path
    keys: Path
    nodes: int
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    seed: int = 0
    isolation: str = "subprocess"
    exec_poll_seconds: float | None = None  # None: Flower's default (1 s)
    timeout: float = 120.0
    # process isolation: the command that serves as each node's SuperExec (it gets
    # --runtime-api-address, --insecure and --parent-pid); default flower-superexec
    superexec: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)


def write_node_data(out_dir: Path, *, nodes: int, partitioner: str, dirichlet_alpha: float,
                    seed: int) -> list[Path]:
    """One ``.npz`` (x (n, 64) float32, y (n,) int64) per node: the same digits pool
    partitions a simulation of ``nodes`` subscribers with this config uses."""
    import numpy as np

    from client.task import load_partition

    paths = []
    for index in range(nodes):
        data = load_partition(index, nodes, partitioner=partitioner,
                              dirichlet_alpha=dirichlet_alpha, seed=seed)
        path = out_dir / node_name(index) / "data.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=data.x.astype(np.float32), y=data.y.astype(np.int64))
        paths.append(path)
    return paths


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _wait_for_health(state: DeployState, proc: subprocess.Popen[bytes], log: Path,
                     ca_cert: Path, timeout: float) -> None:
    context = ssl.create_default_context(cafile=str(ca_cert))
    url = f"https://{state.address}/health"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DeployError(f"the SuperLink exited with code {proc.returncode} before "
                              f"it was ready; its log ({log}) ends:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError, ssl.SSLError):
            pass
        if time.monotonic() > deadline:
            raise DeployError(f"the SuperLink did not answer {url} within {timeout:.0f} s; "
                              f"its log ({log}) ends:\n{log_tail(log)}")
        time.sleep(0.2)


def _register(state: DeployState, public_keys: Sequence[tuple[str, Path]]) -> dict[str, str]:
    """``flwr supernode register`` for each (name, public key) at once; node ids by name."""
    home = Path(state.flwr_home)
    procs = {
        name: subprocess.Popen(
            [tool("flwr"), "supernode", "register", str(pub), CONNECTION, "--name", name,
             "--format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(home))
        for name, pub in public_keys
    }
    ids = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
                other.wait()
            raise DeployError(f"flwr supernode register did not answer for {name} within "
                              "120 s") from None
        try:
            payload = last_json(out)
        except DeployError:
            payload = {}
        if not payload.get("success") or "node-id" not in payload:
            raise DeployError(f"flwr supernode register failed for {name} "
                              f"(exit {proc.returncode}): {(out + err).strip()[-800:]}")
        ids[name] = str(payload["node-id"])
    return ids


def online_nodes(state: DeployState) -> set[str]:
    payload = flwr_json(["supernode", "ls", CONNECTION], flwr_home=Path(state.flwr_home))
    return {str(n["node-id"]) for n in payload.get("nodes", []) if n.get("status") == "online"}


def _start_node(state: DeployState, *, name: str, node_id: str, auth_key: Path,
                data_path: Path, ledger_key: Path, partition_id: int) -> NodeRecord:
    work = Path(state.work)
    node_dir = work / "nodes" / name
    flwr_home = node_dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    runtime_port = free_port()
    config = node_config_string({"data-path": str(data_path), "ledger-key": str(ledger_key),
                                 "partition-id": partition_id})
    cmd = [tool("flower-supernode"), "--superlink", state.address,
           "--root-certificates", str(KeyLayout(Path(state.keys)).ca_cert),
           "--auth-supernode-private-key", str(auth_key),
           "--port", str(runtime_port), "--isolation", state.isolation,
           "--node-config", config]
    env = child_env(flwr_home, exec_poll_seconds=state.exec_poll_seconds,
                    extra=state.extra_env)
    log = node_dir / "supernode.log"
    proc = _spawn(cmd, env=env, log_path=log, cwd=node_dir)
    record = NodeRecord(
        name=name, node_id=node_id,
        process=ProcessRecord(name, proc.pid, proc.pid, marker=str(work), log=str(log)),
        runtime_port=runtime_port, flwr_home=str(flwr_home), data_path=str(data_path),
        ledger_key=str(ledger_key), auth_key=str(auth_key), partition_id=partition_id)
    state.nodes.append(record)
    state.save()
    if state.isolation == "process":
        # Flower's process isolation: we run the SuperExec that launches ClientApps.
        # (It cannot join the SuperNode's group: that is another session.)
        superexec = state.superexec or [tool("flower-superexec")]
        address = f"127.0.0.1:{runtime_port}"
        exec_proc = _spawn([*superexec, "--runtime-api-address", address, "--insecure",
                            "--parent-pid", str(proc.pid)],
                           env=env, log_path=node_dir / "superexec.log", cwd=node_dir)
        state.extra.append(ProcessRecord(f"{name}-superexec", exec_proc.pid, exec_proc.pid,
                                         marker=address, log=str(node_dir / "superexec.log")))
        state.save()
    return record


def _wait_online(state: DeployState, records: Sequence[NodeRecord], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    wanted = {r.node_id for r in records}
    while True:
        for record in records:
            if not _alive(record.process.pid):
                raise DeployError(
                    f"SuperNode {record.name} exited before it came online; its log "
                    f"({record.process.log}) ends:\n{log_tail(Path(record.process.log))}")
        if wanted <= online_nodes(state):
            return
        if time.monotonic() > deadline:
            raise DeployError(f"SuperNodes not online within {timeout:.0f} s: "
                              f"{sorted(wanted - online_nodes(state))}")
        time.sleep(0.5)


def up(options: UpOptions, *, echo: Callable[[str], None] = print) -> DeployState:
    """Start a SuperLink (TLS, ``--enable-supernode-auth``), register the node keys,
    start ``options.nodes`` SuperNodes, and return once all are online.

    Refuses (:class:`MissingFile`, :class:`PortInUse`, :class:`DeployError`) before
    starting anything when a certificate or key is missing, the port is taken or
    ``work`` already runs a deployment. On any later failure it stops what it started.
    """
    if options.nodes < 1:
        raise DeployError(f"--nodes: expected at least 1, got {options.nodes}")
    if options.isolation not in ISOLATIONS:
        raise DeployError(f"--isolation: expected one of {ISOLATIONS}, got {options.isolation!r}")
    if options.partitioner not in ("iid", "dirichlet"):
        raise DeployError(f"--partitioner: expected iid or dirichlet, got {options.partitioner!r}")
    if options.superexec and options.isolation != "process":
        raise DeployError("--superexec: only with --isolation process (in subprocess "
                          "isolation each SuperNode starts flower-superexec itself)")
    work = options.work.expanduser().resolve()
    keys = KeyLayout(options.keys.expanduser().resolve())
    check_keys(keys, options.nodes)
    for tool_name in _TOOLS:
        tool(tool_name)
    if (work / STATE_FILE).is_file():
        previous = load_state(work)
        alive = running_records(previous)
        if alive:
            names = ", ".join(r.name for r in alive)
            raise DeployError(f"{work} already runs a deployment ({names}): "
                              f"run poi deploy down --workdir {work} first")
    if options.port:
        ensure_port_free(options.host, options.port, role="the SuperLink's port")
    port = options.port or free_port(options.host)
    work.mkdir(parents=True, exist_ok=True)
    state = DeployState(
        work=str(work), keys=str(keys.root), host=options.host, port=port,
        connect_host=_connect_host(options.host), flwr_home=str(work / "flwr-home"),
        isolation=options.isolation, exec_poll_seconds=options.exec_poll_seconds,
        superexec=list(options.superexec), extra_env=dict(options.extra_env))
    state.save()
    try:
        _up(state, options, keys, echo)
    except BaseException:
        echo("stopping what was started")
        _stop(state)
        raise
    return state


def _up(state: DeployState, options: UpOptions, keys: KeyLayout,
        echo: Callable[[str], None]) -> None:
    work = Path(state.work)
    echo(f"writing {options.nodes} data files ({options.partitioner} partitions of the "
         "digits pool)")
    data_paths = write_node_data(work / "nodes", nodes=options.nodes,
                                 partitioner=options.partitioner,
                                 dirichlet_alpha=options.dirichlet_alpha, seed=options.seed)
    write_connection(Path(state.flwr_home), address=state.address, ca_cert=keys.ca_cert)

    link_dir = work / "superlink"
    link_dir.mkdir(parents=True, exist_ok=True)
    # A fresh deployment starts from a fresh SuperLink state: a previous one's database
    # would still hold its node registrations (and registering a key twice fails).
    for stale in link_dir.glob("state.db*"):
        stale.unlink()
    cmd = [tool("flower-superlink"), "--host", options.host, "--port", str(state.port),
           "--database", str(link_dir / "state.db"),
           "--ssl-ca-certfile", str(keys.ca_cert), "--ssl-certfile", str(keys.superlink_cert),
           "--ssl-keyfile", str(keys.superlink_key), "--enable-supernode-auth",
           "--disable-runtime-dependency-installation"]
    log = link_dir / "superlink.log"
    echo(f"starting the SuperLink on {options.host}:{state.port} (TLS, node authentication)")
    proc = _spawn(cmd, env=child_env(link_dir / "flwr-home",
                                     exec_poll_seconds=options.exec_poll_seconds,
                                     extra=options.extra_env),
                  log_path=log, cwd=link_dir)
    state.superlink = ProcessRecord("superlink", proc.pid, proc.pid, marker=str(work),
                                    log=str(log))
    state.save()
    _wait_for_health(state, proc, log, keys.ca_cert, options.timeout)
    # The SuperLink starts its SuperExec in a session of its own: record that group too.
    for pgid in sorted(descendant_groups(list_processes(), [proc.pid]) - {proc.pid}):
        state.extra.append(ProcessRecord("superlink-superexec", pgid, pgid,
                                         marker=f":{state.port}"))
    state.save()

    names = [node_name(i) for i in range(options.nodes)]
    echo(f"registering {options.nodes} SuperNode keys")
    ids = _register(state, [(n, keys.auth_pub(i)) for i, n in enumerate(names)])
    records = [
        _start_node(state, name=name, node_id=ids[name], auth_key=keys.auth_key(i),
                    data_path=data_paths[i], ledger_key=keys.ledger_key(i), partition_id=i)
        for i, name in enumerate(names)
    ]
    echo(f"waiting for {options.nodes} SuperNodes to come online")
    _wait_online(state, records, options.timeout)


@dataclass(frozen=True)
class NewNode:
    """A subscriber to add: its data file and ledger key, passed to the node as they are
    (a missing or malformed one is the node's to report, with an error reply)."""

    data_path: Path
    ledger_key: Path
    name: str | None = None


def add_nodes(work: Path, nodes: Sequence[NewNode], *, timeout: float = 120.0
              ) -> list[NodeRecord]:
    """Register and start more SuperNodes in a running deployment, each with its own
    authentication key (created under ``WORK/nodes/NAME``); returns once all are online.
    Partition ids (report labels) continue after the existing nodes'."""
    state = load_state(work.expanduser().resolve())
    if not state.superlink or not _is_ours(state.superlink, list_processes()):
        raise DeployError(f"no SuperLink running in {state.work}: run poi deploy up first")
    taken = {n.name for n in state.nodes}
    first = len(state.nodes)
    names = [node.name or node_name(first + i) for i, node in enumerate(nodes)]
    clash = sorted(taken & set(names)) or sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise DeployError(f"node name{'s' if len(clash) > 1 else ''} already used: "
                          f"{', '.join(clash)}")
    public_keys = []
    for name in names:
        node_dir = Path(state.work) / "nodes" / name
        if not (node_dir / "auth.key").exists():
            create_node_auth_key(node_dir / "auth.key", node_dir / "auth.pub")
        public_keys.append((name, node_dir / "auth.pub"))
    ids = _register(state, public_keys)
    records = []
    try:
        for index, (name, node) in enumerate(zip(names, nodes, strict=True)):
            node_dir = Path(state.work) / "nodes" / name
            records.append(_start_node(
                state, name=name, node_id=ids[name], auth_key=node_dir / "auth.key",
                data_path=node.data_path.expanduser().resolve(),
                ledger_key=node.ledger_key.expanduser().resolve(), partition_id=first + index))
        _wait_online(state, records, timeout)
    except BaseException:
        stop_groups([r.process.pgid for r in records])
        raise
    return records


# ------------------------------------------------------------------------------- run
def next_out_dir(work: Path) -> Path:
    """``WORK/run``, then ``WORK/run-2``, ...: the first that holds no run yet."""
    for index in range(1, 10_000):
        candidate = work / ("run" if index == 1 else f"run-{index}")
        if not candidate.exists() or not any(candidate.iterdir()):
            return candidate
    raise DeployError(f"{work}: no free run folder")


def submit(state: DeployState, *, app_dir: Path, run_config: Mapping[str, object],
           out_dir: Path) -> int:
    """``flwr run APP poi-deploy --run-config FILE``; returns the run id.

    ``num-subscribers`` is set to the number of nodes and ``out-dir`` to ``out_dir``
    (absolute); raises :class:`DeployError` when ``run_config`` says otherwise.
    """
    if not (app_dir / "pyproject.toml").is_file():
        raise MissingFile(f"expected a Flower app (pyproject.toml) in {app_dir}")
    config = dict(run_config)
    nodes = len(state.nodes)
    if int(config.get("num-subscribers", nodes)) != nodes:  # type: ignore[call-overload]
        raise DeployError(f"num-subscribers: this deployment has {nodes} nodes, the run "
                          f"config says {config['num-subscribers']}")
    config["num-subscribers"] = nodes
    config["out-dir"] = str(out_dir.resolve())
    from client.config import ConfigError, RunConfig

    try:
        RunConfig.from_mapping(config)
    except ConfigError as exc:
        raise DeployError(f"run config: {exc}") from None
    work = Path(state.work)
    config_path = work / "run-config.toml"
    config_path.write_text(config_toml(config))
    payload = flwr_json(["run", str(app_dir), CONNECTION, "--run-config", str(config_path)],
                        flwr_home=Path(state.flwr_home), cwd=app_dir, timeout=300)
    run_id = int(payload["run-id"])
    state.runs.append(RunRecord(run_id=run_id, out_dir=str(out_dir.resolve())))
    state.save()
    return run_id


def run_status(state: DeployState, run_id: int) -> str:
    """The run's status as ``flwr ls --run-id ID`` reports it (e.g. ``running``,
    ``finished:completed``)."""
    payload = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)],
                        flwr_home=Path(state.flwr_home))
    runs = payload.get("runs", [])
    if not runs:
        raise DeployError(f"flwr ls knows no run {run_id}")
    return str(runs[0]["status"])


def follow(state: DeployState, run_id: int, *, timeout: float = 3600.0,
           poll_seconds: float = 10.0, on_poll: Callable[[str], None] | None = None,
           probe: Callable[[], object] | None = None) -> str:
    """Ask ``flwr ls --run-id`` until the run is ``finished:*`` and return that status
    (never trust ``flwr run``'s exit code). Raises :class:`DeployError` on timeout or
    when the SuperLink dies.

    Each ``flwr ls`` costs about a CPU-second (a fresh interpreter importing flwr), which
    a 2-core machine takes from the run itself; so it is asked at most every
    ``poll_seconds``, and sooner (1 s, then backing off) after ``probe`` (a cheap check,
    e.g. the report's mtime) changes value, and at the start.
    """
    deadline = time.monotonic() + timeout
    failures = 0
    status = "unknown"
    interval = 1.0
    last_probe = probe() if probe else None
    while True:
        try:
            status = run_status(state, run_id)
            failures = 0
        except DeployError:
            failures += 1
            if failures >= 5:
                raise
        if on_poll is not None:
            on_poll(status)
        if status.startswith("finished:"):
            for record in state.runs:
                if record.run_id == run_id:
                    record.status = status
            state.save()
            return status
        if state.superlink and not _alive(state.superlink.pid):
            raise DeployError(f"the SuperLink exited while run {run_id} was {status}; its "
                              f"log ends:\n{log_tail(Path(state.superlink.log))}")
        next_check = time.monotonic() + interval
        interval = min(interval * 2, poll_seconds)
        while time.monotonic() < next_check:
            if time.monotonic() > deadline:
                raise DeployError(f"run {run_id} still {status} after {timeout:.0f} s")
            time.sleep(0.25)
            if probe is not None and (value := probe()) != last_probe:
                last_probe = value
                interval = 1.0
                break


def run_log(state: DeployState, run_id: int, lines: int = 30) -> str:
    done = run_flwr(["log", str(run_id), CONNECTION, "--show"],
                    flwr_home=Path(state.flwr_home), timeout=60)
    return "\n".join((done.stdout + done.stderr).splitlines()[-lines:])


# ------------------------------------------------------------------------------ down
def down(work: Path, *, timeout: float = 10.0) -> list[str]:
    """Stop every process group the deployment in ``work`` started (SuperNodes first,
    then the SuperLink with its SuperExec and ServerApp), SIGTERM then SIGKILL after
    ``timeout`` s. Returns the names of what was running. Raises :class:`DeployError`
    when there is no deployment or something survives SIGKILL."""
    state = load_state(work.expanduser().resolve())
    stopped = _stop(state, timeout=timeout)
    state.stopped = True
    state.save()
    return stopped


def _stop(state: DeployState, *, timeout: float = 10.0) -> list[str]:
    procs = list_processes()
    running = [r for r in state.records() if _is_ours(r, procs)]
    node_records = [n.process for n in state.nodes if n.process in running]
    link_records = [r for r in running if r not in node_records]
    node_groups = {r.pgid for r in node_records}
    node_groups |= descendant_groups(procs, [r.pid for r in node_records])
    link_groups = {r.pgid for r in link_records}
    link_groups |= descendant_groups(procs, [r.pid for r in link_records])
    stop_groups(node_groups, timeout=timeout)
    stop_groups(link_groups - node_groups, timeout=timeout)
    left = live_members(list_processes(), node_groups | link_groups)
    if left:
        raise DeployError("still running after SIGKILL: "
                          + ", ".join(f"{p.pid} ({p.args[:60]})" for p in left))
    return [r.name for r in running]
