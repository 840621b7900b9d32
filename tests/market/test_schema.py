"""Tasks of any schema, end to end: a 40-feature MNIST-1D task trained, settled, audited
and served encrypted; a task whose subscribers bring files of their own schema; and every
refusal of data that does not fit (before anything starts, naming what was expected and
what came)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from client.buyer import Buyer
from client.client_app import Subscriber
from client.config import ConfigError, RunConfig
from client.schema import DATASETS, MIN_EXAMPLES_PER_SUBSCRIBER, Schema, split_sizes
from client.task import (
    DataError,
    dataset_split,
    load_data_file,
    load_partition,
    make_model,
    mnist1d_arrays,
    set_weights,
)
from client.witness import load_or_create_key
from crypto.digests import parse_canonical_tensor_bytes
from ledger import LogReader, Signer
from ledger.blobs import BlobStore
from server.inference.service import create_app, fund_account
from server.market.audit import audit_run
from server.server_app import run_task
from tests.conftest import InProcessGrid, set_task_identity
from tests.market.test_market import HANDLERS, market_run

FEE = 10


def _served_logits(run_dir: Path, schema: Schema, hidden: int, activation: str,
                   x: np.ndarray) -> np.ndarray:
    import torch

    model = make_model(hidden_units=hidden, activation=activation, seed=0, schema=schema)
    with LogReader.open(run_dir / "ledger.db") as reader:
        digest = [e for _, e in reader.entries(kind="model")][-1].fields["model_digest"]
    set_weights(model, parse_canonical_tensor_bytes(
        BlobStore.beside(run_dir / "ledger.db").get(digest)))
    with torch.no_grad():
        return model.double()(torch.as_tensor(x, dtype=torch.float64)).numpy()


# ------------------------------------------------------------------------ MNIST-1D
def test_mnist1d_is_generated_offline_reproducibly_in_range(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("POI_CACHE_DIR", str(tmp_path))
    state = np.random.get_state()
    x, y = mnist1d_arrays(300)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's RNG kept
    assert x.shape == (300, 40) and x.dtype == np.float32 and y.shape == (300,)
    assert x.min() >= 0.0 and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))
    assert list(tmp_path.glob("mnist1d-300-*.npz"))  # cached
    again_x, again_y = mnist1d_arrays(300)  # from the cache: the same arrays
    assert np.array_equal(again_x, x) and np.array_equal(again_y, y)
    (tmp_path / "mnist1d-300-seed42.npz").write_bytes(b"not a zip")  # a broken cache
    fresh_x, _ = mnist1d_arrays(300)
    assert np.array_equal(fresh_x, x)  # generated again from the seed, bit for bit


def test_mnist1d_partitions_cover_the_pool() -> None:
    split = dataset_split("mnist1d", 2000)
    assert (len(split.test), len(split.validation), len(split.pool)) == split_sizes(2000)
    parts = [load_partition(p, 20, partitioner="dirichlet", dirichlet_alpha=0.5, seed=0,
                            dataset="mnist1d", size=2000) for p in range(20)]
    assert sum(len(p) for p in parts) == len(split.pool)
    assert all(p.x.shape[1] == 40 and len(p) >= 2 for p in parts)


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    set_task_identity()
    out = tmp_path_factory.mktemp("mnist1d")
    report = market_run(out, **{"dataset": "mnist1d", "dataset-size": 1000,
                                "num-subscribers": 4, "num-server-rounds": 2,
                                "hidden-units": 16, "buyer-fee": FEE})
    return out, report


def test_a_40_feature_task_trains_settles_and_audits(mnist1d_run) -> None:
    out, report = mnist1d_run
    assert report["market"]["audit_ok"] is True and report["market"]["forfeited"] is False
    with LogReader.open(out / "ledger.db") as reader:
        offer = next(e for _, e in reader.entries(kind="offer")).fields
    assert offer["architecture"]["input_dim"] == 40
    assert offer["architecture"]["num_classes"] == 10
    assert audit_run(out).ok
    # The reported test metrics are the ledger's last model on MNIST-1D's test set.
    from client.task import evaluate

    model = make_model(hidden_units=16, activation="square", seed=0, schema=Schema(40, 10))
    with LogReader.open(out / "ledger.db") as reader:
        digest = [e for _, e in reader.entries(kind="model")][-1].fields["model_digest"]
    set_weights(model, parse_canonical_tensor_bytes(BlobStore.beside(out / "ledger.db")
                                                    .get(digest)))
    loss, accuracy = evaluate(model, dataset_split("mnist1d", 1000).test)
    assert (loss, accuracy) == (report["final_loss"], report["final_accuracy"])
    assert tuple(model.fc1.weight.shape) == (16, 40)


@pytest.mark.parametrize("layout", ["single", "batch"])
def test_a_40_feature_task_sells_encrypted_predictions(mnist1d_run, tmp_path, layout) -> None:
    out, _ = mnist1d_run
    x = dataset_split("mnist1d", 1000).test.x[:2 if layout == "single" else 12]
    with TestClient(create_app(out, workers=1, settle_every=10**9,
                               settle_seconds=3600)) as client:
        info = client.get("/v1/model").json()
        assert info["architecture"]["layers"] == [40, 16, 10]
        assert info["input"]["shape"] == [40] and set(info["layouts"]) == {"single", "batch"}
        key = tmp_path / f"buyer-{random.getrandbits(32)}.pem"
        fund_account(out, key, FEE * 100)
        buyer = Buyer(str(client.base_url), Signer.load(key), layout=layout, client=client)
        logits = buyer.predict(x)
        with pytest.raises(ValueError, match=r"expected inputs of shape \(n, 40\)"):
            buyer.predict(np.zeros((1, 64), dtype=np.float32))
    reference = _served_logits(out, Schema(40, 10), 16, "square", x)
    assert logits.shape == (len(x), 10)
    np.testing.assert_array_equal(logits.argmax(axis=1), reference.argmax(axis=1))
    assert np.max(np.abs(logits - reference)) < 0.05
    assert buyer.account()["charged"] == FEE * len(x)


# ------------------------------------------------------------- subscribers' own files
def _blobs(n: int, features: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A separable task of its own schema: one centre a class, features in [0, 1]."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).random((classes, features))
    y = rng.integers(0, classes, n)
    x = np.clip(centres[y] + rng.normal(0, 0.08, (n, features)), 0, 1).astype(np.float32)
    return x, y.astype(np.int64)


def test_a_task_of_its_own_schema_runs_on_subscribers_files(tmp_path) -> None:
    from flwr.app import Context, RecordDict

    features, classes, nodes = 12, 3, 4
    vx, vy = _blobs(60, features, classes, seed=0)
    np.savez(tmp_path / "validation.npz", x=vx, y=vy)
    run = {"num-subscribers": nodes, "num-server-rounds": 2, "partitioner": "iid",
           "seed": 3, "reward": 100_000, "update-fee": 7, "num-features": features,
           "num-classes": classes, "hidden-units": 8,
           "validation-path": str(tmp_path / "validation.npz"), "out-dir": str(tmp_path / "run")}
    config = RunConfig.from_mapping(run)
    assert config.schema == Schema(features, classes) and not config.uses_dataset_schema
    contexts = {}
    for pid in range(nodes):
        path = tmp_path / f"node-{pid}.npz"
        x, y = _blobs(50, features, classes, seed=pid + 1)
        np.savez(path, x=x, y=y)
        key = tmp_path / f"node-{pid}.pem"
        load_or_create_key(str(key))
        contexts[2000 + pid] = Context(
            run_id=4242, node_id=2000 + pid,
            node_config={"data-path": str(path), "ledger-key": str(key)},
            state=RecordDict(), run_config=dict(run))
    report = run_task(InProcessGrid(contexts, HANDLERS), config, tmp_path / "run")
    assert report["market"]["audit_ok"] is True
    # it learnt the subscribers' task (reported on the validation file: no test set)
    assert report["final_loss"] < report["initial_loss"]
    # A subscriber of this task without a file is refused, naming what it must bring.
    ctx = Context(run_id=4242, node_id=1, node_config={"partition-id": 0},
                  state=RecordDict(), run_config=dict(run))
    with pytest.raises(DataError, match=r"subscribers bring their own data: expected "
                                        r"'data-path'"):
        Subscriber.from_context(ctx)
    # ... and one whose file has another schema, naming the shapes.
    x, y = _blobs(10, features + 1, classes, seed=9)
    np.savez(tmp_path / "wide.npz", x=x, y=y)
    ctx = Context(run_id=4242, node_id=1, node_config={"data-path": str(tmp_path / "wide.npz")},
                  state=RecordDict(), run_config=dict(run))
    with pytest.raises(DataError, match=r"expected x of shape \(n, 12\) for this task's schema "
                                        r"\(12 features, 3 classes\), got \(10, 13\)"):
        Subscriber.from_context(ctx)


# ------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(("extra", "match"), [
    ({"num-subscribers": 128, "dataset": "mnist1d", "dataset-size": 1000},
     r"num-subscribers: mnist1d \(1,000 examples\) leaves 700 for subscribers, at least 8 "
     r"each: expected at most 87 subscribers, or raise dataset-size to at least 1,462, "
     r"got 128"),
    ({"num-subscribers": 128, "votes-per-candidate": 128},
     r"votes-per-candidate: expected at most num-subscribers - 1 \(127\)"),
    ({"dataset": "digits", "dataset-size": 5000}, r"digits has a fixed 1,797 examples"),
    ({"dataset": "mnist1d", "dataset-size": 50}, r"dataset-size: expected 0 .* or 100\.\."),
    ({"dataset": "cifar"}, r"dataset: expected one of \['digits', 'mnist1d'\]"),
    ({"num-features": 40}, r"validation-path: a task of 40 features and 10 classes is not "
                           r"digits's \(64 and 10\): expected the Scientist's validation file"),
    ({"num-features": 2000, "validation-path": "v.npz"}, r"num-features: expected 1\.\.1024"),
    ({"num-classes": 1, "validation-path": "v.npz"}, r"num-classes: expected 2\.\.256"),
    ({"num-classes": 3, "validation-path": "v.npz", "attack": "targeted-flip",
      "attackers": "0"},
     r"flip-target: expected a class in 0\.\.2, got 7"),
])
def test_a_federation_or_schema_that_cannot_work_is_refused_before_anything_starts(
        extra, match) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(extra)


def test_the_limit_is_exact_at_the_boundary() -> None:
    pool = split_sizes(1797)[2]
    most = pool // MIN_EXAMPLES_PER_SUBSCRIBER
    RunConfig.from_mapping({"num-subscribers": most})
    with pytest.raises(ConfigError, match=rf"digits \(1,797 examples\) leaves {pool:,} .* "
                                          rf"expected at most {most} subscribers, got"):
        RunConfig.from_mapping({"num-subscribers": most + 1})
    size = 1462
    assert split_sizes(size)[2] >= MIN_EXAMPLES_PER_SUBSCRIBER * 128 > split_sizes(size - 1)[2]
    RunConfig.from_mapping({"num-subscribers": 128, "dataset": "mnist1d", "dataset-size": size})
    with pytest.raises(ConfigError, match="at most 127 subscribers"):
        RunConfig.from_mapping({"num-subscribers": 128, "dataset": "mnist1d",
                                "dataset-size": size - 1})


def test_the_digits_schema_is_the_default_and_unchanged() -> None:
    config = RunConfig.from_mapping({})
    assert config.schema == DATASETS["digits"].schema == Schema(64, 10)
    # the weights of a digits model are the ones made before schemas existed
    a = make_model(hidden_units=8, activation="square", seed=5)
    b = make_model(hidden_units=8, activation="square", seed=5, schema=Schema(64, 10))
    assert all(np.array_equal(p.detach(), q.detach())
               for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_data_files_outside_the_unit_range_are_refused_for_other_schemas(tmp_path) -> None:
    x, y = _blobs(5, 12, 3, seed=0)
    x[0, 0] = 3.5
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(DataError, match=r"expected features in \[0, 1\].*got \[0.*, 3.5\]"):
        load_data_file(tmp_path / "d.npz", schema=Schema(12, 3))
    np.savez(tmp_path / "e.npz", x=np.clip(x, 0, 1), y=y + 5)
    with pytest.raises(DataError, match=r"expected integer labels in 0\.\.2, got labels 5\.\.7"):
        load_data_file(tmp_path / "e.npz", schema=Schema(12, 3))


def test_the_round_line_counts_instead_of_listing_at_scale() -> None:
    from server.cli.simulate import LIST_UP_TO, _fmt_round

    def report(n: int) -> dict[str, Any]:
        candidates = [{"id": f"{i:064x}", "attacker": i % 2 == 0, "selected": i < n // 2,
                       "score": float(i)} for i in range(n)]
        return {"strategy": "poi", "rounds": [{
            "round": 3, "accuracy": 0.5, "selected": list(range(n // 2)),
            "rejected": [{"author": j, "reason": "stale base"} for j in range(n // 4)],
            "candidates": candidates}]}

    small, big = _fmt_round(report(8), 0), _fmt_round(report(1024), 0)
    assert "selected [0, 1, 2, 3]" in small and "rejected [0 (stale base), 1 (stale" in small
    assert "selected 512/1024 (256 attackers)" in big and "rejected 256" in big
    assert "\n" not in big and len(big) < 120
    assert LIST_UP_TO == 8


# ------------------------------------------------------------- review: what must hold
def test_a_poisoned_mnist1d_cache_is_generated_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("POI_CACHE_DIR", str(tmp_path))
    fresh_x, fresh_y = mnist1d_arrays(200)
    for x, y in ((np.full((200, 40), np.nan, np.float32), fresh_y),
                 (fresh_x, np.full(200, 99, np.int64)),
                 (fresh_x * 3, fresh_y),
                 (fresh_x.astype(np.float64), fresh_y)):
        np.savez(tmp_path / "mnist1d-200-seed42.npz", x=x, y=y)
        again_x, again_y = mnist1d_arrays(200)
        assert np.array_equal(again_x, fresh_x) and np.array_equal(again_y, fresh_y)


def test_a_simulation_refuses_what_its_partitioner_or_schema_cannot_do() -> None:
    from server.experiments.simulation import preflight

    with pytest.raises(DataError, match=r"the dirichlet partitioner cannot give 128 "
                                        r"subscribers at least 2 of digits's 1,258 pool"):
        preflight(RunConfig.from_mapping({"num-subscribers": 128, "dirichlet-alpha": 0.1}))
    with pytest.raises(ValueError, match=r"a simulation partitions digits \(12 features"):
        preflight(RunConfig.from_mapping({"num-features": 12, "validation-path": "v.npz"}))
    preflight(RunConfig.from_mapping({"num-subscribers": 20}))  # the usual one passes


def test_a_model_too_wide_to_serve_encrypted_is_refused_before_anything_starts() -> None:
    from client import schema
    from crypto.he import params

    for name in ("MAX_FEATURES", "MAX_CLASSES", "MAX_HIDDEN", "MAX_OUTPUT_WEIGHTS",
                 "MAX_INPUT_WEIGHTS"):
        assert getattr(schema, name) == getattr(params, name), name
    with pytest.raises(ConfigError, match=r"10 classes x 300 hidden units = 3000 second-"
                                          r"layer weights, .* at most 204 hidden units"):
        RunConfig.from_mapping({"hidden-units": 300})
    RunConfig.from_mapping({"hidden-units": 204})
    with pytest.raises(ConfigError, match=r"1000 features x 300 hidden units = 300000 first"):
        RunConfig.from_mapping({"num-features": 1000, "num-classes": 2, "hidden-units": 300,
                                "validation-path": "v.npz"})
    from crypto.he import HEError, ModelShape

    with pytest.raises(HEError, match=r"classes x hidden units <= 2048, got 3000"):
        ModelShape(40, 10, 300).check()


def test_the_service_refuses_a_model_whose_widths_are_not_the_offers(mnist1d_run) -> None:
    from crypto.he import ModelShape
    from server.inference.engine import InferenceService, ServiceError

    out, _ = mnist1d_run
    service = InferenceService(out, workers=1)
    try:
        service._check_model_widths()  # the ledger's model is what the offer says
        service.shape = ModelShape(40, 10, 17)
        with pytest.raises(ServiceError, match=r"the offer's architecture says"):
            service._check_model_widths()
    finally:
        service.store.close()


def test_digits_scaling_belongs_to_the_digits_task_not_to_64_features(tmp_path) -> None:
    x = np.full((2, 64), 8.0, dtype=np.float32)  # raw digits intensities
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1]))
    assert load_data_file(tmp_path / "d.npz", schema=Schema(64, 10)).x.max() == 0.5
    with pytest.raises(DataError, match=r"expected features in \[0, 1\]"):
        load_data_file(tmp_path / "d.npz", schema=Schema(64, 10), raw_max=0.0)
    own = RunConfig.from_mapping({"dataset": "mnist1d", "num-features": 64,
                                  "validation-path": "v.npz"})
    assert own.raw_max == 0.0 and RunConfig.from_mapping({}).raw_max == 16.0
    np.savez(tmp_path / "n.npz", x=np.full((2, 64), -1.0), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"expected features in \[0, 1\]"):  # even digits
        load_data_file(tmp_path / "n.npz", schema=Schema(64, 10))
