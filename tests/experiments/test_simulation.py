"""Integration: `poi simulate` through Flower's simulation engine (Ray), 5 subscribers,
2 rounds; a label-flipping subscriber is never selected; report.json keeps its contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

POI = [sys.executable, "-m", "server.cli"]
ROOT = Path(__file__).resolve().parents[2]


def _poi(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONWARNINGS": "ignore",
           "COLUMNS": "200"}
    return subprocess.run([*POI, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_simulation_never_selects_the_label_flipper(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _poi("simulate", "--out", str(out), "--run-config",
                "num-subscribers=5 num-server-rounds=2 partitioner=iid attack=label-flip "
                "attackers=2 seed=1")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    for key in ("strategy", "rounds", "final_accuracy", "attackers", "selected", "subscribers"):
        assert key in report
    assert report["strategy"] == "poi" and report["attackers"] == [2]
    assert len(report["rounds"]) == 2 and len(report["selected"]) == 2
    for rnd in report["rounds"]:
        for key in ("accuracy", "loss", "candidates", "selected", "rejected"):
            assert key in rnd
        assert len(rnd["candidates"]) == 5
        assert all(c["author"] in range(5) and c["score"] is not None for c in rnd["candidates"])
    assert all(sel and 2 not in sel for sel in report["selected"])
    subscribers = {s["partition_id"]: s for s in report["subscribers"]}
    assert subscribers[2]["attacker"] and not subscribers[0]["attacker"]
    assert all(s["epsilon"] > 0 for s in subscribers.values())
    assert report["final_accuracy"] > report["initial_accuracy"]
    assert "round   2" in done.stdout and "selected [" in done.stdout
    ledger = report["ledger"]
    assert ledger["size"] > 2 * 5 and ledger["cosignatures"] >= 2 * 5
    verified = _poi("ledger", "verify", str(out), timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert str(ledger["size"]) in verified.stdout
    again = _poi("simulate", "--out", str(out), "--run-config", "num-subscribers=2",
                 timeout=120)
    assert again.returncode == 2 and "already holds a run" in again.stdout


def test_bad_configuration_stops_before_training(tmp_path: Path) -> None:
    done = _poi("simulate", "--out", str(tmp_path / "x"), "--run-config",
                "strategy=fedprox num-subscribers=4", timeout=120)
    assert done.returncode == 2
    assert "strategy: expected one of ['poi', 'fedavg'" in done.stdout
    assert not (tmp_path / "x" / "report.json").exists()
    done = _poi("simulate", "--out", str(tmp_path / "y"), "--run-config",
                "attack=noise attackers=0,1,2,3,4 num-subscribers=4", timeout=120)
    assert done.returncode == 2 and "attackers: 5 attackers but only 4" in done.stdout
