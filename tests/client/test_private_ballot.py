"""Ballots under differential privacy (issue 16, part 2): the Gaussian mechanism on a
marginal ballot, its sensitivity bound, its noise, and its place in the subscriber's
cumulative epsilon (composed with training in the same accountant)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from opacus.accountants import RDPAccountant

from client import protocol as P
from client.client_app import vote
from client.marginal import (
    BallotError,
    marginal_ballot,
    marginal_contributions,
    mean_update,
    private_ballot,
)
from client.privacy import epsilon_of
from client.task import Dataset, get_weights, make_model
from server.round.strategy import numpy_to_arrays
from tests.conftest import make_contexts

RUN = {"num-subscribers": 4, "partitioner": "iid", "hidden-units": 8, "local-epochs": 1}


def _setup(seed: int = 0, k: int = 4) -> tuple:
    rng = np.random.default_rng(seed)
    model = make_model(hidden_units=8, activation="square", seed=0)
    base = get_weights(model)
    deltas = [{n: rng.normal(0, 0.05, v.shape).astype(np.float32) for n, v in base.items()}
              for _ in range(k)]
    members = [i % 2 == 0 for i in range(k)]
    trusted = mean_update([d for d, m in zip(deltas, members, strict=True) if m])
    data = Dataset(rng.random((40, 64), dtype=np.float32), rng.integers(0, 10, 40))
    return model, base, trusted, sum(members), deltas, members, data


def test_contributions_average_to_the_ballot() -> None:
    """Differential: the column means of the per-example parts are the ballot the
    Scientist, the auditor and a noiseless voter compute."""
    model, base, trusted, size, deltas, members, data = _setup()
    rows = marginal_contributions(model, base, trusted, size, deltas, members, data)
    assert rows.shape == (len(data), len(deltas))
    expected = marginal_ballot(model, base, trusted, size, deltas, members, data)
    np.testing.assert_allclose(rows.mean(axis=0), expected, atol=1e-12)
    noiseless = private_ballot(rows, clip=1e9, noise_multiplier=0.0,
                               rng=np.random.default_rng(0))
    np.testing.assert_allclose(noiseless, expected, atol=1e-12)


rows_strategy = arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 6)),
                       elements=st.floats(-3, 3, allow_nan=False))


@settings(max_examples=200)
@given(rows_strategy, arrays(np.float64, 6, elements=st.floats(-50, 50, allow_nan=False)),
       st.floats(0.01, 5))
def test_one_example_moves_the_clipped_sum_by_at_most_the_clip(
    rows: np.ndarray, extra: np.ndarray, clip: float,
) -> None:
    """The sensitivity the noise is scaled to: adding one example (any values at all)
    changes the sum of clipped rows by at most ``clip`` in L2."""
    extra = extra[: rows.shape[1]]
    zero = np.random.default_rng(0)

    def clipped_sum(matrix: np.ndarray) -> np.ndarray:
        return np.asarray(private_ballot(matrix, clip=clip, noise_multiplier=0.0, rng=zero)) \
            * matrix.shape[0]

    grown = np.vstack([rows, extra[None, :]])  # every value stays far below the clamp
    moved = np.linalg.norm(clipped_sum(grown) - clipped_sum(rows))
    assert moved <= clip * (1 + 1e-9)


def test_the_noise_has_the_mechanisms_scale() -> None:
    """Zero contributions: every number is N(0, (sigma * clip / n)^2); 4,000 of them."""
    n, sigma, clip = 50, 1.5, 0.2
    values = private_ballot(np.zeros((n, 4000)), clip=clip, noise_multiplier=sigma,
                            rng=np.random.default_rng(7))
    assert np.std(values) == pytest.approx(sigma * clip / n, rel=0.05)
    assert abs(np.mean(values)) < 4 * sigma * clip / n / np.sqrt(4000)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(BallotError, match="vote-clip"):
        private_ballot(np.zeros((2, 2)), clip=0.0, noise_multiplier=1.0,
                       rng=np.random.default_rng(0))
    with pytest.raises(BallotError, match="shape"):
        private_ballot(np.zeros((0, 2)), clip=1.0, noise_multiplier=1.0,
                       rng=np.random.default_rng(0))


def test_a_ballot_composes_with_training_as_opacus_accounts_it() -> None:
    """Differential against Opacus' RDPAccountant: training steps, then one full-batch
    Gaussian step per ballot (sample rate 1)."""
    history = [(1.1, 0.25, 40), (2.0, 1.0, 1), (1.1, 0.25, 40), (2.0, 1.0, 1)]
    accountant = RDPAccountant()
    accountant.history = list(history)
    assert epsilon_of(history, target_delta=1e-5, accountant="rdp") == pytest.approx(
        accountant.get_epsilon(delta=1e-5), rel=1e-12)


# ----------------------------------------------------------------- the subscriber
def _marginal_msg(weights: dict, deltas: dict, trusted: list[str], server_round: int = 1,
                  rule: str = "marginal") -> Message:
    mean = mean_update([deltas[c] for c in trusted])
    content = RecordDict({
        P.ARRAYS: numpy_to_arrays(weights),
        P.TRUSTED_MEAN: numpy_to_arrays({k: v.astype(np.float64) for k, v in mean.items()}),
        P.CONFIG: ConfigRecord({P.SERVER_ROUND: server_round, P.CANDIDATE_IDS: list(deltas),
                                P.CANDIDATE_AUTHORS: ["0", "1", "3"], P.VOTE_RULE: rule,
                                P.TRUSTED_SIZE: len(trusted), P.TRUSTED_IDS: trusted}),
    })
    for cid, delta in deltas.items():
        content[P.CANDIDATE_PREFIX + cid] = numpy_to_arrays(delta)
    return Message(content=content, dst_node_id=1002, message_type=P.VOTE_MESSAGE_TYPE)


def _candidates() -> tuple[dict, dict]:
    weights = get_weights(make_model(hidden_units=8, activation="square", seed=42))
    rng = np.random.default_rng(3)
    deltas = {c: {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in weights.items()}
              for c in ("c1", "c2", "c3")}
    return weights, deltas


def test_a_private_ballot_is_counted_in_the_subscribers_epsilon() -> None:
    weights, deltas = _candidates()
    plain_ctx = make_contexts(RUN, 4)[1002]
    plain = vote(_marginal_msg(weights, deltas, ["c1", "c2"]), plain_ctx)
    assert not plain.has_error()
    assert "privacy" not in plain_ctx.state  # no noise: nothing spent, nothing recorded
    ctx = make_contexts({**RUN, "vote-noise-multiplier": 2.0}, 4)[1002]
    first = vote(_marginal_msg(weights, deltas, ["c1", "c2"]), ctx)
    second = vote(_marginal_msg(weights, deltas, ["c1", "c2"], server_round=2), ctx)
    assert not first.has_error() and not second.has_error()
    assert list(ctx.state["privacy"]["noise"]) == [2.0]
    assert list(ctx.state["privacy"]["rates"]) == [1.0]
    assert list(ctx.state["privacy"]["steps"]) == [2]
    noisy = first.content[P.METRICS][P.MARGINALS]
    assert noisy != plain.content[P.METRICS][P.MARGINALS]
    assert len(noisy) == 3


def test_a_ballot_past_max_epsilon_is_refused_and_spends_nothing() -> None:
    weights, deltas = _candidates()
    ctx = make_contexts({**RUN, "vote-noise-multiplier": 0.5}, 4, **{"max-epsilon": 20.0})[1002]
    replies = [vote(_marginal_msg(weights, deltas, ["c1", "c2"], server_round=r), ctx)
               for r in range(1, 13)]
    refused = [r for r in replies if r.has_error()]
    assert refused and refused[0].error.code == P.ERROR_BUDGET
    assert "max-epsilon 20 would be exceeded" in refused[0].error.reason
    answered = sum(not r.has_error() for r in replies)
    assert list(ctx.state["privacy"]["steps"]) == [answered]
    assert epsilon_of([(0.5, 1.0, answered)], target_delta=1e-5, accountant="rdp") <= 20.0


def test_target_epsilon_pays_for_training_and_ballots_together() -> None:
    from client.privacy import calibrate_noise_multiplier, sample_rate, steps_per_epoch

    knobs = {"target_epsilon": 8.0, "target_delta": 1e-5, "num_examples": 60,
             "batch_size": 16, "epochs_per_round": 1, "planned_rounds": 20,
             "accountant": "rdp"}
    alone = calibrate_noise_multiplier(**knobs)
    joint = calibrate_noise_multiplier(**knobs, ballot_noise=4.0)
    assert joint > alone  # training gives up part of the budget to the ballots
    q, steps = sample_rate(60, 16), 20 * steps_per_epoch(60, 16)
    total = epsilon_of([(joint, q, steps), (4.0, 1.0, 20)], target_delta=1e-5,
                       accountant="rdp")
    assert total == pytest.approx(8.0, rel=1e-4)
    assert total <= 8.0
    with pytest.raises(ValueError, match="ballots alone spend"):
        calibrate_noise_multiplier(**knobs, ballot_noise=1.0)  # 20 ballots: epsilon 30


def test_a_subscriber_whose_ballots_alone_spend_the_target_refuses_to_train() -> None:
    from client.client_app import train

    weights, _ = _candidates()
    ctx = make_contexts({**RUN, "vote-noise-multiplier": 1.0}, 4)[1002]
    config = ConfigRecord({P.SERVER_ROUND: 1, P.NOISE_MULTIPLIER: 1.0, P.TARGET_EPSILON: 8.0,
                           P.MAX_GRAD_NORM: 1.0, P.TARGET_DELTA: 1e-5, P.PLANNED_ROUNDS: 20,
                           P.UPDATE_KIND: "delta"})
    reply = train(Message(content=RecordDict({P.ARRAYS: numpy_to_arrays(weights),
                                              P.CONFIG: config}),
                          dst_node_id=1002, message_type="train"), ctx)
    assert reply.has_error() and reply.error.code == P.ERROR_BUDGET
    assert "ballots alone spend" in reply.error.reason


def test_the_report_counts_the_last_rounds_ballot() -> None:
    """A whole market in process with private ballots: each subscriber's epsilon in the
    report is above what its last training reply said, by the last round's ballot."""
    from tests.conftest import set_task_identity
    from tests.market.test_market import market_run

    set_task_identity()
    with tempfile.TemporaryDirectory() as folder:
        report = market_run(Path(folder), **{"vote-noise-multiplier": 2.0})
    last = report["rounds"][-1]
    trained = {str(c["author"]): c["sample_epsilon"] for c in last["candidates"]}
    assert trained
    for sub in report["subscribers"]:
        assert sub["epsilon"] > trained[str(sub["partition_id"])]



# ----------------------------------------------------------------- attacker review
def test_a_server_cannot_switch_the_noise_off_by_asking_for_the_old_rule() -> None:
    weights, deltas = _candidates()
    ctx = make_contexts({**RUN, "vote-noise-multiplier": 2.0}, 4)[1002]
    for rule in ("single", ""):
        reply = vote(_marginal_msg(weights, deltas, ["c1", "c2"], rule=rule), ctx)
        assert reply.has_error() and "expected vote-rule marginal" in reply.error.reason
    assert "privacy" not in ctx.state
    from client.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="private ballots need vote-rule marginal"):
        RunConfig.from_mapping({"vote-noise-multiplier": 1.0, "vote-rule": "single"})


def test_one_private_ballot_a_round() -> None:
    weights, deltas = _candidates()
    ctx = make_contexts({**RUN, "vote-noise-multiplier": 2.0}, 4)[1002]
    assert not vote(_marginal_msg(weights, deltas, ["c1", "c2"], server_round=3), ctx).has_error()
    for again in (3, 2):  # the same round, or an earlier one: refused, nothing spent
        reply = vote(_marginal_msg(weights, deltas, ["c1", "c2"], server_round=again), ctx)
        assert reply.has_error() and "one private ballot a round" in reply.error.reason
    assert list(ctx.state["privacy"]["steps"]) == [1]


def test_a_nan_candidate_cannot_switch_the_clipping_off() -> None:
    weights, deltas = _candidates()
    deltas["c3"]["fc1.weight"][0, 0] = np.nan
    ctx = make_contexts({**RUN, "vote-noise-multiplier": 2.0}, 4)[1002]
    reply = vote(_marginal_msg(weights, deltas, ["c1", "c2"]), ctx)
    assert reply.has_error() and "finite" in reply.error.reason
    assert "privacy" not in ctx.state  # refused before anything was computed or spent
    rows = np.ones((3, 2))
    rows[1, 0] = np.nan
    with pytest.raises(BallotError, match="finite"):
        private_ballot(rows, clip=0.1, noise_multiplier=1.0, rng=np.random.default_rng(0))
    from client.marginal import clamp_marginal

    with pytest.raises(BallotError, match="NaN"):
        clamp_marginal(float("nan"))
    plain = vote(_marginal_msg(weights, deltas, ["c1", "c2"]), make_contexts(RUN, 4)[1002])
    assert plain.has_error()  # the noiseless ballot no longer turns NaN into +100
