"""``market.png``: the Scientist's published validation loss per round, with whose update
was applied, and what each subscriber was paid (attackers in red)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

HONEST, ATTACKER = "#1f77b4", "#d62728"


def plot_market(report: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    market = report["market"]
    attackers = set(report.get("attackers", []))
    published = {int(k): v / 1e6 for k, v in market["published_loss_micro"].items()}
    rounds = sorted(published)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(rounds, [published[r] for r in rounds], marker="o", color="black", lw=1)
    for rnd in report["rounds"]:
        r = rnd["round"]
        if r not in published:
            continue
        who = rnd.get("selected") or []
        label = ",".join(str(a) for a in who) or "none"
        bad = any(a in attackers for a in who)
        left.annotate(label, (r, published[r]), textcoords="offset points", xytext=(0, 7),
                      ha="center", fontsize=8, color=ATTACKER if bad else HONEST)
    from matplotlib.ticker import MaxNLocator

    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("round")
    left.set_ylabel("validation loss (published by the Scientist)")
    left.set_title("Validation loss; labels = applied update's subscriber")
    left.grid(alpha=0.3)

    subs = report["subscribers"]
    ids = [s["partition_id"] for s in subs]
    amounts = [s.get("payout", 0) for s in subs]
    colors = [ATTACKER if s.get("attacker") else HONEST for s in subs]
    right.bar([str(i) for i in ids], amounts, color=colors)
    right.set_xlabel("subscriber (partition id; red = attacker)")
    right.set_ylabel("payout (minor units)")
    verdict = f"forfeited: {market['reason']}" if market.get("forfeited") else "settled"
    right.set_title(f"Payouts ({verdict}); Scientist refund {market['scientist_refund']}")
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
