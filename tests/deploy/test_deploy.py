"""``poi deploy``: keys (modes, SANs, OpenSSH EC format), refusals (missing certificate,
occupied port), process-group teardown, and one real deployment on loopback: a SuperLink
with TLS and node authentication, 3 SuperNodes, 2 rounds of Proof-of-Intelligence, an
unregistered and a plain-HTTP SuperNode refused, bad node configs answered with errors
while the round goes on, and no process left behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from typer.testing import CliRunner

from server import deploy as D

ROOT = Path(__file__).resolve().parents[2]


def poi(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


# ----------------------------------------------------------------------------- keys
@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> D.KeyLayout:
    root = tmp_path_factory.mktemp("keys")
    D.create_keys(root, nodes=2)
    return D.KeyLayout(root)


def test_private_keys_are_0600_and_public_files_readable(keys: D.KeyLayout) -> None:
    secrets = [keys.ca_key, keys.superlink_key]
    for index in range(2):
        secrets += [keys.auth_key(index), keys.ledger_key(index)]
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (keys.ca_cert, keys.superlink_cert, keys.auth_pub(0)):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0o044, path


def test_superlink_certificate_has_default_sans_and_is_signed_by_the_ca(
        keys: D.KeyLayout) -> None:
    assert D.certificate_sans(keys.superlink_cert) == ["127.0.0.1", "localhost"]
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(keys.superlink_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_configured_sans(tmp_path: Path) -> None:
    D.create_keys(tmp_path, nodes=0, sans=["link.example.org", "10.1.2.3"])
    assert D.certificate_sans(tmp_path / "superlink.crt") == ["link.example.org", "10.1.2.3"]
    assert not (tmp_path / "nodes").exists()
    with pytest.raises(D.DeployError, match="at least one host name"):
        D.create_keys(tmp_path / "other", nodes=1, sans=[" "])


def test_tls_handshake_succeeds_for_each_san_and_fails_for_another_name(
        keys: D.KeyLayout) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(keys.superlink_cert, keys.superlink_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(3):
            conn, _addr = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(keys.ca_cert))
    for name in ("127.0.0.1", "localhost"):
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(b"x")
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        client_ctx.wrap_socket(raw, server_hostname="elsewhere.example.org")
    listener.close()


def test_node_auth_keys_are_nist_ec_in_openssh_format_and_flower_accepts_them(
        keys: D.KeyLayout) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    private = load_ssh_private_key(keys.auth_key(0).read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert keys.auth_key(0).read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    public_line = keys.auth_pub(0).read_text()
    assert public_line.startswith("ecdsa-sha2-nistp384 ")
    assert try_load_public_key(keys.auth_pub(0))  # Flower's own loader for register
    from cryptography.hazmat.primitives import serialization
    mine = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH)
    assert public_line.strip().encode() == mine
    assert keys.auth_pub(0).read_text() != keys.auth_pub(1).read_text()


def test_ledger_keys_are_ed25519_signers(keys: D.KeyLayout) -> None:
    from ledger.keys import Signer

    first, second = Signer.load(keys.ledger_key(0)), Signer.load(keys.ledger_key(1))
    assert first.key_id != second.key_id


def test_existing_files_are_kept_and_missing_nodes_added(tmp_path: Path) -> None:
    D.create_keys(tmp_path, nodes=1)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = D.create_keys(tmp_path, nodes=2)
    assert set(result.kept) == set(before)
    assert {p.name for p in result.created} == {"auth.key", "auth.pub", "ledger.pem"}
    assert all(p.read_bytes() == data for p, data in before.items())
    (tmp_path / "ca.key").unlink()
    with pytest.raises(D.DeployError, match=r"ca\.crt without .*ca\.key"):
        D.create_keys(tmp_path, nodes=2)


def test_keys_command(tmp_path: Path) -> None:
    from server.cli import app

    result = CliRunner().invoke(app, ["deploy", "keys", str(tmp_path / "k"), "--nodes", "1",
                                      "--san", "localhost"])
    assert result.exit_code == 0, result.output
    assert "created 7 files" in result.output
    assert D.certificate_sans(tmp_path / "k" / "superlink.crt") == ["localhost"]


# ------------------------------------------------------------------------- refusals
def test_up_refuses_a_missing_certificate_and_says_which(tmp_path: Path,
                                                         keys: D.KeyLayout) -> None:
    from server.cli import app

    partial = tmp_path / "keys"
    D.create_keys(partial, nodes=2)
    (partial / "superlink.crt").unlink()
    with pytest.raises(D.MissingFile, match=r"superlink\.crt"):
        D.up(D.UpOptions(work=tmp_path / "w", keys=partial, nodes=2))
    with pytest.raises(D.MissingFile, match=r"node-2/auth\.key.*poi deploy keys"):
        D.up(D.UpOptions(work=tmp_path / "w", keys=keys.root, nodes=3))
    result = CliRunner().invoke(app, ["deploy", "up", "--workdir", str(tmp_path / "w"),
                                      "--keys", str(partial), "--nodes", "2"])
    assert result.exit_code == 2
    assert "superlink.crt" in result.output
    assert not (tmp_path / "w").exists()  # refused before anything started


def test_up_refuses_an_occupied_port_and_says_which(tmp_path: Path, keys: D.KeyLayout) -> None:
    from server.cli import app

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(D.PortInUse, match=f"port {port} on 127.0.0.1 is already in use"):
            D.up(D.UpOptions(work=tmp_path / "w", keys=keys.root, nodes=2, port=port))
        result = CliRunner().invoke(app, ["deploy", "up", "--workdir", str(tmp_path / "w"),
                                          "--keys", str(keys.root), "--nodes", "2",
                                          "--port", str(port)])
    assert result.exit_code == 2
    assert f"port {port}" in result.output
    assert not (tmp_path / "w").exists()


def test_add_node_wants_one_ledger_key_per_data_file(tmp_path: Path) -> None:
    from server.cli import app

    result = CliRunner().invoke(app, ["deploy", "add-node", "--workdir", str(tmp_path),
                                      "--data", "a.npz", "--data", "b.npz",
                                      "--ledger-key", "a.pem"])
    assert result.exit_code == 2
    assert "2 --data, 1 --ledger-key" in result.output


def test_run_and_down_refuse_without_a_deployment(tmp_path: Path) -> None:
    from server.cli import app

    for command in ("run", "down"):
        result = CliRunner().invoke(app, ["deploy", command, "--workdir", str(tmp_path)])
        assert result.exit_code == 2
        assert "no deployment in" in result.output


# --------------------------------------------------------------------- pure helpers
def test_config_strings_round_trip_through_flower_and_toml() -> None:
    from flwr.common.config import parse_config_args

    node = {"data-path": "/data/my file.npz", "ledger-key": "/k/ledger.pem",
            "partition-id": 3, "max-epsilon": 8.5}
    assert parse_config_args([D.node_config_string(node)]) == node
    with pytest.raises(D.DeployError, match="quote"):
        D.node_config_string({"data-path": "/it's.npz"})
    run = {"num-server-rounds": 2, "out-dir": '/tmp/a "b"\\c', "require-improvement": True,
           "target-delta": 1e-5, "attackers": "1,2"}
    assert tomllib.loads(D.config_toml(run)) == run
    with pytest.raises(D.DeployError, match="config key"):
        D.config_toml({"bad key": 1})


def test_last_json_skips_other_output() -> None:
    assert D.last_json('Loading project\n{"success": true, "run-id": 7}\n')["run-id"] == 7
    with pytest.raises(D.DeployError, match="expected JSON"):
        D.last_json("no json here")


def test_descendant_groups_follow_children_into_new_sessions() -> None:
    P = D.ProcessInfo
    procs = [P(10, 1, 10, False, "flower-superlink"), P(11, 10, 11, False, "flower-superexec"),
             P(12, 11, 11, False, "flwr-serverapp"), P(13, 11, 11, True, "<defunct>"),
             P(20, 1, 20, False, "unrelated")]
    assert D.descendant_groups(procs, [10]) == {11}
    assert D.live_members(procs, [11]) == procs[1:3]


def test_stop_groups_terms_then_kills_the_whole_group() -> None:
    polite = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"],
                                start_new_session=True)
    time.sleep(0.3)
    try:
        killed = D.stop_groups([polite.pid, stubborn.pid], timeout=1.0)
        assert killed == [stubborn.pid]
        assert D.live_members(D.list_processes(), [polite.pid, stubborn.pid]) == []
    finally:
        for proc in (polite, stubborn):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _fake_state(tmp_path: Path, nodes: int) -> D.DeployState:
    state = D.DeployState(work=str(tmp_path), keys=str(tmp_path), host="127.0.0.1", port=1,
                          connect_host="127.0.0.1", flwr_home=str(tmp_path / "fh"),
                          isolation="subprocess", exec_poll_seconds=None)
    process = D.ProcessRecord("n", 1, 1, marker="x")
    state.nodes = [D.NodeRecord(f"node-{i}", str(i), process, 0, "", "", "", "", i)
                   for i in range(nodes)]
    return state


def test_submit_checks_the_run_config_before_flwr(tmp_path: Path) -> None:
    state = _fake_state(tmp_path, 3)
    with pytest.raises(D.DeployError, match="this deployment has 3 nodes, the run config says 5"):
        D.submit(state, app_dir=ROOT, run_config={"num-subscribers": 5}, out_dir=tmp_path)
    with pytest.raises(D.DeployError, match="run config: unknown run-config key"):
        D.submit(state, app_dir=ROOT, run_config={"no-such-knob": 1}, out_dir=tmp_path)
    with pytest.raises(D.MissingFile, match="pyproject.toml"):
        D.submit(state, app_dir=tmp_path, run_config={}, out_dir=tmp_path)
    # the nodes' files come from the pool `up` partitioned: a run on another is refused
    state.dataset, state.dataset_size = "mnist1d", 2000
    with pytest.raises(D.DeployError, match=r"the nodes' data files come from mnist1d "
                                            r"\(dataset-size 2000\), the run config says "
                                            r"digits \(dataset-size 0\)"):
        D.submit(state, app_dir=ROOT, run_config={}, out_dir=tmp_path)
    with pytest.raises(D.DeployError, match=r"says mnist1d \(dataset-size 3000\)"):
        D.submit(state, app_dir=ROOT, run_config={"dataset": "mnist1d", "dataset-size": 3000},
                 out_dir=tmp_path)


def test_follow_trusts_flwr_ls_and_checks_sooner_when_the_probe_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _fake_state(tmp_path, 2)
    answers = iter(["starting", "running", "running", "finished:failed"])
    asked: list[float] = []

    def status(_state: D.DeployState, _run_id: int) -> str:
        asked.append(time.monotonic())
        return next(answers)

    monkeypatch.setattr(D.lifecycle, "run_status", status)  # where follow looks it up
    state.runs = [D.RunRecord(run_id=7, out_dir=str(tmp_path))]
    clock = iter(range(1000))
    started = time.monotonic()
    seen: list[str] = []
    result = D.follow(state, 7, poll_seconds=60, on_poll=seen.append,
                      probe=lambda: next(clock) // 2)
    assert result == "finished:failed" and seen[-1] == "finished:failed"
    assert time.monotonic() - started < 5  # the probe, not the 60 s poll, woke it
    assert D.load_state(tmp_path).runs[0].status == "finished:failed"

    monkeypatch.setattr(D.lifecycle, "run_status", lambda *_: "running")
    with pytest.raises(D.DeployError, match="still running after 1 s"):
        D.follow(state, 7, timeout=1, poll_seconds=0.5)


# ----------------------------------------------------------------------- end to end
@dataclass
class Deployment:
    keys: D.KeyLayout
    work: Path
    state: D.DeployState


def _leftovers(work: Path, state: D.DeployState | None) -> list[D.ProcessInfo]:
    procs = D.list_processes()
    marks = [str(work)]
    if state is not None:
        marks += [f"127.0.0.1:{port}" for port in
                  (state.port, *(n.runtime_port for n in state.nodes))]
    pattern = re.compile("|".join(rf"{re.escape(m)}(?![\w.])" for m in marks))
    me = os.getpid()
    return [p for p in procs if not p.zombie and p.pid != me
            and pattern.search(p.args) and "pytest" not in p.args]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    keys, work = root / "keys", root / "work"
    assert poi("deploy", "keys", keys, "--nodes", "3").returncode == 0
    state: D.DeployState | None = None
    try:
        done = poi("deploy", "up", "--nodes", "3", "--keys", keys, "--workdir", work)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "3 SuperNodes online" in done.stdout
        state = D.load_state(work)
        yield Deployment(D.KeyLayout(keys), work, state)
    finally:
        if (work / D.STATE_FILE).is_file():
            state = D.load_state(work)
            down = poi("deploy", "down", "--workdir", work)
            left = _leftovers(work, state)
            for proc in left:  # never leave them, even when down failed
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pgid, signal.SIGKILL)
            assert down.returncode == 0, down.stdout + down.stderr
            assert left == [], f"left behind: {left}"


def _supernode(deployment: Deployment, tmp_path: Path, *extra: str) -> tuple[int, str]:
    """Run a SuperNode that should fail to join; its exit code and output. Output goes to
    a file, not a pipe: its SuperExec child would hold a pipe open until it notices the
    SuperNode is gone, which it only does once we have reaped it."""
    cmd = [D.tool("flower-supernode"), "--superlink", deployment.state.address,
           "--port", str(D.free_port()), "--max-retries", "1", "--max-wait-time", "10",
           "--node-config", "partition-id=9", *extra]
    log = tmp_path / "supernode.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=D.child_env(tmp_path / "flwr-home"), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return code, log.read_text(errors="replace")


def test_up_started_one_flwr_home_data_file_and_ledger_key_per_node(
        deployment: Deployment) -> None:
    state = deployment.state
    assert len(state.nodes) == 3
    assert len({n.flwr_home for n in state.nodes}) == 3
    assert len({n.runtime_port for n in state.nodes} | {state.port}) == 4
    assert D.online_nodes(state) == {n.node_id for n in state.nodes}
    for index, node in enumerate(state.nodes):
        assert Path(node.data_path).is_file()
        assert node.ledger_key == str(deployment.keys.ledger_key(index))
    config = tomllib.loads((Path(state.flwr_home) / "config.toml").read_text())
    assert config["superlink"][D.CONNECTION]["root-certificates"] == str(deployment.keys.ca_cert)
    # poi deploy's defaults: process isolation with our warm SuperExec, a 0.1 s task poll
    assert state.isolation == "process" and state.exec_poll_seconds == 0.1
    superexecs = [p for p in state.extra if p.name.endswith("-superexec")
                  and p.name.startswith("node-")]
    assert len(superexecs) == 3
    for record in superexecs:
        assert "forking one child per ClientApp task" in Path(record.log).read_text()
    assert state.node_poll_seconds == 0.1
    for node in state.nodes:  # the SuperNode launcher with the backoff idle wait
        assert "poi supernode: idle poll 0.1 s" in Path(node.process.log).read_text()


def test_a_supernode_whose_key_was_not_registered_is_refused(
        deployment: Deployment, tmp_path: Path) -> None:
    D.create_node_auth_key(tmp_path / "auth.key", tmp_path / "auth.pub")
    code, output = _supernode(deployment, tmp_path, "--root-certificates",
                              str(deployment.keys.ca_cert),
                              "--auth-supernode-private-key", str(tmp_path / "auth.key"))
    assert code != 0
    assert "Failed to initialize the connection to the SuperLink" in output
    assert "Failed to activate SuperNode" in output
    assert D.online_nodes(deployment.state) == {n.node_id for n in deployment.state.nodes}


def test_a_supernode_without_tls_cannot_connect(deployment: Deployment, tmp_path: Path) -> None:
    code, output = _supernode(deployment, tmp_path, "--insecure")
    assert code != 0
    assert "Failed to initialize the connection to the SuperLink" in output
    assert D.online_nodes(deployment.state) == {n.node_id for n in deployment.state.nodes}


def _assert_marginal_acceptance(rnd: dict) -> None:
    """The marginal vote applied exactly the candidates its rule accepts (deployed DP
    noise is not seeded, so how many varies): positive author score and validation
    marginal, best scores first."""
    accepted = [c for c in rnd["candidates"]
                if c["score"] is not None and c["author_score"] > 0
                and c["validation_marginal"] > 0]
    accepted.sort(key=lambda c: (-c["score"], c["id"]))
    assert rnd["selected"] == [c["author"] for c in accepted]


def test_two_rounds_of_poi_complete_with_every_candidate_and_vote_on_the_ledger(
        deployment: Deployment) -> None:
    done = poi("deploy", "run", "--workdir", deployment.work,
               "--run-config", "num-server-rounds=2 local-epochs=1", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finished:completed" in done.stdout
    out = deployment.work / "run"
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["num-subscribers"] == 3 and len(report["rounds"]) == 2
    for rnd in report["rounds"]:
        assert sorted(c["author"] for c in rnd["candidates"]) == [0, 1, 2]
        assert all(c["num_votes"] == 2 for c in rnd["candidates"])  # every other node voted
        assert rnd["rejected"] == [] and rnd["rejected_votes"] == []
        _assert_marginal_acceptance(rnd)
    assert report["ledger"]["cosignatures"] > 0
    assert report["market"]["audit_ok"]
    verify = poi("ledger", "verify", out)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    audit = poi("audit", out)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_flowers_own_launcher_still_runs_a_round(deployment: Deployment, tmp_path: Path) -> None:
    """--isolation subprocess (each SuperNode starts Flower's flower-superexec, a fresh
    ClientApp interpreter per message, Flower's 1 s task poll): what a subscriber who
    runs flower-supernode by hand gets."""
    work = tmp_path / "flower-launcher"
    up = poi("deploy", "up", "--nodes", "2", "--keys", deployment.keys.root, "--workdir", work,
             "--isolation", "subprocess", "--node-poll", "0", "--exec-poll", "1")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = D.load_state(work)
        assert state.isolation == "subprocess" and not [
            p for p in state.extra if p.name.startswith("node-")]
        assert state.node_poll_seconds is None  # --node-poll 0: flower-supernode as it is
        assert "poi supernode" not in Path(state.nodes[0].process.log).read_text()
        done = poi("deploy", "run", "--workdir", work,
                   "--run-config", "num-server-rounds=1 local-epochs=1", timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads((work / "run" / "report.json").read_text())
        (rnd,) = report["rounds"]
        assert sorted(c["author"] for c in rnd["candidates"]) == [0, 1]
        assert report["market"]["audit_ok"]
    finally:
        down = poi("deploy", "down", "--workdir", work)
        assert down.returncode == 0, down.stdout + down.stderr


def test_bad_node_configs_get_error_replies_and_the_round_goes_on(
        deployment: Deployment, tmp_path: Path) -> None:
    malformed = tmp_path / "malformed.npz"
    malformed.write_bytes(b"this is not a zip archive")
    bad_key = tmp_path / "bad-ledger.pem"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    good_key = deployment.keys.ledger_key(0).parent.parent / "spare.pem"
    from ledger.keys import Signer
    Signer.generate().save(good_key, private=True)
    good_data = Path(deployment.state.nodes[0].data_path)
    bad = {"missing-data": (tmp_path / "absent.npz", good_key),
           "malformed-data": (malformed, good_key),
           "malformed-key": (good_data, bad_key),
           "missing-key": (good_data, tmp_path / "absent-ledger.pem")}
    args: list[object] = []
    for name, (data, key) in bad.items():
        args += ["--name", name, "--data", data, "--ledger-key", key]
    added = poi("deploy", "add-node", "--workdir", deployment.work, *args)
    assert added.returncode == 0, added.stdout + added.stderr
    assert added.stdout.count("online") == 4
    out = deployment.work / "bad-configs"
    done = poi("deploy", "run", "--workdir", deployment.work, "--out", out,
               "--run-config", "num-server-rounds=1 local-epochs=1", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["num-subscribers"] == 7
    (rnd,) = report["rounds"]
    assert sorted(c["author"] for c in rnd["candidates"]) == [0, 1, 2]
    reasons = sorted(r["reason"] for r in rnd["rejected"])
    assert len(reasons) == 4, reasons
    assert all(r.startswith("subscriber error: ") for r in reasons)
    assert any("data-path: no such file" in r and "absent.npz" in r for r in reasons)
    assert any("data-path malformed.npz: cannot read it" in r for r in reasons)
    assert any("ledger-key bad-ledger.pem: cannot read it" in r for r in reasons)
    assert any("ledger-key: no such file" in r and "absent-ledger.pem" in r for r in reasons)
    _assert_marginal_acceptance(rnd)


def test_run_exits_1_when_the_run_does_not_complete(deployment: Deployment) -> None:
    out = deployment.work / "failed"
    done = poi("deploy", "run", "--workdir", deployment.work, "--out", out,
               "--run-config", "num-server-rounds=1 validation-path=/nonexistent.npz",
               timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "finished:failed" in done.stdout
    assert "no such file '/nonexistent.npz'" in done.stdout  # the run's log, shown
