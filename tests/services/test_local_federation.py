"""The real curator and participants, in one process over the in-process exchange (fast, no broker).

The broker-backed equivalents, with real processes and kills, are in tests/integration/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tessera.apps.local_federation import run_local_federation
from tessera.curator import checkpoint
from tessera.curator.settings import CuratorSettings
from tessera.data import ArrayDataset, train_validation_split
from tessera.evaluation import EvalCounts
from tessera.inference import evaluate
from tessera.models import ModelSpec, build_model, load_flat_parameters
from tessera.participant.settings import ParticipantSettings
from tessera.roster import FederationParameters, RosterFile, create_demo_federation

MODEL = ModelSpec(name="mlp", kwargs={"input_dim": 6, "hidden": [8], "num_classes": 2})


def _datasets(orgs: list[str]) -> dict[str, tuple[ArrayDataset, ArrayDataset]]:
    rng = np.random.default_rng(5)
    out = {}
    for i, org in enumerate(orgs):
        n = 120 + 40 * i
        x = rng.normal(size=(n, 6)).astype(np.float32)
        y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
        out[org] = train_validation_split(ArrayDataset(x, y), 0.25, 0)
    return out


def _settings(
    tmp: Path, orgs: list[str], *, rounds: int, privacy: dict[str, Any] | None = None, **participant: Any
) -> tuple[CuratorSettings, dict[str, ParticipantSettings]]:
    fed = tmp / "fed"
    if not (fed / "roster.json").exists():
        create_demo_federation("local", orgs, fed, parameters=FederationParameters(layout={"clip": 1.0}))
    fingerprint = RosterFile.load(fed / "roster.json").fingerprint()
    curator = CuratorSettings(
        federation="local",
        roster_file=fed / "roster.json",
        state_dir=tmp / "curator",
        model=MODEL,
        num_classes=2,
        rounds={"max_rounds": rounds, "min_participants": 3, "training_timeout": 30},
        secagg={"phase_timeout": 10},
        health={"enabled": False},
    )
    plan = {"target_epsilon": 8.0, "planned_rounds": 4, "batch_size": 16, "lr": 0.3, **(privacy or {})}
    participants = {
        org: ParticipantSettings(
            federation="local",
            organisation=org,
            roster_file=fed / "roster.json",
            roster_fingerprint=fingerprint,
            identity_key_file=fed / "keys" / f"{org}.key",
            state_dir=tmp / org,
            model=participant.get("models", {}).get(org, MODEL),
            num_classes=2,
            data={"path": "unused.csv"},
            privacy=participant.get("privacies", {}).get(org, plan),
            training_seed=11,
            health={"enabled": False},
        )
        for org in orgs
    }
    return curator, participants


def _direct(weights: np.ndarray, datasets: dict, members: list[str]) -> EvalCounts:
    model = build_model(MODEL)
    load_flat_parameters(model, weights)
    total = EvalCounts.zero(2)
    for org in members:
        total = total + evaluate(model, datasets[org][1], 2)
    return total


def test_secure_averaged_metrics_equal_direct_evaluation_and_resume(tmp_path: Path) -> None:
    orgs = ["org-a", "org-b", "org-c"]
    datasets = _datasets(orgs)
    curator, participants = _settings(tmp_path, orgs, rounds=2)
    first = run_local_federation(curator, participants, datasets)
    assert first.state.rounds_completed == 2 and not first.errors
    weights_after_2 = checkpoint.load(tmp_path / "curator").weights  # type: ignore[union-attr]
    epsilons = [r.epsilon_mean for r in first.state.history]

    # Resume with a higher round limit: round 3 evaluates exactly the model saved after round 2.
    curator, participants = _settings(tmp_path, orgs, rounds=3)
    second = run_local_federation(curator, participants, datasets)
    state = second.state
    assert [r.round for r in state.history] == [1, 2, 3]
    assert state.restarts == 1
    record = state.history[-1]
    expected = _direct(weights_after_2, datasets, orgs)
    assert record.evaluation.evaluated_examples == expected.total
    assert record.accuracy == pytest.approx(expected.correct / expected.total, abs=0)
    assert np.array_equal(np.array(record.evaluation.confusion), expected.confusion)
    assert record.total_weight == sum(len(datasets[o][0]) for o in orgs)
    # Every participant's epsilon went on accumulating across the restart.
    assert epsilons[0] < epsilons[1] < record.epsilon_mean
    assert record.non_private_participants == 0


def test_budget_exhaustion_makes_participants_leave_and_training_stop(tmp_path: Path) -> None:
    orgs = ["org-a", "org-b", "org-c"]
    curator, participants = _settings(
        tmp_path, orgs, rounds=10, privacy={"target_epsilon": 2.0, "planned_rounds": 2}
    )
    result = run_local_federation(curator, participants, _datasets(orgs))
    assert result.state.rounds_completed == 2
    assert "participants left" in result.state.stop_reason
    assert set(result.participant_exits.values()) == {"budget_exhausted"}
    assert result.state.history[-1].epsilon_mean <= 2.0 + 1e-9


def test_a_participant_refusing_the_model_leaves_and_the_others_go_on(tmp_path: Path) -> None:
    orgs = ["org-a", "org-b", "org-c", "org-d"]
    other = ModelSpec(name="mlp", kwargs={"input_dim": 6, "hidden": [4], "num_classes": 2})
    curator, participants = _settings(tmp_path, orgs, rounds=2, models={"org-d": other})
    result = run_local_federation(curator, participants, _datasets(orgs))
    assert result.participant_exits["org-d"] == "model_refused"
    assert result.state.rounds_completed == 2
    assert all("org-d" not in r.participants for r in result.state.history)


def test_non_private_training_is_counted_in_the_clear_report(tmp_path: Path) -> None:
    orgs = ["org-a", "org-b", "org-c"]
    plan = {"enabled": False, "batch_size": 16, "lr": 0.3}
    curator, participants = _settings(tmp_path, orgs, rounds=1, privacies={"org-c": plan})
    result = run_local_federation(curator, participants, _datasets(orgs))
    assert result.state.history[0].non_private_participants == 1


def test_a_silent_participant_costs_the_training_timeout_once_then_only_the_rejoin_wait(
    tmp_path: Path,
) -> None:
    # org-d is in the roster but never runs (its machine died): round 1 waits the whole training timeout for
    # it, later rounds only rejoin_wait.
    orgs = ["org-a", "org-b", "org-c", "org-d"]
    curator, participants = _settings(tmp_path, orgs, rounds=3)
    rounds = {"max_rounds": 3, "min_participants": 3, "training_timeout": 6.0, "rejoin_wait": 0.5}
    curator = curator.model_copy(update={"rounds": curator.rounds.model_copy(update=rounds)})
    del participants["org-d"]
    result = run_local_federation(curator, participants, _datasets(orgs))
    history = result.state.history
    assert [list(r.participants) for r in history] == [orgs[:3]] * 3
    training = [r.seconds["training"] for r in history]
    assert training[0] >= 6.0
    assert all(seconds < 6.0 for seconds in training[1:]), training


def test_participants_train_each_round_at_the_decayed_learning_rate(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    orgs = ["org-a", "org-b", "org-c"]
    curator, participants = _settings(tmp_path, orgs, rounds=2, privacy={"lr": 0.4, "lr_decay": 0.5})
    with capture_logs() as events:
        result = run_local_federation(curator, participants, _datasets(orgs))
    assert result.state.rounds_completed == 2
    # (capture_logs drops the context variables, round among them: the rates tell the rounds apart)
    trained = sorted(e["lr"] for e in events if e["event"] == "trained")
    assert trained == [0.2] * 3 + [0.4] * 3
