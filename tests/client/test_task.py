from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.task import (
    DataError,
    Dataset,
    candidate_losses,
    digits_split,
    evaluate,
    get_weights,
    load_data_file,
    load_partition,
    make_model,
    partition_indices,
    set_weights,
)


def test_split_is_disjoint_and_complete() -> None:
    split = digits_split()
    assert len(split.test) + len(split.validation) + len(split.pool) == 1797
    rows = lambda d: {r.tobytes() + bytes([int(y)]) for r, y in zip(d.x, d.y, strict=True)}  # noqa: E731
    # digits has a few duplicate images, so compare index-free by content only loosely:
    assert len(rows(split.validation) & rows(split.test)) <= 2
    for part in (split.test, split.validation, split.pool):
        assert part.x.dtype == np.float32 and part.x.min() >= 0 and part.x.max() <= 1


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_cover_the_pool_exactly_once(partitioner: str) -> None:
    parts = partition_indices(7, partitioner, 0.5, 3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(digits_split().pool)))
    assert all(len(p) > 0 for p in parts)
    assert partition_indices(7, partitioner, 0.5, 3) is parts  # cached
    again = partition_indices.__wrapped__(7, partitioner, 0.5, 3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_is_more_skewed_than_iid() -> None:
    pool_y = digits_split().pool.y

    def skew(parts: tuple[np.ndarray, ...]) -> float:
        return float(np.mean([np.bincount(pool_y[p], minlength=10).max() / len(p) for p in parts]))

    assert skew(partition_indices(10, "dirichlet", 0.1, 0)) > skew(partition_indices(10, "iid", 0.5, 0)) + 0.2


def test_bad_partition_id_is_refused() -> None:
    with pytest.raises(DataError, match=r"partition-id: expected 0..3, got 4"):
        load_partition(4, 4, partitioner="iid", dirichlet_alpha=0.5, seed=0)


def test_model_init_is_deterministic_and_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = get_weights(make_model(hidden_units=8, activation="square", seed=5))
    after = torch.rand(1)
    b = get_weights(make_model(hidden_units=8, activation="square", seed=5))
    assert before == after
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert list(a) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_batched_candidate_losses_match_a_loop_of_model_copies() -> None:
    data = load_partition(0, 5, partitioner="iid", dirichlet_alpha=0.5, seed=0)
    model = make_model(hidden_units=16, activation="poly2", seed=1)
    base = get_weights(model)
    rng = np.random.default_rng(0)
    deltas = [{k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in base.items()}
              for _ in range(4)]
    base_loss, losses = candidate_losses(model, base, deltas, data)
    reference = make_model(hidden_units=16, activation="poly2", seed=1).double()
    x = torch.as_tensor(data.x, dtype=torch.float64)
    y = torch.as_tensor(data.y)
    for delta, loss in zip(deltas, losses, strict=True):
        set_weights(reference, {k: base[k].astype(np.float64) + delta[k].astype(np.float64)
                                for k in base})
        with torch.no_grad():
            expected = F.cross_entropy(reference(x), y).item()
        assert loss == pytest.approx(expected, rel=1e-12)
    assert base_loss == pytest.approx(evaluate(model, data)[0], rel=1e-12)


def test_data_file_npz_and_csv_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    split = digits_split()
    x, y = split.test.x[:20] * 16, split.test.y[:20]
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    loaded = load_data_file(tmp_path / "mine.npz")
    np.testing.assert_allclose(loaded.x, split.test.x[:20], rtol=1e-6)
    header = ",".join([f"p{i}" for i in range(64)] + ["label"])
    lines = [header] + [",".join([*map(str, row), str(label)]) for row, label in zip(x, y, strict=True)]
    (tmp_path / "mine.csv").write_text("\n".join(lines) + "\n")
    from_csv = load_data_file(tmp_path / "mine.csv")
    np.testing.assert_allclose(from_csv.x, loaded.x, rtol=1e-6)
    np.testing.assert_array_equal(from_csv.y, y)


def test_one_example_never_changes_how_another_is_scaled(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Rows are scaled one by one (per-example sensitivity): adding a raw 0..16 row to a
    file of rows already in [0, 1] leaves those rows as they were."""
    split = digits_split()
    scaled, y = split.test.x[:10], split.test.y[:10]
    np.savez(tmp_path / "a.npz", x=scaled, y=y)
    raw = np.vstack([scaled, split.test.x[10:11] * 16])
    np.savez(tmp_path / "b.npz", x=raw, y=np.append(y, split.test.y[10]))
    alone, mixed = load_data_file(tmp_path / "a.npz"), load_data_file(tmp_path / "b.npz")
    np.testing.assert_array_equal(mixed.x[:10], alone.x)
    np.testing.assert_allclose(mixed.x[10], split.test.x[10], rtol=1e-6)


@pytest.mark.parametrize(
    ("writer", "match"),
    [
        (lambda p: None, r"data-path: no such file"),
        (lambda p: np.savez(p, a=np.zeros(3)), r"expected arrays 'x' and 'y', got \['a'\]"),
        (lambda p: np.savez(p, x=np.zeros((3, 5)), y=np.zeros(3, dtype=int)),
         r"expected x of shape \(n, 64\) for this task.s schema \(64 features, "
         r"10 classes\), got \(3, 5\)"),
        (lambda p: np.savez(p, x=np.zeros((3, 64)), y=np.zeros(2, dtype=int)),
         r"expected y of shape \(3,\), got \(2,\)"),
        (lambda p: np.savez(p, x=np.zeros((2, 64)), y=np.array([0, 12])),
         r"expected integer labels in 0..9"),
        (lambda p: np.savez(p, x=np.full((2, 64), np.nan), y=np.array([0, 1])),
         r"NaN or infinite"),
        (lambda p: p.write_bytes(b"PK\x03\x04garbage"), r"cannot read it"),
    ],
)
def test_malformed_data_files_are_refused(tmp_path, writer, match) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "data.npz"
    writer(path)
    with pytest.raises(DataError, match=match):
        load_data_file(path)


def test_csv_without_label_column_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"expected a 'label' column, got \['a', 'b'\]"):
        load_data_file(tmp_path / "d.csv")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"expected a .npz or .csv file"):
        load_data_file(tmp_path / "d.txt")


@pytest.mark.parametrize("activation", ["square", "poly2"])
def test_batched_losses_equal_the_vmap_reference(activation: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The two-matmul path for PolyMLP against ``vmap(functional_call)`` (the reference,
    taken when the fast path does not apply)."""
    import client.task as task

    rng = np.random.default_rng(7)
    model = make_model(hidden_units=8, activation=activation, seed=0)
    base = get_weights(model)
    deltas = [{k: (rng.normal(size=v.shape) * 0.2).astype(np.float32) for k, v in base.items()}
              for _ in range(9)]
    data = Dataset(rng.random((31, 64), dtype=np.float32), rng.integers(0, 10, 31))
    fast_base, fast = task.candidate_losses(model, base, deltas, data)
    monkeypatch.setattr(task, "POLY_MLP_PARAMETERS", ("not-a-parameter",))
    ref_base, reference = task.candidate_losses(model, base, deltas, data)
    assert fast_base == ref_base
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-12)
