"""The task's data schema: how many input features and classes a task has, and the two
built-in datasets that provide one. Import-free (the run config uses it before anything
heavy is loaded); :mod:`client.task` builds the model and loads data from it.

A Scientist's task names its schema in the run config (``dataset``, optionally
``num-features`` and ``num-classes`` for subscribers who bring their own files) and in the
ledger's ``offer`` entry (``architecture.input_dim`` / ``architecture.num_classes``);
everything downstream (the model, the data files, the validation set, the vote, the audit
and the encrypted-inference layouts) follows it.
"""

from __future__ import annotations

from dataclasses import dataclass

# The bounds of a schema, chosen for what the rest of the system carries: a batch
# request of the encrypted-inference service holds one CKKS ciphertext per feature
# (about 0.4 MiB each), so 1,024 features make a 0.4 GiB request; 256 classes keep the
# reply's ciphertexts and the model's output layer small.
MAX_FEATURES = 1024
MAX_CLASSES = 256
MAX_HIDDEN = 4096
# What the encrypted-inference service holds and computes for one model: the batch
# layout encodes the classes x hidden second-layer weights as plaintexts of 128 KiB
# each (2,048: 256 MiB, the digits model's 320: 40 MiB), and a request costs features
# x hidden ciphertext products (2^18: about 1 minute a batch request on one core).
MAX_OUTPUT_WEIGHTS = 2048
MAX_INPUT_WEIGHTS = 1 << 18

TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1
# A federation the pool cannot feed is refused before anything starts: every
# subscriber needs this many examples on average (the Dirichlet partitioner keeps at
# least 2 in each, and DP-SGD on fewer examples learns nothing).
MIN_EXAMPLES_PER_SUBSCRIBER = 8


@dataclass(frozen=True)
class Schema:
    """Input features and classes of a task: x of shape (n, features) with values in
    [0, 1], labels in 0..classes - 1."""

    features: int
    classes: int

    def check_model(self, hidden_units: int) -> None:
        """Raise ValueError when a model of ``hidden_units`` on this schema is wider than
        the encrypted-inference service serves (:data:`MAX_OUTPUT_WEIGHTS`,
        :data:`MAX_INPUT_WEIGHTS`), naming the bound."""
        if not 1 <= hidden_units <= MAX_HIDDEN:
            raise ValueError(f"hidden-units: expected 1..{MAX_HIDDEN}, got {hidden_units}")
        if self.classes * hidden_units > MAX_OUTPUT_WEIGHTS:
            raise ValueError(
                f"hidden-units: {self.classes} classes x {hidden_units} hidden units = "
                f"{self.classes * hidden_units} second-layer weights, the encrypted-"
                f"inference service holds at most {MAX_OUTPUT_WEIGHTS}: expected at most "
                f"{MAX_OUTPUT_WEIGHTS // self.classes} hidden units")
        if self.features * hidden_units > MAX_INPUT_WEIGHTS:
            raise ValueError(
                f"hidden-units: {self.features} features x {hidden_units} hidden units = "
                f"{self.features * hidden_units} first-layer weights, the encrypted-"
                f"inference service computes at most {MAX_INPUT_WEIGHTS}: expected at most "
                f"{MAX_INPUT_WEIGHTS // self.features} hidden units")

    def check(self) -> Schema:
        if not 1 <= self.features <= MAX_FEATURES:
            raise ValueError(f"num-features: expected 1..{MAX_FEATURES}, got {self.features}")
        if not 2 <= self.classes <= MAX_CLASSES:
            raise ValueError(f"num-classes: expected 2..{MAX_CLASSES}, got {self.classes}")
        return self


@dataclass(frozen=True)
class DatasetInfo:
    """A built-in dataset: its schema, its size (``None``: as many examples as asked,
    ``default_size`` when not asked) and how raw feature values map to [0, 1]."""

    name: str
    schema: Schema
    fixed_size: int | None
    default_size: int
    max_size: int
    raw_max: float  # > 0: a file's row with a value above 1 is raw 0..raw_max intensities


DATASETS: dict[str, DatasetInfo] = {
    # scikit-learn's bundled 8x8 digits: 1,797 examples, pixel intensities 0..16.
    "digits": DatasetInfo("digits", Schema(64, 10), 1797, 1797, 1797, 16.0),
    # MNIST-1D (Greydanus 2020), generated offline from a seed: 40 features, 10 classes.
    # At most 200,000 examples: about 60 s to generate (once, then cached).
    "mnist1d": DatasetInfo("mnist1d", Schema(40, 10), None, 5000, 200_000, 0.0),
}


def split_sizes(size: int) -> tuple[int, int, int]:
    """(test, validation, pool) sizes of a dataset of ``size`` examples."""
    n_test = int(round(TEST_FRACTION * size))
    n_val = int(round(VALIDATION_FRACTION * size))
    return n_test, n_val, size - n_test - n_val


def dataset_size(name: str, asked: int) -> int:
    """How many examples dataset ``name`` has when ``dataset-size`` is ``asked`` (0: its
    default). Raises ValueError naming the dataset's limits."""
    info = DATASETS[name]
    if info.fixed_size is not None:
        if asked not in (0, info.fixed_size):
            raise ValueError(f"dataset-size: {name} has a fixed {info.fixed_size:,} examples "
                             f"(0 or {info.fixed_size}), got {asked}")
        return info.fixed_size
    size = asked or info.default_size
    if not 100 <= size <= info.max_size:
        raise ValueError(f"dataset-size: expected 0 (the default, {info.default_size:,}) or "
                         f"100..{info.max_size:,} examples of {name}, got {asked}")
    return size


def size_for_pool(pool: int) -> int:
    """The smallest dataset size whose pool (after the test and validation splits)
    holds ``pool`` examples."""
    size = pool
    while split_sizes(size)[2] < pool:
        size += 1
    return size
