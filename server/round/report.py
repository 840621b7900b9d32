"""``report.json``: what a run did, round by round, in plain JSON (contract in README)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client.config import RunConfig
from server.round.strategy import RoundRecord


def _as_partition(author: str) -> int | str:
    return int(author) if author.isdigit() else author


def build_report(
    config: RunConfig,
    rounds: Sequence[RoundRecord],
    *,
    initial_metrics: dict[str, float],
    wall_seconds: float,
) -> dict[str, Any]:
    attackers = set(config.attacker_ids) if config.attack_kinds else set()
    round_objs = []
    epsilon: dict[str, float] = {}
    for record in rounds:
        epsilon.update(record.epsilon)
        round_objs.append({
            "round": record.server_round,
            "accuracy": record.metrics.get("accuracy"),
            "loss": record.metrics.get("loss"),
            "validation_loss": record.metrics.get("validation-loss"),
            "published_validation_loss": record.metrics.get("published-validation-loss"),
            "source_accuracy": record.metrics.get("source-accuracy"),
            "attack_success_rate": record.metrics.get("attack-success-rate"),
            "candidates": [
                {
                    "id": c.candidate_id,
                    "author": _as_partition(c.author),
                    "attacker": _as_partition(c.author) in attackers,
                    "score": c.score,
                    "improvement": c.improvement,
                    "num_votes": len(c.improvements),
                    "voters": c.voters,
                    "num_examples": c.num_examples,
                    "update_norm": c.update_norm,
                    "sample_epsilon": c.sample_epsilon,
                    "selected": c.selected,
                    "trusted": c.trusted,
                    "validation_marginal": c.validation_marginal,
                    "author_score": c.author_score,
                }
                for c in record.candidates
            ],
            "selected": [_as_partition(a) for a in record.selected],
            "rejected": [
                {**r, "author": _as_partition(r["author"])} for r in record.rejected
            ],
            "rejected_votes": record.rejected_votes,
            "voter_weights": {str(_as_partition(v)): w for v, w in record.voter_weights.items()},
            "voter_agreement": {str(_as_partition(v)): r
                                for v, r in record.voter_agreement.items()},
            "halted": record.halted or None,
            "attackers_applied": sum(1 for a in record.selected if _as_partition(a) in attackers),
            "phase_seconds": record.phase_seconds,
            "round_seconds": sum(record.phase_seconds.values()),
        })
    selected_known = config.strategy == "poi"
    round_seconds = [sum(r.phase_seconds.values()) for r in rounds]
    last = round_objs[-1] if round_objs else {}
    return {
        "strategy": config.strategy,
        "top_k": config.top_k if selected_known else None,
        "attack": config.attack,
        "attackers": sorted(attackers),
        "config": config.to_mapping(),
        "initial_accuracy": initial_metrics.get("accuracy"),
        "initial_loss": initial_metrics.get("loss"),
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        # The targeted flip's view (flip-source -> flip-target), in every run.
        "flip_source": config.flip_source,
        "flip_target": config.flip_target,
        "initial_source_accuracy": initial_metrics.get("source-accuracy"),
        "initial_attack_success_rate": initial_metrics.get("attack-success-rate"),
        "final_source_accuracy": last.get("source_accuracy"),
        "final_attack_success_rate": last.get("attack_success_rate"),
        "rounds": round_objs,
        # Flower's built-ins do not say whose update they used: null per round there.
        "selected": [r["selected"] if selected_known else None for r in round_objs],
        "subscribers": [
            {
                "partition_id": pid,
                "attacker": pid in attackers,
                "epsilon": epsilon.get(str(pid)),
            }
            for pid in range(config.num_subscribers)
        ],
        "wall_seconds": wall_seconds,
        "median_round_seconds": statistics.median(round_seconds) if round_seconds else None,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write (temp file + rename) so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, path)
