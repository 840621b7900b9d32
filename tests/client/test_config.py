from __future__ import annotations

import pytest

from client.config import ConfigError, RunConfig


def test_defaults_match_pyproject() -> None:
    import tomllib
    from pathlib import Path

    table = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    app_config = table["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_mapping(app_config) == RunConfig()
    assert set(app_config) == set(RunConfig().to_mapping())


def test_parses_kebab_case_and_coerces() -> None:
    config = RunConfig.from_mapping({"num-server-rounds": "3", "attack": "label-flip+collude",
                                     "attackers": "2, 0", "require-improvement": "true",
                                     "noise-multiplier": 1})
    assert config.num_server_rounds == 3
    assert config.attack_kinds == {"label-flip", "collude"}
    assert config.attacker_ids == (0, 2)
    assert config.require_improvement is True
    assert config.is_attacker(2) and not config.is_attacker(1)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"strategy": "fedprox"}, r"strategy: expected one of \['poi'.*got 'fedprox'"),
        ({"attack": "label-flip+poison"}, r"attack: expected one of .*got 'poison'"),
        ({"attack": "none+collude"}, r"'none' cannot be combined"),
        ({"top-k": 11, "num-subscribers": 10}, r"top-k: expected at most num-subscribers \(10\)"),
        ({"noise-multiplier": -0.5}, r"noise-multiplier: expected a finite number >= 0, got -0.5"),
        ({"attack": "noise", "attackers": "0,1,2", "num-subscribers": 2},
         r"attackers: 3 attackers but only 2 subscribers"),
        ({"attack": "noise", "attackers": "5", "num-subscribers": 4},
         r"attackers: partition ids must be in 0..3, got \[5\]"),
        ({"attackers": "1"}, r"attackers: \[1\] given but attack is 'none'"),
        ({"attackers": "a,b", "attack": "noise"}, r"attackers: expected comma-separated"),
        ({"vote-aggregation": "mean"}, r"vote-aggregation: expected one of"),
        ({"num-server-rounds": "many"}, r"num-server-rounds: expected an integer, got 'many'"),
        ({"bogus-key": 1}, r"unknown run-config key\(s\) \['bogus-key'\]"),
        ({"target-delta": 1.5}, r"target-delta: expected 0 < delta < 1"),
        ({"votes-per-candidate": 10, "num-subscribers": 10},
         r"votes-per-candidate: expected at most num-subscribers - 1"),
        ({"num-subscribers": 1025, "dataset": "mnist1d", "dataset-size": 20000,
          "votes-per-candidate": 16}, r"num-subscribers: expected at most 1024, got 1025"),
        ({"num-subscribers": 513, "dataset": "mnist1d", "dataset-size": 20000},
         r"votes-per-candidate: 0 \(0: every voter scores every candidate\) allows at most "
         r"512 subscribers .* expected committees of 1\.\.511 \(e\.g\. 16\) for 513"),
        ({"num-subscribers": 1024, "dataset": "mnist1d", "dataset-size": 60000,
          "votes-per-candidate": 900},  # a ballot of ~900 candidates passes 65,535 bytes
         r"votes-per-candidate: 900 .* expected committees of 1\.\.511"),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(raw)


def test_a_task_with_more_supernodes_than_the_ledger_holds_refuses_to_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every connected node gets a round's work, whatever num-subscribers says: more than
    the most a task is sized for refuses at the start."""
    from server.server_app import run_task
    from tests.conftest import InProcessGrid, make_contexts

    run = {"num-subscribers": 2, "out-dir": str(tmp_path)}
    grid = InProcessGrid(make_contexts(run, 1025), {})
    with pytest.raises(RuntimeError, match="at most 1024 subscribers, 1025 SuperNodes"):
        run_task(grid, RunConfig.from_mapping(run), tmp_path)


def test_committees_bound_only_the_vote() -> None:
    """Ballots are PoI's: a FedAvg baseline of 1,024 subscribers needs no committees."""
    big = {"num-subscribers": 1024, "dataset": "mnist1d", "dataset-size": 60000}
    RunConfig.from_mapping({**big, "strategy": "fedavg"})
    RunConfig.from_mapping({**big, "votes-per-candidate": 16})
    with pytest.raises(ConfigError, match="votes-per-candidate: 0"):
        RunConfig.from_mapping(big)
