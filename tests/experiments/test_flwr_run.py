"""`flwr run .` works: the documented script submits the app to a private local
SuperLink, follows the run to `finished:completed` and stops the SuperLink."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_flwr_run_completes_and_leaves_no_superlink(tmp_path: Path) -> None:
    out = tmp_path / "flwr-run"
    done = subprocess.run(
        [str(ROOT / "scripts" / "flwr-run-local.sh"), str(out),
         "num-server-rounds=1 partitioner=iid", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finished:completed" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == "poi" and len(report["rounds"]) == 1
    assert len(report["rounds"][0]["candidates"]) == 3
    left = subprocess.run(["pgrep", "-f", f"local-superlink.*{out}"], capture_output=True,
                          text=True, check=False)
    assert left.stdout.strip() == ""
