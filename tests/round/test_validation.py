from __future__ import annotations

import numpy as np
import pytest

from server.round.validation import Rejected, validate_update, validate_vote

REF = {"a": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def _ok() -> dict[str, np.ndarray]:
    return {"a": np.full((2, 3), 0.1, dtype=np.float32), "b": np.full(3, 0.1, dtype=np.float32)}


def test_a_good_update_passes_and_reports_its_norm() -> None:
    assert validate_update(_ok(), REF, max_norm=1.0) == pytest.approx(0.3, rel=1e-6)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda u: u.pop("b"), r"missing \['b'\]"),
        (lambda u: u.update(c=np.zeros(1, dtype=np.float32)), r"extra \['c'\]"),
        (lambda u: u.update(a=u["a"].astype(np.float64)), r"a: expected dtype float32, got float64"),
        (lambda u: u.update(a=u["a"].reshape(3, 2)), r"a: expected shape \(2, 3\), got \(3, 2\)"),
        (lambda u: u["b"].__setitem__(0, np.nan), r"b: contains NaN or infinite values"),
        (lambda u: u["b"].__setitem__(0, np.inf), r"b: contains NaN or infinite values"),
        (lambda u: u["a"].__setitem__((0, 0), 100.0), r"L2 norm 100 exceeds the bound"),
        (lambda u: [v.fill(0) for v in u.values()], r"update is all zeros"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(mutate, match) -> None:  # type: ignore[no-untyped-def]
    update = _ok()
    mutate(update)
    with pytest.raises(Rejected, match=match):
        validate_update(update, REF, max_norm=10.0)


def test_a_good_vote_gives_improvements() -> None:
    vote = validate_vote("v", assigned=["x", "y"], candidate_ids=["x", "y"], base_loss=2.0,
                         losses=[1.5, 2.5])
    assert vote.improvements() == {"x": 0.5, "y": -0.5}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidate_ids": None}, r"expected 'candidate-ids' and 'losses'"),
        ({"candidate_ids": ["y", "x"]}, r"expected candidates \['x', 'y'\], got \['y', 'x'\]"),
        ({"losses": [1.0]}, r"expected 2 losses, got 1"),
        ({"losses": [1.0, float("nan")]}, r"expected finite losses >= 0, got nan"),
        ({"losses": [1.0, -0.1]}, r"expected finite losses >= 0, got -0.1"),
        ({"base_loss": "2"}, r"expected numeric losses, got '2'"),
        ({"base_loss": True}, r"expected numeric losses, got True"),
    ],
)
def test_bad_votes_are_rejected_with_a_reason(kwargs, match) -> None:  # type: ignore[no-untyped-def]
    args = {"assigned": ["x", "y"], "candidate_ids": ["x", "y"], "base_loss": 2.0,
            "losses": [1.0, 1.0], **kwargs}
    with pytest.raises(Rejected, match=match):
        validate_vote("v", **args)
