"""Would per-class validation marginals tell label-flipped updates from honest ones?
(issue 11, a measurement, not a mechanism).

For each finished run folder given (e.g. the ``/tmp/poi-vote-*`` folders that
``scripts/vote-experiment.py`` leaves), replay the marginal vote from the ledger and, for
every round's candidates, compute on the revealed validation set the marginal the
Scientist publishes (g: including the candidate in the trusted mean lowers the loss by
g) and the same on each class's examples alone (g_k). Prints, per run, how well each
statistic separates honest candidates from attackers' (ROC AUC, 1.0 = every honest one
above every attacker), and what a gate "min_k g_k >= -t" would have done to the updates
the run actually applied.

    .venv/bin/python scripts/per-class-marginals.py /tmp/poi-vote-* [--t 0.01]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.marginal import marginal_ballot  # noqa: E402
from client.task import Dataset, model_of  # noqa: E402
from ledger import LogReader  # noqa: E402
from ledger.blobs import BlobStore  # noqa: E402
from server.market.replay import _tensors, check_reveal, read_market, replay  # noqa: E402


def auc(honest: list[float], attackers: list[float]) -> float:
    """P(an honest value > an attacker's value), ties count one half."""
    if not honest or not attackers:
        return float("nan")
    h, a = np.asarray(honest)[:, None], np.asarray(attackers)[None, :]
    return float(np.mean((h > a) + 0.5 * (h == a)))


def analyse(run: Path, threshold: float) -> dict[str, object] | None:
    report = json.loads((run / "report.json").read_text())
    bad_keys = {s["key_id"] for s in report["subscribers"] if s.get("attacker")}
    if not bad_keys:
        return None
    with LogReader.open(run / "ledger.db") as reader:
        record = read_market(list(reader.entries()))
    blobs = BlobStore.beside(run / "ledger.db")
    status, _, revealed = check_reveal(record, blobs)
    assert revealed is not None, status
    result = replay(record, blobs)
    architecture = record.offer["architecture"]
    model = model_of(architecture)
    data = Dataset(revealed.x, revealed.y)
    per_class = [Dataset(revealed.x[revealed.y == k], revealed.y[revealed.y == k])
                 for k in range(int(architecture["num_classes"]))]
    stats: dict[str, tuple[list[float], list[float]]] = {
        "g": ([], []), "min_k g_k": ([], []), "g - sum of negative g_k": ([], [])}
    applied = {"honest": [0, 0], "attacker": [0, 0]}  # [kept by the gate, applied]
    for rnd, plan in sorted(result.vote_rounds.items()):
        base_digest = record.models.get(rnd - 1, record.initial_model_digest) if rnd > 1 \
            else record.initial_model_digest
        base = _tensors(blobs, base_digest, "base")
        deltas = [_tensors(blobs, c, "update") for c in plan.candidates]
        members = [c in set(plan.trusted) for c in plan.candidates]
        args = (model, base, plan.trusted_mean, len(plan.trusted), deltas, members)
        g = marginal_ballot(*args, data)
        gk = np.asarray([marginal_ballot(*args, part) if len(part) else [0.0] * len(deltas)
                         for part in per_class])  # (classes, candidates)
        for i, candidate in enumerate(plan.candidates):
            bad = record.author_of(rnd, candidate) in bad_keys
            values = {"g": g[i], "min_k g_k": float(gk[:, i].min()),
                      "g - sum of negative g_k": g[i] + float(np.minimum(gk[:, i], 0).sum())}
            for name, value in values.items():
                stats[name][1 if bad else 0].append(value)
            if candidate in plan.tally.accepted:
                side = applied["attacker" if bad else "honest"]
                side[1] += 1
                side[0] += int(values["min_k g_k"] >= -threshold)
    return {"run": run.name, "seed": report.get("config", {}).get("seed"),
            "attack": report.get("config", {}).get("attack"),
            "auc": {name: round(auc(*pair), 3) for name, pair in stats.items()},
            "gate_kept": applied}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--t", type=float, default=0.01, help="gate: min_k g_k >= -t (nats)")
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "report.json").is_file():
            continue
        out = analyse(run, args.t)
        if out is not None:
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
