"""The broker goes away and comes back while a federation trains: once between two rounds, once while a
round is in flight.

The shared broker must never be stopped, so the federation runs on a RabbitMQ node of the test's own
(``private_broker``), which the test stops (``rabbitmqctl shutdown``: the node is gone, every connection
drops, nothing answers on its port) and starts again from the same data directory. Queues are durable and
messages persistent, so what was confirmed before the stop is still there after it; the tap is durable too.

- Between rounds: the curator is told to pause before announcing round 2 (``faults.pause_before_round``);
  the broker is stopped during the pause, so the curator's announcement of round 2 waits for the broker to
  come back (its publish is retried on the new connection).
- In flight: one organisation stalls 3 s before its masked input of round 3, so round 3 is certainly in the
  masked-input phase when the broker is stopped. The phase timeout (4 s) is shorter than the outage, so the
  curator's aggregation may abort and round 3 be retried; nothing else may be.

Afterwards: every process reconnected (a second ``broker_connected``) and exited normally, every round
completed, at most round 3 took more than one aggregation, and :func:`invariants.check_federation` holds
(exact sums of the recorded inputs, fresh keys and aggregation ids, ε counted once per trained update).
"""

from __future__ import annotations

from collections import Counter

import pytest

from .invariants import check_federation

pytestmark = pytest.mark.integration

ROUNDS = 4


def connections(fed, name):
    return [e for e in fed.events(name) if e["event"] == "broker_connected"]


def test_broker_restarts_between_rounds_and_mid_round(private_broker, federation):
    fed = federation(
        organisations=3,
        broker=private_broker,
        durable_tap=True,
        curator={
            "rounds": {"max_rounds": ROUNDS, "training_timeout": 30.0, "rejoin_wait": 30.0},
            "secagg": {"phase_timeout": 4.0},
            "faults": {"pause_before_round": 2, "pause_seconds": 8.0},
        },
        participant={"faults": {"record_inputs": True}},
    )
    staller = fed.organisations[0]
    processes = fed.start(
        faults={
            staller: {
                "record_inputs": True,
                "stall_before": "masked_input",
                "stall_round": 3,
                "stall_seconds": 3.0,
            }
        },
        curator_after="broker_connected",
    )
    curator = processes["curator"]

    # --- between rounds 1 and 2 ---------------------------------------------------------------------------
    fed.wait_event(curator, "fault_injection_pause", 120.0)
    assert curator.find("round_completed", round=1) and not curator.find("round_announced", round=2)
    down = private_broker.stop()
    up = private_broker.start()
    print(f"between rounds: broker stopped in {down:.1f} s, started in {up:.1f} s")

    # --- round 3 in flight ------------------------------------------------------------------------------
    fed.wait_event(processes[staller], "fault_injection_stall", 120.0, round=3)
    assert not curator.find("round_completed", round=3)
    down = private_broker.stop()
    up = private_broker.start()
    print(f"mid-round: broker stopped in {down:.1f} s, started in {up:.1f} s")

    report = fed.finish(timeout=180.0)
    assert report["rounds_completed"] == ROUNDS
    assert report["restarts"] == 0, "the curator process itself never restarted"
    for name in ["curator", *fed.organisations]:
        assert len(connections(fed, name)) >= 3, f"{name} did not reconnect after both restarts"

    facts = check_federation(fed, report)
    per_round = Counter(header.round for header in facts["announced"])
    aggregations = {r: {h.aggregation for h in facts["announced"] if h.round == r} for r in per_round}
    assert all(len(aggregations[r]) == 1 for r in aggregations if r != 3), aggregations
    assert 1 <= len(aggregations[3]) <= 2, f"round 3 retried more than once: {aggregations[3]}"
    if len(aggregations[3]) == 2:
        assert facts["aborted"], "a second aggregation of round 3 without an abort of the first"
    assert [r["round"] for r in report["history"]] == list(range(1, ROUNDS + 1))
