"""Distributed DP-SGD over the real broker with real processes, and the same federation in one process:
for the same seeds both produce the same model, bit for bit.

Seeds fix everything random in the distributed mode: each participant's sampling and noise (its CSPRNG is
keyed from ``training_seed``), the curator's initial model (``rounds.seed``); the secure sum is exact and
order-independent, and the curator's optimiser is deterministic. So the transport is the only difference,
and it must make none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

ROUNDS = 6
ROSTER = {
    "layout": {"ring_bits": 64},
    "privacy": {"mode": "distributed", "noise_multiplier": 0.8, "clip_norm": 1.0},
}


def test_over_the_broker_and_in_process_give_the_same_model(federation, tmp_path: Path) -> None:
    fed = federation(
        organisations=3,
        roster=ROSTER,
        curator={
            "rounds": {"max_rounds": ROUNDS},
            "server": {"lr": 0.5, "momentum": 0.9, "evaluate_every": 3},
        },
        participant={"privacy": {"batch_size": 20, "planned_rounds": ROUNDS}},
    )
    for index, organisation in enumerate(fed.organisations):
        fed.participant_settings[organisation]["training_seed"] = 100 + index
    fed.start()
    report = fed.finish(timeout=300.0)
    assert report["rounds_completed"] == ROUNDS
    assert [r["round"] for r in report["history"] if r["evaluated_examples"]] == [1, 3, 6]

    from tessera.apps.local_federation import run_local_federation
    from tessera.curator import checkpoint
    from tessera.curator.settings import CuratorSettings
    from tessera.participant.settings import ParticipantSettings

    over_broker = checkpoint.load(Path(fed.curator_settings["state_dir"]))
    assert over_broker is not None
    local = tmp_path / "in-process"
    curator = CuratorSettings(
        **{**fed.curator_settings, "state_dir": str(local / "curator"), "health": {"enabled": False}}
    )
    participants = {
        o: ParticipantSettings(**{**s, "state_dir": str(local / o), "health": {"enabled": False}})
        for o, s in fed.participant_settings.items()
    }
    result = run_local_federation(curator, participants, {o: fed.local_data(o) for o in fed.organisations})
    assert not result.errors and result.state.rounds_completed == ROUNDS
    assert np.array_equal(result.state.weights, over_broker.weights)
    assert np.array_equal(result.state.momentum, over_broker.momentum)
    # The same privacy spent, and the same secure-averaged evaluations.
    assert [r.epsilon_mean for r in result.state.history] == [r.epsilon_mean for r in over_broker.history]
    assert [r.evaluation for r in result.state.history] == [r.evaluation for r in over_broker.history]
