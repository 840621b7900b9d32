"""Buyer fees: how a fee settlement splits what buyers paid (pure, integers only).

Each ``fee_settlement`` entry moves ``amount`` from a buyer's balance to the payees:
the Scientist gets ``scientist_fee_share_ppm`` parts per million of it, the
subscribers the rest in proportion to what the task's settlement paid them (their
settled reward and fees). Largest-remainder rounding over the combined exact shares,
ties to the smaller key id, so the split adds up to ``amount`` exactly. When the
settlement paid no subscriber, everything goes to the Scientist.
"""

from __future__ import annotations

from collections.abc import Mapping

from server.market.settlement import largest_remainder

PPM = 1_000_000


def split_fee(amount: int, *, scientist: str, share_ppm: int,
              contributions: Mapping[str, int]) -> dict[str, int]:
    """``amount`` split between the Scientist and the contributors (module docstring)."""
    if amount < 0:
        raise ValueError(f"expected a fee amount >= 0, got {amount}")
    if not 0 <= share_ppm <= PPM:
        raise ValueError(f"expected a share in 0..{PPM} ppm, got {share_ppm}")
    total = sum(v for v in contributions.values() if v > 0)
    if total == 0:
        return {scientist: amount} if amount else {}
    weights: dict[str, int] = {scientist: share_ppm * total}
    for key, paid in contributions.items():
        if paid > 0:
            weights[key] = weights.get(key, 0) + (PPM - share_ppm) * paid
    return largest_remainder(amount, weights)
