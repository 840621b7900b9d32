"""``market.png``: the Scientist's published validation loss per round, with whose update
was applied, each subscriber's cumulative credit over the rounds, and what each
subscriber was paid (attackers in red)."""

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
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.5))
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
    credits = market.get("round_credits_micro", {})
    credit_rounds = sorted(int(t) for t in credits)
    for sub in subs:
        key = sub.get("key_id")
        running, series = 0.0, []
        for t in credit_rounds:
            running += credits[str(t)].get(key, 0.0) / 1e6
            series.append(running)
        if any(series):
            color = ATTACKER if sub.get("attacker") else HONEST
            middle.plot(credit_rounds, series, color=color, lw=1.5 if sub.get("attacker") else 1,
                        alpha=0.9)
            middle.annotate(str(sub["partition_id"]), (credit_rounds[-1], series[-1]),
                            fontsize=7, color=color, xytext=(3, 0), textcoords="offset points")
    middle.axhline(0, color="grey", lw=0.8)
    middle.xaxis.set_major_locator(MaxNLocator(integer=True))
    middle.set_xlabel("round")
    middle.set_ylabel("cumulative credit (validation-loss decrease)")
    rule = market.get("payout_rule", {}).get("rule", "v1")
    middle.set_title(f"Credit per subscriber ({rule}; red = attacker)")
    middle.grid(alpha=0.3)

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
