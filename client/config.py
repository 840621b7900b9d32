"""The run configuration, parsed once from Flower's ``run_config`` into a frozen dataclass.

Every knob of ``[tool.flwr.app.config]`` lives here with its default, so the apps work
even when Flower hands them an empty ``run_config`` (``run_simulation`` does). Nothing
deeper in the code reads ``run_config``: it receives a :class:`RunConfig`.

A bad value raises :class:`ConfigError` naming the key, the allowed values and what came.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from client.schema import (
    DATASETS,
    MIN_EXAMPLES_PER_SUBSCRIBER,
    Schema,
    dataset_size,
    size_for_pool,
    split_sizes,
)

STRATEGIES = ("poi", "fedavg", "krum", "multikrum", "fedmedian", "fedtrimmedavg", "bulyan",
              "centered-clipping", "nnm-trimmed-mean")
ATTACKS = ("none", "label-flip", "sign-flip", "noise", "fake-data", "free-rider", "collude",
           "targeted-flip", "alie", "ipm", "min-max", "min-sum")
MODEL_POISONING_ATTACKS = ("alie", "ipm", "min-max", "min-sum")  # client.model_poisoning
PARTITIONERS = ("iid", "dirichlet")
VOTE_AGGREGATIONS = ("median", "trimmed-mean", "rank-median")
# The operator's and the Scientist's entries that grow with the federation (a round's
# selection, the validation marginals, the settlement) keep their lists in a bulk blob
# past 16 KiB (ledger.entries.split_bulk). A subscriber's ballot is one entry of ~80
# bytes a candidate scored: every voter scoring every candidate (votes-per-candidate
# 0) fits the 65,535-byte entry bound up to MAX_FULL_BALLOT subscribers; committees
# bound a ballot at any size.
MAX_SUBSCRIBERS = 1024
MAX_FULL_BALLOT = 512
VOTE_RULES = ("marginal", "single")
PAYOUT_GAMES = ("fixed-k", "mean")
MAX_ACCEPTED = 16  # payout-game mean: exact Shapley costs 2^k evaluations
MAX_ACCEPTED_SAMPLED = 4096  # payout-game fixed-k: sampled Shapley beyond 12
ACTIVATIONS = ("square", "poly2")
ACCOUNTANTS = ("prv", "rdp")
SCIENTISTS = ("honest", "inflate-score", "tamper-reveal", "withhold-reveal", "false-marginals",
              "withhold-marginals")
MAX_AMOUNT = 2**53 - 1  # amounts go into canonical JSON (I-JSON integers)


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or outside its allowed values."""


@dataclass(frozen=True)
class RunConfig:
    """All task knobs; field names are the kebab-case keys with ``_`` for ``-``."""

    num_server_rounds: int = 10
    num_subscribers: int = 10
    strategy: str = "poi"
    attack: str = "none"
    attackers: str = ""
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    # --- the task's schema (client/schema.py): a built-in dataset gives the features and
    # classes; num-features / num-classes (0: the dataset's) describe subscribers' own files
    dataset: str = "digits"
    dataset_size: int = 0  # 0: the dataset's default (digits: its fixed 1,797)
    num_features: int = 0
    num_classes: int = 0
    seed: int = 0
    top_k: int = 1
    votes_per_candidate: int = 0
    vote_aggregation: str = "median"
    trim_fraction: float = 0.2
    require_improvement: bool = False
    vote_step: float = 1.0
    # --- the marginal vote (vote-rule = marginal, server/round/marginal.py)
    vote_rule: str = "marginal"
    reputation_rate: float = 4.0
    author_score_clip: float = 1.0
    min_trusted: int = 3
    max_accepted: int = 12
    reputation_floor: float = 0.0
    center_author_scores: bool = True
    tally_trim: float = 0.5
    vote_noise_multiplier: float = 0.0  # > 0: ballots under DP, counted in epsilon
    vote_clip: float = 0.1  # L2 bound on one example's part of a ballot (nats)
    validation_first_rounds: int = 1
    max_update_norm: float = 10.0
    noise_multiplier: float = 0.8
    target_epsilon: float = 0.0
    max_grad_norm: float = 2.0
    target_delta: float = 1e-5
    accountant: str = "rdp"
    local_epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 0.3
    hidden_units: int = 32
    activation: str = "square"
    attack_scale: float = 5.0
    attack_noise_std: float = 0.5
    attack_start_round: int = 1
    flip_source: int = 1
    flip_target: int = 7
    num_malicious: int = -1
    clipping_tau: float = 5.0
    clipping_iterations: int = 1
    out_dir: str = ""
    # --- the market (docs/market.md); amounts are integers in minor units
    reward: int = 1_000_000
    update_fee: int = 100
    buyer_fee: int = 10
    scientist_fee_share_ppm: int = 200_000
    reveal_deadline_rounds: int = 2
    score_tolerance_micro: int = 10
    patience: int = 0
    scientist: str = "honest"
    validation_path: str = ""
    # --- the payout rule (server.market.settlement.PayoutRule, docs/market.md)
    payout_game: str = "fixed-k"  # "mean": rule v1, Shapley over the mean of a coalition
    shapley_exact_max: int = 12  # exact Shapley up to this many applied updates
    shapley_permutations: int = 32  # sampled orderings beyond that
    payout_loss_rise: bool = True
    payout_vote_gate: bool = True
    payout_high_water: bool = True
    target_loss_micro: int = 0  # L*: the loss at which the task counts as converged

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_mapping(cls, raw: Mapping[str, object]) -> RunConfig:
        """Build from a ``run_config`` mapping (kebab-case keys); unknown keys are refused."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}; expected some of {sorted(known)}"
            )
        values: dict[str, object] = {}
        for key, value in raw.items():
            field = known[key]
            values[field.name] = _coerce(key, value, field.type)
        config = cls(**values)  # type: ignore[arg-type]
        config.validate()
        return config

    def to_mapping(self) -> dict[str, object]:
        """The kebab-case mapping, as Flower's ``run_config`` would carry it."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    # --------------------------------------------------------------- derived
    @property
    def schema(self) -> Schema:
        """The task's features and classes: the dataset's unless overridden."""
        own = DATASETS[self.dataset].schema
        return Schema(self.num_features or own.features, self.num_classes or own.classes)

    @property
    def raw_max(self) -> float:
        """What a data file's raw rows are scaled from: 16 (digits intensities) for the
        digits task, nothing for any other (its files hold features in [0, 1])."""
        return DATASETS["digits"].raw_max if (
            self.dataset == "digits" and self.uses_dataset_schema) else 0.0

    @property
    def uses_dataset_schema(self) -> bool:
        """Whether the built-in dataset can feed this task (its schema is the task's)."""
        return self.schema == DATASETS[self.dataset].schema

    @property
    def attack_kinds(self) -> frozenset[str]:
        """The attacks joined by ``+`` (``none`` gives the empty set)."""
        kinds = frozenset(self.attack.split("+")) - {"none"}
        return kinds

    @property
    def attacker_ids(self) -> tuple[int, ...]:
        """Partition ids of the attackers, sorted."""
        return _parse_attackers(self.attackers)

    def is_attacker(self, partition_id: int) -> bool:
        return partition_id in self.attacker_ids and bool(self.attack_kinds)

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` for any value a run cannot start with."""
        _one_of("strategy", self.strategy, STRATEGIES)
        for kind in self.attack.split("+"):
            _one_of("attack", kind, ATTACKS)
        if "none" in self.attack.split("+") and self.attack != "none":
            raise ConfigError(f"attack: 'none' cannot be combined, got {self.attack!r}")
        _one_of("partitioner", self.partitioner, PARTITIONERS)
        _one_of("vote-aggregation", self.vote_aggregation, VOTE_AGGREGATIONS)
        _one_of("vote-rule", self.vote_rule, VOTE_RULES)
        _non_negative_finite("reputation-rate", self.reputation_rate)
        _positive_finite("author-score-clip", self.author_score_clip)
        _at_least("min-trusted", self.min_trusted, 1)
        _at_least("validation-first-rounds", self.validation_first_rounds, 0)
        _at_least("max-accepted", self.max_accepted, 1)
        limit = MAX_ACCEPTED if self.payout_game == "mean" else MAX_ACCEPTED_SAMPLED
        if self.max_accepted > limit:
            raise ConfigError(f"max-accepted: expected at most {limit} under payout-game "
                              f"{self.payout_game!r}, got {self.max_accepted}")
        if not (math.isfinite(self.vote_noise_multiplier) and self.vote_noise_multiplier >= 0):
            raise ConfigError(f"vote-noise-multiplier: expected a finite number >= 0 (0: "
                              f"ballots without noise), got {self.vote_noise_multiplier}")
        _positive_finite("vote-clip", self.vote_clip)
        if self.vote_noise_multiplier > 0 and self.vote_rule != "marginal":
            raise ConfigError(f"vote-noise-multiplier: private ballots need vote-rule "
                              f"marginal, got {self.vote_rule!r}")
        if not 0.0 < self.tally_trim <= 0.5:
            raise ConfigError(f"tally-trim: expected 0 < trim <= 0.5 (0.5: the weighted "
                              f"median), got {self.tally_trim}")
        if not 0.0 <= self.reputation_floor <= 1.0:
            raise ConfigError(
                f"reputation-floor: expected 0 <= floor <= 1, got {self.reputation_floor}")
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("accountant", self.accountant, ACCOUNTANTS)
        _at_least("num-server-rounds", self.num_server_rounds, 1)
        _at_least("num-subscribers", self.num_subscribers, 2)
        if self.num_subscribers > MAX_SUBSCRIBERS:
            raise ConfigError(
                f"num-subscribers: expected at most {MAX_SUBSCRIBERS}, got "
                f"{self.num_subscribers}")
        if self.strategy == "poi" and self.num_subscribers > MAX_FULL_BALLOT and not (
                0 < self.votes_per_candidate < MAX_FULL_BALLOT):
            raise ConfigError(
                f"votes-per-candidate: {self.votes_per_candidate} (0: every voter scores "
                f"every candidate) allows at most {MAX_FULL_BALLOT} subscribers (a ballot is "
                f"one ledger entry of at most 65,535 bytes, ~80 a candidate): expected "
                f"committees of 1..{MAX_FULL_BALLOT - 1} (e.g. 16) for "
                f"{self.num_subscribers}")
        self._validate_schema()
        _at_least("top-k", self.top_k, 1)
        _at_least("votes-per-candidate", self.votes_per_candidate, 0)
        _at_least("local-epochs", self.local_epochs, 1)
        _at_least("batch-size", self.batch_size, 1)
        _at_least("hidden-units", self.hidden_units, 1)
        _one_of("scientist", self.scientist, SCIENTISTS)
        for key in ("reward", "update-fee", "buyer-fee"):
            amount = getattr(self, key.replace("-", "_"))
            if not 0 <= amount <= MAX_AMOUNT:
                raise ConfigError(
                    f"{key}: expected an integer amount in minor units, 0..{MAX_AMOUNT}, "
                    f"got {amount}")
        if (self.reward * 2 + self.update_fee * self.num_subscribers * self.num_server_rounds
                > MAX_AMOUNT):
            raise ConfigError(f"reward: the escrow (2 x reward + update fees) must stay "
                              f"<= {MAX_AMOUNT}, got reward {self.reward}")
        if not 0 <= self.scientist_fee_share_ppm <= 1_000_000:
            raise ConfigError("scientist-fee-share-ppm: expected 0..1000000 (parts per "
                              f"million), got {self.scientist_fee_share_ppm}")
        _at_least("reveal-deadline-rounds", self.reveal_deadline_rounds, 1)
        _at_least("score-tolerance-micro", self.score_tolerance_micro, 0)
        _at_least("patience", self.patience, 0)
        _one_of("payout-game", self.payout_game, PAYOUT_GAMES)
        if not 1 <= self.shapley_exact_max <= 12:
            raise ConfigError(f"shapley-exact-max: expected 1..12 (2^k coalition losses a "
                              f"round), got {self.shapley_exact_max}")
        if not 2 <= self.shapley_permutations <= 256:
            raise ConfigError(f"shapley-permutations: expected 2..256, got "
                              f"{self.shapley_permutations}")
        _at_least("target-loss-micro", self.target_loss_micro, 0)
        if self.top_k > 16:
            raise ConfigError(f"top-k: expected at most 16 (exact Shapley in the settlement "
                              f"costs 2^k evaluations), got {self.top_k}")
        if self.top_k > self.num_subscribers:
            raise ConfigError(
                f"top-k: expected at most num-subscribers ({self.num_subscribers}) "
                f"candidates, got {self.top_k}"
            )
        if self.votes_per_candidate > self.num_subscribers - 1:
            raise ConfigError(
                "votes-per-candidate: expected at most num-subscribers - 1 "
                f"({self.num_subscribers - 1}) voters besides the author, "
                f"got {self.votes_per_candidate}"
            )
        _positive_finite("dirichlet-alpha", self.dirichlet_alpha)
        _positive_finite("max-grad-norm", self.max_grad_norm)
        _positive_finite("learning-rate", self.learning_rate)
        _positive_finite("max-update-norm", self.max_update_norm)
        _positive_finite("vote-step", self.vote_step)
        _non_negative_finite("noise-multiplier", self.noise_multiplier)
        _non_negative_finite("target-epsilon", self.target_epsilon)
        _non_negative_finite("attack-scale", self.attack_scale)
        _non_negative_finite("attack-noise-std", self.attack_noise_std)
        self._validate_attack_knobs()
        _positive_finite("clipping-tau", self.clipping_tau)
        _at_least("clipping-iterations", self.clipping_iterations, 1)
        if not 0.0 < self.target_delta < 1.0:
            raise ConfigError(f"target-delta: expected 0 < delta < 1, got {self.target_delta}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(
                f"trim-fraction: expected 0 <= fraction < 0.5, got {self.trim_fraction}"
            )
        attackers = self.attacker_ids
        if len(attackers) > self.num_subscribers:
            raise ConfigError(
                f"attackers: {len(attackers)} attackers but only {self.num_subscribers} "
                "subscribers (num-subscribers)"
            )
        out_of_range = [a for a in attackers if a >= self.num_subscribers]
        if out_of_range:
            raise ConfigError(
                f"attackers: partition ids must be in 0..{self.num_subscribers - 1}, "
                f"got {out_of_range}"
            )
        if attackers and not self.attack_kinds:
            raise ConfigError(
                f"attackers: {list(attackers)} given but attack is 'none'; "
                f"expected one of {list(ATTACKS[1:])} (joined by '+')"
            )

    def _validate_schema(self) -> None:
        """The dataset, its size, the schema, and whether the pool feeds the federation."""
        _one_of("dataset", self.dataset, tuple(DATASETS))
        for key in ("num-features", "num-classes", "dataset-size"):
            _at_least(key, getattr(self, key.replace("-", "_")), 0)
        try:
            self.schema.check().check_model(self.hidden_units)
            size = dataset_size(self.dataset, self.dataset_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.uses_dataset_schema and not self.validation_path:
            own = DATASETS[self.dataset].schema
            raise ConfigError(
                f"validation-path: a task of {self.schema.features} features and "
                f"{self.schema.classes} classes is not {self.dataset}'s ({own.features} and "
                f"{own.classes}): expected the Scientist's validation file, got none")
        pool = split_sizes(size)[2]
        if self.uses_dataset_schema and pool < MIN_EXAMPLES_PER_SUBSCRIBER * self.num_subscribers:
            most = pool // MIN_EXAMPLES_PER_SUBSCRIBER
            grow = ("" if DATASETS[self.dataset].fixed_size is not None else
                    f", or raise dataset-size to at least "
                    f"{size_for_pool(MIN_EXAMPLES_PER_SUBSCRIBER * self.num_subscribers):,}")
            raise ConfigError(
                f"num-subscribers: {self.dataset} ({size:,} examples) leaves {pool:,} for "
                f"subscribers, at least {MIN_EXAMPLES_PER_SUBSCRIBER} each: expected at most "
                f"{most} subscribers{grow}, got {self.num_subscribers}")

    def _validate_attack_knobs(self) -> None:
        """``attack-start-round``, the targeted flip's classes and which attacks combine."""
        _at_least("attack-start-round", self.attack_start_round, 1)
        # The flip's classes must exist when set or when the targeted flip runs; the
        # defaults (1 -> 7) on a task of fewer classes only leave the report's flip
        # metrics unmeasured (-1), so a 3-class task need not name them.
        defaults = (RunConfig.flip_source, RunConfig.flip_target)
        checked = ("targeted-flip" in self.attack_kinds
                   or (self.flip_source, self.flip_target) != defaults)
        classes = self.schema.classes if checked else 1 << 16
        for key in ("flip-source", "flip-target"):
            value = getattr(self, key.replace("-", "_"))
            if not 0 <= value < classes:
                raise ConfigError(f"{key}: expected a class in 0..{classes - 1}, got {value}")
        if self.flip_source == self.flip_target:
            raise ConfigError(f"flip-source and flip-target: expected two different classes, "
                              f"got {self.flip_source} for both")
        kinds = set(self.attack.split("+"))
        poisoning = sorted(kinds & set(MODEL_POISONING_ATTACKS))
        if len(poisoning) > 1:
            raise ConfigError(f"attack: expected at most one of {list(MODEL_POISONING_ATTACKS)}, "
                              f"got {poisoning}")
        if poisoning and kinds & {"noise", "free-rider"}:
            raise ConfigError(f"attack: {poisoning[0]} crafts from trained updates and cannot "
                              "be combined with an attack that does not train, "
                              f"got {self.attack!r}")
        data_attacks = sorted(kinds & {"label-flip", "fake-data", "targeted-flip"})
        if "targeted-flip" in kinds and len(data_attacks) > 1:
            raise ConfigError(f"attack: targeted-flip cannot be combined with another data "
                              f"attack, got {data_attacks}")


# ------------------------------------------------------------------------ helpers
def _parse_attackers(raw: str) -> tuple[int, ...]:
    if not raw.strip():
        return ()
    ids: set[int] = set()
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ConfigError(
                f"attackers: expected comma-separated partition ids, got {raw!r}"
            ) from None
        if value < 0:
            raise ConfigError(f"attackers: partition ids are >= 0, got {value}")
        ids.add(value)
    return tuple(sorted(ids))


def _coerce(key: str, value: object, annotation: object) -> object:
    kind = str(annotation)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not isinstance(value, str):
        # Flower parses `attackers=3` as an int: accept scalars as their text.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key}: expected an integer >= {low}, got {value}")


def _positive_finite(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key}: expected a finite number > 0, got {value}")


def _non_negative_finite(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{key}: expected a finite number >= 0, got {value}")
