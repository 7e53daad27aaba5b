"""A federation of real processes over the real broker runs several rounds, and every number the curator
records through secure aggregation is exactly what a direct computation over the organisations' data gives.

How the expected values are obtained: the test's tap queue (see ``conftest.py``) receives a copy of every
round announcement, so the test knows the global model each round evaluated (round 1: the initial model,
which the test also rebuilds from the seed; round r > 1: the model after round r-1). It evaluates that model
itself on each organisation's validation split, loaded with ``load_local_data`` from the same CSV file,
encoding and split seed the participant uses, with the participant's own ``evaluate``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.integration

ROUNDS = 3


def test_rounds_complete_and_secure_averages_are_exact(federation):
    fed = federation(organisations=4, curator={"rounds": {"max_rounds": ROUNDS, "min_participants": 4}})
    processes = fed.start()
    report = fed.finish()

    history = report["history"]
    assert report["stop_reason"] == f"round limit {ROUNDS} reached"
    assert report["rounds_completed"] == ROUNDS
    assert report["restarts"] == 0
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    assert [r["attempt"] for r in history] == [0] * ROUNDS

    weights = fed.announced_weights()
    assert sorted(weights) == list(range(1, ROUNDS + 1)), "every round is announced exactly for its number"
    assert np.array_equal(weights[1], fed.initial_weights()), "round 1 evaluates the seeded initial model"
    for r in range(1, ROUNDS):
        assert not np.array_equal(weights[r], weights[r + 1]), f"round {r} did not change the model"

    everyone = sorted(fed.organisations)
    for record in history:
        assert record["invited"] == everyone
        assert record["left"] == []
        assert set(record["phases"]) == {"advertise", "share", "masked_input", "consistency", "unmask"}
        assert all(answered == everyone for answered in record["phases"].values()), record["phases"]
        fed.check_round(record, weights[record["round"]], everyone)

    # Each participant trained once per round; the securely summed epsilon is the mean of what they spent.
    spent: dict[int, list[float]] = {}
    for organisation in fed.organisations:
        trained = [e for e in processes[organisation].events() if e["event"] == "trained"]
        assert [e["round"] for e in trained] == list(range(1, ROUNDS + 1)), organisation
        for e in trained:
            spent.setdefault(e["round"], []).append(e["epsilon"])
        accountant = fed.accountant(organisation)
        assert accountant["rounds_done"] == ROUNDS
        assert fed.accountant_epsilon(organisation) == pytest.approx(trained[-1]["epsilon"], abs=1e-4)
    for record in history:
        # Each epsilon travels in ten-thousandths; the log shows it rounded to four decimals.
        assert record["epsilon_mean"] == pytest.approx(np.mean(spent[record["round"]]), abs=2e-4)
    assert spent[1][0] < spent[2][0] < spent[3][0], "epsilon accumulates over rounds"

    # The curator logged one completed round per round, and nothing was rejected in a clean run.
    curator = processes["curator"].events()
    assert [e["round"] for e in curator if e["event"] == "round_completed"] == list(range(1, ROUNDS + 1))
    for name in ["curator", *fed.organisations]:
        assert not [e for e in fed.events(name) if e["event"] == "message_rejected"], name
