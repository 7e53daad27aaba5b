"""Crashes of the curator and of a participant, with restarts from the same state directory.

To crash a process at a known point rather than at a random moment, one participant is told to stall before
its masked input in round 2 (``TESSERA_FAULTS__*``): while it stalls, round 2 is certainly in flight (the
curator waits in the masked-input phase of its aggregation) and that participant has already trained round 2.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_curator_killed_mid_round_resumes_from_last_completed_round(federation):
    rounds = 3
    fed = federation(
        organisations=3,
        curator={"rounds": {"max_rounds": rounds}, "secagg": {"phase_timeout": 8.0}},
    )
    staller = fed.organisations[0]
    # Stalls 4 s (less than the phase timeout) before its round-2 masked input, in every attempt of round 2.
    processes = fed.start(
        faults={staller: {"stall_before": "masked_input", "stall_round": 2, "stall_seconds": 4.0}}
    )
    first = processes["curator"]

    fed.wait_event(processes[staller], "fault_injection_stall", 90.0, round=2)
    first.kill()
    before = fed.report()
    assert before is not None and before["rounds_completed"] == 1 and before["status"] == "running"
    assert first.find("round_announced", round=2) and not first.find("round_completed", round=2)
    interrupted = first.find("round_announced", round=2)["aggregation"]

    second = fed.start_curator()  # same settings, same state directory
    report = fed.finish()

    resumed = fed.wait_event(second, "federation_resumed", 1.0)
    assert resumed["rounds_completed"] == 1
    announced = [e for e in second.events() if e["event"] == "round_announced"]
    assert announced[0]["round"] == 2, "the round in flight is announced again, nothing earlier"
    assert interrupted not in {e["aggregation"] for e in announced}, "never the interrupted aggregation id"
    assert [e["round"] for e in second.events() if e["event"] == "round_completed"] == list(
        range(2, rounds + 1)
    )

    assert report["restarts"] == 1
    assert report["rounds_completed"] == rounds
    history = report["history"]
    assert [r["round"] for r in history] == list(range(1, rounds + 1)), "no gaps, no repeats"
    assert history[0] == before["history"][0], "the round completed before the crash is kept as it was"
    weights = fed.announced_weights()
    assert sorted(weights) == list(range(1, rounds + 1))
    for record in history:
        fed.check_round(record, weights[record["round"]], fed.organisations)

    # Nobody revealed anything for the interrupted aggregation, so every participant reused its round-2
    # update for the re-announced round instead of training (and spending privacy) again.
    for organisation in fed.organisations:
        events = processes[organisation].events()
        assert [e["round"] for e in events if e["event"] == "trained"] == list(range(1, rounds + 1))
        assert any(e["event"] == "update_reused" and e["round"] == 2 for e in events), organisation
        assert fed.accountant(organisation)["rounds_done"] == rounds


def test_participant_restarted_continues_its_privacy_accountant(federation):
    rounds = 3
    fed = federation(
        organisations=4,
        curator={
            # Round 3 must wait for the restarted victim (a new process: imports, data, training), however
            # loaded the machine; a round starts as soon as everyone is ready, so this costs nothing otherwise.
            "rounds": {"max_rounds": rounds, "min_participants": 3, "training_timeout": 90.0},
            # Four invited, threshold 3: round 2 completes without the killed participant.
            "secagg": {"phase_timeout": 5.0},
        },
        roster={"threshold_fraction": 0.6},
    )
    victim, *others = fed.organisations
    processes = fed.start(faults={victim: {"stall_before": "masked_input", "stall_round": 2}})

    fed.wait_event(processes[victim], "fault_injection_stall", 90.0, round=2)
    # It has trained round 2: the accountant was saved before training (write-ahead).
    trained = [e for e in processes[victim].events() if e["event"] == "trained"]
    assert [e["round"] for e in trained] == [1, 2]
    stored = fed.accountant(victim)
    assert stored["rounds_done"] == 2
    epsilon_before = fed.accountant_epsilon(victim)
    assert epsilon_before == pytest.approx(trained[-1]["epsilon"], abs=1e-4)
    processes[victim].kill()

    restarted = fed.start_participant(victim)  # same settings and state directory, no fault injection
    plan = fed.wait_event(restarted, "privacy_plan", 60.0)
    assert plan["rounds_done"] == 2
    assert plan["epsilon_spent"] == pytest.approx(epsilon_before, abs=1e-4), "epsilon must not reset"
    report = fed.finish()

    history = report["history"]
    assert [r["round"] for r in history] == list(range(1, rounds + 1))
    weights = fed.announced_weights()
    fed.check_round(history[0], weights[1], fed.organisations)
    fed.check_round(history[1], weights[2], others)  # the victim died before its masked input
    fed.check_round(history[2], weights[3], fed.organisations)  # and is back for round 3

    after = [e for e in restarted.events() if e["event"] == "trained"]
    assert [e["round"] for e in after] == [3]
    final = fed.accountant(victim)
    assert final["rounds_done"] == 3
    epsilon_after = fed.accountant_epsilon(victim)
    assert epsilon_after == pytest.approx(after[0]["epsilon"], abs=1e-4)
    assert epsilon_after > epsilon_before > trained[0]["epsilon"] > 0
    # A reset accountant would report round-1 epsilon for the victim's third round; the securely summed mean
    # of round 3 holds the victim's three-round epsilon.
    spent_round_3 = [after[0]["epsilon"]]
    for organisation in others:
        events = processes[organisation].events()
        spent_round_3 += [e["epsilon"] for e in events if e["event"] == "trained" and e["round"] == 3]
    assert history[2]["epsilon_mean"] == pytest.approx(sum(spent_round_3) / len(spent_round_3), abs=2e-4)
    assert after[0]["epsilon"] != pytest.approx(trained[0]["epsilon"], abs=1e-3)
