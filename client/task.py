"""The learning task, plain PyTorch: the polynomial-activation MLP and the task's data.

The model is HE-friendly on purpose: a features -> hidden -> classes MLP whose only
non-linearity is a low-degree polynomial, so the encrypted-inference service can evaluate
this exact network under CKKS. Its shape is the task's :class:`~client.schema.Schema`
(``dataset``, ``num-features``, ``num-classes`` in the run config; ``input_dim`` and
``num_classes`` in the ledger's offer). Two built-in datasets, both offline:
scikit-learn's bundled 8x8 digits (64 features) and MNIST-1D generated from a seed (40
features, as many examples as asked). Each is split once with a fixed seed into a
held-out test set, the Scientist's private validation set (no subscriber holds any of it)
and a pool that ``flwr-datasets`` partitioners split among subscribers. A deployed
subscriber brings its own file instead (:func:`load_data_file`), checked against the
schema.
"""

from __future__ import annotations

import functools
import os
import random
import tempfile
import threading
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from client.schema import DATASETS, Schema, dataset_size, split_sizes

DIGITS = DATASETS["digits"].schema
NUM_FEATURES = DIGITS.features  # the digits task's; other tasks carry their own Schema
NUM_CLASSES = DIGITS.classes
DATA_SPLIT_SEED = 0
MNIST1D_SEED = 42  # the generator's published seed (mnist1d.data.get_dataset_args)
# MNIST-1D's generator standardises the whole set (mean 0, std 1; values within about
# +-6): a fixed affine map takes that to [0, 1], the range every task's features live in.
MNIST1D_RANGE = 6.0


class DataError(ValueError):
    """A subscriber's data file is missing, malformed or of the wrong shape."""


# ---------------------------------------------------------------------------- model
class Square(nn.Module):
    """x -> x^2, the CryptoNets activation: one ciphertext multiplication under CKKS."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Poly2(nn.Module):
    """x -> x/2 + x^2/8, the degree-2 Taylor polynomial of softplus (minus log 2).

    Gentler than the square under DP noise; still one multiplication under CKKS.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + 0.125 * x * x


class PolyMLP(nn.Module):
    """features -> hidden -> classes with a polynomial activation. Parameter names are a
    contract: ``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias`` (the HE layer
    reads them)."""

    def __init__(self, *, hidden_units: int = 32, activation: str = "square",
                 schema: Schema = DIGITS) -> None:
        super().__init__()
        self.fc1 = nn.Linear(schema.features, hidden_units)
        self.act: nn.Module = Square() if activation == "square" else Poly2()
        self.fc2 = nn.Linear(hidden_units, schema.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_model(*, hidden_units: int, activation: str, seed: int,
               schema: Schema = DIGITS) -> PolyMLP:
    """A freshly initialised model; the same seed and schema give bit-identical weights
    (for the digits schema, the same weights as before schemas existed)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = PolyMLP(hidden_units=hidden_units, activation=activation, schema=schema)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def schema_of(architecture: Mapping[str, Any]) -> Schema:
    """The schema an offer's ``architecture`` names (``input_dim``, ``num_classes``)."""
    try:
        return Schema(int(architecture["input_dim"]), int(architecture["num_classes"])).check()
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"architecture: expected input_dim and num_classes within the "
                        f"schema bounds, got {dict(architecture)!r} ({exc})") from None


def model_of(architecture: Mapping[str, Any], *, seed: int = 0) -> PolyMLP:
    """The model an offer's ``architecture`` describes."""
    return make_model(hidden_units=int(architecture["hidden_units"]),
                      activation=str(architecture["activation"]), seed=seed,
                      schema=schema_of(architecture))


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy arrays, in ``state_dict`` order."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True)
            for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()})


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Dataset:
    """Features in [0, 1] (float32, shape (n, features)) and integer labels (n,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class DataSplit:
    test: Dataset
    validation: Dataset
    pool: Dataset


def _split(x: np.ndarray, y: np.ndarray) -> DataSplit:
    order = np.random.default_rng(DATA_SPLIT_SEED).permutation(len(y))
    n_test, n_val, _ = split_sizes(len(y))
    test, val, pool = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return DataSplit(test=Dataset(x[test], y[test]), validation=Dataset(x[val], y[val]),
                     pool=Dataset(x[pool], y[pool]))


@functools.lru_cache(maxsize=1)
def digits_split() -> DataSplit:
    """The fixed split of scikit-learn's bundled digits (1,797 samples, no download)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    return _split(x, np.asarray(bunch.target, dtype=np.int64))


def _mnist1d_cache_dir() -> Path:
    root = os.environ.get("POI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "poi")
    return Path(root)


_MNIST1D_LOCK = threading.Lock()  # the generator seeds process-wide generators


def mnist1d_arrays(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` MNIST-1D examples generated offline from the published seed, features
    mapped to [0, 1]: (x float32 (size, 40), y int64). Generation costs about 0.3 ms an
    example, so the arrays are kept in ``$POI_CACHE_DIR`` (default ``~/.cache/poi``); a
    cached file that is not what the generator gives (shape, dtype, range, labels) is
    generated again."""
    path = _mnist1d_cache_dir() / f"mnist1d-{size}-seed{MNIST1D_SEED}.npz"
    with _MNIST1D_LOCK:
        cached = _cached_mnist1d(path, size)
        if cached is not None:
            return cached
        x, y = _generate_mnist1d(size)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".mnist1d-", suffix=".npz")
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, x=x, y=y)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: generate again next time
        return x, y


def _cached_mnist1d(path: Path, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as cached:
            x, y = cached["x"], cached["y"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if (x.shape != (size, 40) or y.shape != (size,) or x.dtype != np.float32
            or y.dtype != np.int64 or not np.all(np.isfinite(x)) or x.min() < 0.0
            or x.max() > 1.0 or y.min() < 0 or y.max() > 9):
        return None
    return x, y


def _generate_mnist1d(size: int) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    per_class = -(-size // 10)  # the generator makes num_samples // 10 of each class
    args.num_samples, args.seed, args.train_split = 10 * per_class, MNIST1D_SEED, 1.0
    # The generator seeds Python's and NumPy's global generators: keep the caller's.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    raw = np.asarray(data["x"], dtype=np.float64)[:size]
    x = np.clip((raw + MNIST1D_RANGE) / (2 * MNIST1D_RANGE), 0.0, 1.0).astype(np.float32)
    return x, np.asarray(data["y"], dtype=np.int64)[:size]


@functools.lru_cache(maxsize=4)
def dataset_split(dataset: str = "digits", size: int = 0) -> DataSplit:
    """The fixed test / validation / pool split of a built-in dataset (``size`` 0: its
    default size)."""
    if dataset not in DATASETS:
        raise DataError(f"dataset: expected one of {sorted(DATASETS)}, got {dataset!r}")
    try:
        size = dataset_size(dataset, size)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if dataset == "digits":
        return digits_split()
    return _split(*mnist1d_arrays(size))


@functools.lru_cache(maxsize=8)
def partition_indices(
    num_partitions: int, partitioner: str, dirichlet_alpha: float, seed: int,
    dataset: str = "digits", size: int = 0,
) -> tuple[np.ndarray, ...]:
    """Indexes into the pool for every partition, from ``flwr-datasets`` partitioners."""
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import IidPartitioner

    pool = dataset_split(dataset, size).pool
    hf = HFDataset.from_dict({"index": np.arange(len(pool)), "label": pool.y})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
        # IidPartitioner takes no seed: shuffle the pool deterministically first.
        hf = hf.shuffle(seed=seed)
    elif partitioner == "dirichlet":
        wanted = max(2, min(10, len(pool) // (4 * num_partitions)))
        try:
            return _dirichlet(hf, num_partitions, dirichlet_alpha, wanted, seed)
        except ValueError:
            if wanted == 2:
                raise
            # Many subscribers of few examples each (1,024 of 40): flwr-datasets gives up
            # after 10 draws that leave some partition under ``wanted``; settle for 2.
            # Federations it could split keep the partitions they always had.
            return _dirichlet(hf, num_partitions, dirichlet_alpha, 2, seed)
    else:
        raise ValueError(f"partitioner: expected 'iid' or 'dirichlet', got {partitioner!r}")
    part.dataset = hf
    return tuple(
        np.asarray(part.load_partition(pid)["index"], dtype=np.int64)
        for pid in range(num_partitions)
    )


def _dirichlet(hf: Any, num_partitions: int, alpha: float, min_size: int, seed: int
               ) -> tuple[np.ndarray, ...]:
    import warnings

    from flwr_datasets.partitioner import DirichletPartitioner

    part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                alpha=alpha, min_partition_size=min_size,
                                self_balancing=True, seed=seed)
    part.dataset = hf
    with warnings.catch_warnings():  # its retries warn once a draw: we report the failure
        warnings.simplefilter("ignore", UserWarning)
        return tuple(np.asarray(part.load_partition(pid)["index"], dtype=np.int64)
                     for pid in range(num_partitions))


def check_partitions(num_partitions: int, partitioner: str, dirichlet_alpha: float,
                     seed: int, dataset: str = "digits", size: int = 0) -> None:
    """Partition the pool now (cached for the subscribers in this process), so a
    federation the partitioner cannot split (too skewed a ``dirichlet-alpha`` for so
    few examples a subscriber) is refused before a ledger or an offer exists."""
    try:
        partition_indices(num_partitions, partitioner, dirichlet_alpha, seed, dataset, size)
    except ValueError as exc:
        pool = len(dataset_split(dataset, size).pool)
        raise DataError(
            f"num-subscribers: the {partitioner} partitioner cannot give {num_partitions} "
            f"subscribers at least 2 of {dataset}'s {pool:,} pool examples each with "
            f"dirichlet-alpha {dirichlet_alpha} ({exc}): expected fewer subscribers, a "
            "larger dirichlet-alpha or a larger dataset-size") from None


def load_partition(
    partition_id: int, num_partitions: int, *, partitioner: str, dirichlet_alpha: float,
    seed: int, dataset: str = "digits", size: int = 0,
) -> Dataset:
    """One subscriber's share of the pool."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(
            f"partition-id: expected 0..{num_partitions - 1}, got {partition_id}"
        )
    idx = partition_indices(num_partitions, partitioner, dirichlet_alpha, seed, dataset,
                            size)[partition_id]
    pool = dataset_split(dataset, size).pool
    return Dataset(pool.x[idx], pool.y[idx])


def load_data_file(path: str | Path, *, label_column: str = "label",
                   schema: Schema = DIGITS, raw_max: float | None = None) -> Dataset:
    """A subscriber's own data: ``.npz`` with ``x`` (n, features) and ``y`` (n,), or
    ``.csv`` with one column a feature and a ``label`` column, checked against the task's
    ``schema``. Features are in [0, 1]; with ``raw_max`` (default: 16 for the digits
    schema, else none) a row with a value above 1 is taken as 0..raw_max intensities and
    scaled (row by row)."""
    x, y = _read_table(path, label_column=label_column, labels=True, what="data-path")
    assert y is not None
    return _checked_dataset(x, y, source=Path(path).name, schema=schema, raw_max=raw_max)


def load_features(path: str | Path, *, label_column: str = "label",
                  schema: Schema = DIGITS, raw_max: float | None = None) -> np.ndarray:
    """A buyer's inputs: ``.npz`` with ``x`` (n, features), or ``.csv`` with a column a
    feature (a ``label`` column, if present, is ignored). Scaled as :func:`load_data_file`."""
    x, _ = _read_table(path, label_column=label_column, labels=False, what="input")
    if x.ndim != 2:
        raise DataError(f"input {Path(path).name}: expected x of shape (n, {schema.features}), "
                        f"got {x.shape}")
    return _checked_dataset(x, np.zeros(len(x), dtype=np.int64), source=Path(path).name,
                            schema=schema, raw_max=raw_max).x


def _read_table(path: str | Path, *, label_column: str, labels: bool, what: str
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` (and ``y`` when ``labels``) from a ``.npz`` or ``.csv`` file, or a
    :class:`DataError` that names ``what`` (the config key or argument) and the file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what}: no such file {str(p)!r}")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as data:
                wanted = ["x", "y"] if labels else ["x"]
                if any(name not in data for name in wanted):
                    names = " and ".join(repr(n) for n in wanted)
                    raise DataError(f"{what} {p.name}: expected arrays {names}, "
                                    f"got {sorted(data)}")
                x = np.asarray(data["x"]) if labels else np.asarray(data["x"], np.float64)
                return x, (np.asarray(data["y"]) if labels else None)
        if p.suffix == ".csv":
            import csv

            with p.open(newline="") as handle:
                reader = csv.DictReader(handle)
                header = reader.fieldnames or []
                if labels and label_column not in header:
                    raise DataError(
                        f"{what} {p.name}: expected a {label_column!r} column, got {header}"
                    )
                features = [c for c in header if c != label_column]
                rows = list(reader)
            x = np.array([[float(r[c]) for c in features] for r in rows], dtype=np.float64)
            y = (np.array([int(r[label_column]) for r in rows], dtype=np.int64)
                 if labels else None)
            return x, y
        raise DataError(f"{what}: expected a .npz or .csv file, got {p.name!r}")
    except DataError:
        raise
    except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what} {p.name}: cannot read it ({exc})") from exc


def _checked_dataset(x: np.ndarray, y: np.ndarray, *, source: str,
                     schema: Schema = DIGITS, raw_max: float | None = None) -> Dataset:
    features, classes = schema.features, schema.classes
    if x.ndim != 2 or x.shape[1] != features:
        raise DataError(f"{source}: expected x of shape (n, {features}) for this task's "
                        f"schema ({features} features, {classes} classes), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise DataError(f"{source}: expected y of shape ({x.shape[0]},), got {y.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{source}: expected at least one example, got none")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{source}: x contains NaN or infinite values")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= classes:
        found = (f"dtype {y.dtype}" if not np.issubdtype(y.dtype, np.integer)
                 else f"labels {int(y.min())}..{int(y.max())}")
        raise DataError(f"{source}: expected integer labels in 0..{classes - 1}, got {found}")
    x = x.astype(np.float32)
    if raw_max is None:
        raw_max = DATASETS["digits"].raw_max if schema == DIGITS else 0.0
    if raw_max > 0:
        # Each row on its own: a row with a value above 1 is 0..16 intensities. Deciding
        # for the whole file would let one example change how every other is scaled,
        # which breaks the per-example sensitivity DP-SGD and private ballots rely on.
        raw = x.max(axis=1) > 1.0
        x[raw] = x[raw] / raw_max
    if x.min() < 0.0 or x.max() > 1.0:
        raise DataError(f"{source}: expected features in [0, 1] (scale them before "
                        f"training; the encrypted-inference service needs that range too), "
                        f"got [{float(x.min()):.4g}, {float(x.max()):.4g}]")
    return Dataset(x.astype(np.float32), y.astype(np.int64))


# ------------------------------------------------------------------- train and test
def train_plain(
    model: nn.Module, data: Dataset, *, epochs: int, batch_size: int, learning_rate: float,
    seed: int,
) -> float:
    """Non-private SGD (used for baselines of the Shapley benchmark and in tests).
    Returns the mean training loss of the last epoch."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(data.x), torch.as_tensor(data.y)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    model.train()
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        losses = []
        for start in range(0, len(data), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        last = float(np.mean(losses)) if losses else 0.0
    return last


def evaluate(model: nn.Module, data: Dataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy), computed in float64 on CPU so a replay of the same
    weights on the same data reproduces the loss to the last bit."""
    reference = functional_float64(model)
    with torch.no_grad():
        logits = reference(torch.as_tensor(data.x, dtype=torch.float64))
        target = torch.as_tensor(data.y)
        loss = F.cross_entropy(logits, target).item()
        accuracy = (logits.argmax(dim=1) == target).double().mean().item()
    return float(loss), float(accuracy)


def functional_float64(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model)
    return clone.double().eval()


POLY_MLP_PARAMETERS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def poly_mlp_example_losses(model: nn.Module, stacked: Mapping[str, torch.Tensor],
                             x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every example under K stacked PolyMLPs, shape (K, n), with two
    batched matmuls (no per-operator dispatch of ``vmap(functional_call)``)."""
    hidden = torch.einsum("nf,khf->knh", x, stacked["fc1.weight"]) + stacked["fc1.bias"][:, None]
    logits = torch.einsum("knh,kch->knc", model.act(hidden), stacked["fc2.weight"])
    logits = logits + stacked["fc2.bias"][:, None]
    count, n, classes = logits.shape
    per_example = F.cross_entropy(logits.reshape(count * n, classes), y.repeat(count),
                                  reduction="none")
    return per_example.view(count, n)


def poly_mlp_losses(model: nn.Module, stacked: Mapping[str, torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of K stacked PolyMLPs on (x, y): the same function as
    ``vmap(functional_call)`` (checked in the tests to 1e-12), which dominated a vote's
    time at this model size."""
    return poly_mlp_example_losses(model, stacked, x, y).mean(dim=1)


def _stacked(base: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, np.ndarray]]
             ) -> dict[str, torch.Tensor]:
    """base + delta for every delta, stacked along a new first axis (float64)."""
    return {k: torch.stack([base[k] + torch.as_tensor(np.asarray(d[k]), dtype=torch.float64)
                            for d in deltas]) for k in base}


def candidate_example_losses(model: nn.Module, base: Mapping[str, np.ndarray],
                             deltas: Sequence[Mapping[str, np.ndarray]], data: Dataset
                             ) -> np.ndarray:
    """The loss of every example under base + delta for every delta, shape (K, n), in
    one batched pass (float64): what a private ballot clips example by example."""
    x = torch.as_tensor(data.x, dtype=torch.float64)
    y = torch.as_tensor(data.y)
    reference = functional_float64(model)
    base_t = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64) for k, v in base.items()}
    with torch.no_grad():
        stacked = _stacked(base_t, deltas)
        if isinstance(model, PolyMLP) and set(stacked) == set(POLY_MLP_PARAMETERS):
            losses = poly_mlp_example_losses(reference, stacked, x, y)
        else:
            losses = torch.vmap(lambda params: F.cross_entropy(
                functional_call(reference, params, (x,)), y, reduction="none"))(stacked)
    return losses.numpy().astype(np.float64)


def candidate_losses(
    model: nn.Module,
    base: Mapping[str, np.ndarray],
    deltas: Sequence[Mapping[str, np.ndarray]],
    data: Dataset,
) -> tuple[float, np.ndarray]:
    """Loss of the base model and of base + delta for every candidate, in one batched
    pass (``torch.func.functional_call`` under ``vmap``), not a loop of model copies.

    Returns ``(base_loss, losses)`` with ``losses[i]`` for ``deltas[i]``.
    """
    x = torch.as_tensor(data.x, dtype=torch.float64)
    y = torch.as_tensor(data.y)
    reference = functional_float64(model)
    base_t = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64) for k, v in base.items()}

    def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(reference, params, (x,)), y)

    with torch.no_grad():
        base_loss = float(loss_of(base_t))
        if not deltas:
            return base_loss, np.zeros(0)
        stacked = _stacked(base_t, deltas)
        if isinstance(model, PolyMLP) and set(stacked) == set(POLY_MLP_PARAMETERS):
            losses = poly_mlp_losses(reference, stacked, x, y)
        else:
            losses = torch.vmap(loss_of)(stacked)
    return base_loss, losses.numpy().astype(np.float64)
