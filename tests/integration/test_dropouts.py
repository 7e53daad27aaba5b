"""Participants SIGKILLed in the middle of secure aggregation.

A participant configured with ``TESSERA_FAULTS__STALL_BEFORE=<phase>`` hangs just before it would send that
phase's message and logs ``fault_injection_stall``; the test then SIGKILLs its process group, so the kill
lands at exactly that point of the protocol. The expected aggregate is computed directly (see
``test_rounds.py``) over the organisations whose masked input is in the sum: one killed before its masked
input is not among them, one killed before unmasking is (the survivors reconstruct its self mask).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

STALL_MASKED = {"stall_before": "masked_input", "stall_round": 1}
STALL_UNMASK = {"stall_before": "unmask", "stall_round": 1}


def test_round_completes_without_participants_killed_before_masked_input_and_before_unmask(federation):
    # Five organisations, threshold ceil(0.6 * 5) = 3: one dropout before the masked input and one before
    # unmasking leave three unmask answers, enough to finish.
    fed = federation(
        organisations=5,
        curator={
            "rounds": {"max_rounds": 1, "min_participants": 3},
            "secagg": {"phase_timeout": 5.0},
        },
        roster={"threshold_fraction": 0.6},
    )
    before_masked, before_unmask, *rest = fed.organisations
    processes = fed.start(faults={before_masked: STALL_MASKED, before_unmask: STALL_UNMASK})

    fed.wait_event(processes[before_masked], "fault_injection_stall", 90.0, before="masked_input")
    processes[before_masked].kill()
    fed.wait_event(processes[before_unmask], "fault_injection_stall", 60.0, before="unmask")
    processes[before_unmask].kill()
    report = fed.finish()

    assert report["rounds_completed"] == 1
    (record,) = report["history"]
    everyone = sorted(fed.organisations)
    summed = sorted([before_unmask, *rest])  # masked inputs in the sum: all but the one killed before it
    assert record["attempt"] == 0
    assert record["invited"] == everyone
    assert record["phases"]["advertise"] == everyone
    assert record["phases"]["share"] == everyone
    assert record["phases"]["masked_input"] == summed
    assert record["phases"]["consistency"] == summed
    assert record["phases"]["unmask"] == sorted(rest)
    weights = fed.announced_weights()
    fed.check_round(record, weights[1], summed)
    completed = [e for e in processes["curator"].events() if e["event"] == "round_completed"]
    assert [e["participants"] for e in completed] == [len(summed)]


def test_round_below_threshold_aborts_and_is_retried_with_fresh_keys(federation):
    # Five organisations, threshold ceil(0.8 * 5) = 4. One is killed before its masked input, one before
    # unmasking: four masked inputs are in, but only three unmask answers come -- below the threshold, so
    # the aggregation must abort and no sum may be recorded. The retry (new aggregation id, fresh keys) runs
    # with the three left (threshold ceil(0.8 * 3) = 3); they revealed unmask shares in the failed attempt,
    # so they must train again instead of reusing their vectors.
    fed = federation(
        organisations=5,
        curator={
            # Attempt 0 must invite all five, however slowly a loaded machine trains: a long training
            # deadline. The retry waits only rejoin_wait for the two dead ones (they missed the attempt).
            "rounds": {
                "max_rounds": 1,
                "min_participants": 3,
                "training_timeout": 90.0,
                "rejoin_wait": 8.0,
            },
            "secagg": {"phase_timeout": 5.0},
        },
        roster={"threshold_fraction": 0.8},
    )
    before_masked, before_unmask, *rest = fed.organisations
    processes = fed.start(
        faults={before_masked: STALL_MASKED, before_unmask: STALL_UNMASK}, curator_after="broker_connected"
    )

    fed.wait_event(processes[before_masked], "fault_injection_stall", 90.0, before="masked_input")
    processes[before_masked].kill()
    fed.wait_event(processes[before_unmask], "fault_injection_stall", 60.0, before="unmask")
    processes[before_unmask].kill()
    report = fed.finish()

    curator = processes["curator"].events()
    announced = [e for e in curator if e["event"] == "round_announced"]
    assert [(e["round"], e["attempt"]) for e in announced] == [(1, 0), (1, 1)]
    assert announced[0]["aggregation"] != announced[1]["aggregation"], "a retry must use a new aggregation id"
    aborted = [e for e in curator if e["event"] == "aggregation_aborted"]
    assert len(aborted) == 1 and aborted[0]["aggregation"] == announced[0]["aggregation"]
    failed = [e for e in curator if e["event"] == "round_attempt_failed"]
    assert [(e["round"], e["attempt"]) for e in failed] == [(1, 0)]
    completed = [e for e in curator if e["event"] == "round_completed"]
    assert [(e["aggregation"], e["participants"]) for e in completed] == [(announced[1]["aggregation"], 3)]

    # Exactly one record, from the retry, with the exact aggregate over the three that finished it.
    assert report["rounds_completed"] == 1
    (record,) = report["history"]
    assert record["attempt"] == 1
    assert record["invited"] == sorted(rest)
    assert all(answered == sorted(rest) for answered in record["phases"].values()), record["phases"]
    weights = fed.announced_weights()
    fed.check_round(record, weights[1], rest)

    for organisation in rest:
        trained = [e for e in processes[organisation].events() if e["event"] == "trained"]
        assert [e["round"] for e in trained] == [1, 1], f"{organisation} must retrain after revealing"
        assert not processes[organisation].find("update_reused")
        assert fed.accountant(organisation)["rounds_done"] == 2
