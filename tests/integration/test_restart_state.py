"""What a service must remember across a restart, shown on real processes.

- The participant's replay guard (``replay-guard.json`` in its state directory): a participant killed in
  round 2 and restarted refuses a replay of the round-2 announcement it had already acted on (same
  aggregation id) and of round 1's, instead of training again on them and spending privacy.
- The curator's unresponsive set (saved with its checkpoint): a participant killed in round 1 is still
  unresponsive for a curator restarted before round 2, so round 2 waits only ``rejoin_wait`` for it, not the
  whole training timeout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tessera import protocol
from tessera.transport import topology as topo

from .invariants import check_federation, curator_checkpoint

pytestmark = pytest.mark.integration


def announcement_body(fed, round_number):
    for message in fed.drain_tap():
        if message.routing_key != topo.BROADCAST_KEY:
            continue
        header, _ = protocol.decode(message.body, max_payload=1 << 26)
        if isinstance(header, protocol.RoundAnnouncement) and header.round == round_number:
            return header.aggregation, message.body
    raise AssertionError(f"the tap saw no announcement of round {round_number}")


def test_restarted_participant_refuses_replayed_announcements(federation):
    fed = federation(
        organisations=4,
        curator={
            # Round 3 waits for the restarted victim (its start-up takes a while on a busy machine).
            "rounds": {
                "max_rounds": 3,
                "min_participants": 3,
                "training_timeout": 120.0,
                "rejoin_wait": 120.0,
            },
            "secagg": {"phase_timeout": 4.0},
        },
        roster={"threshold_fraction": 0.6},
        participant={"faults": {"record_inputs": True}},
    )
    victim = fed.organisations[0]
    processes = fed.start(
        faults={victim: {"record_inputs": True, "stall_before": "masked_input", "stall_round": 2}},
        curator_after="broker_connected",
    )
    fed.wait_event(processes[victim], "fault_injection_stall", 120.0, round=2)
    processes[victim].kill()
    guard = json.loads(
        (Path(fed.participant_settings[victim]["state_dir"]) / "replay-guard.json").read_text()
    )
    aggregation_2, round_2 = announcement_body(fed, 2)
    _, round_1 = announcement_body(fed, 1)
    assert guard["round"] == 2 and guard["aggregations"] == [aggregation_2]
    trained_before = [e["round"] for e in processes[victim].events() if e["event"] == "trained"]
    assert trained_before == [1, 2]

    # The replays go into the dead victim's inbox at once, while round 2 is still in flight: they are read
    # after the redelivered message it was handling when killed and before round 3's announcement, so its
    # guard still stands at round 2 (after round 3's, the round-2 replay would merely be stale).
    assert not processes["curator"].find("round_announced", round=3)
    for body in (round_2, round_1):
        fed.publish(
            fed.curator_user, topo.TO_PARTICIPANTS_EXCHANGE, f"to.{victim}", body, message_type="round"
        )
    restarted = fed.start_participant(victim)  # same state directory, no fault injection

    def refusals():
        # (Its inbox also redelivers the round-2 message it was handling when killed: rejected, no round.)
        found = [
            e
            for e in restarted.events()
            if e["event"] == "message_rejected"
            and e.get("logger") == "tessera.participant"
            and " announcement of " in e.get("reason", "")
        ]
        return found if len(found) >= 2 else None

    refused = fed.wait_for("the restarted victim to refuse both replays", refusals, 120.0)
    assert f"repeated announcement of aggregation {aggregation_2}" in refused[0]["reason"]
    assert "stale announcement of round 1 during round 2" in refused[1]["reason"]
    assert not restarted.find("trained", round=2) and not restarted.find("ready", round=2)

    report = fed.finish(timeout=150.0)
    assert report["rounds_completed"] == 3
    history = report["history"]
    assert victim not in history[1]["participants"], "it died before its round-2 masked input"
    assert victim in history[2]["participants"], "and is back for round 3"
    assert [e["round"] for e in restarted.events() if e["event"] == "trained"] == [3]
    assert fed.accountant(victim)["rounds_done"] == 3, "the replays were not paid for"
    check_federation(fed, report)


def test_restarted_curator_waits_only_rejoin_wait_for_a_participant_dead_before_it(federation):
    training_timeout, rejoin_wait = 60.0, 4.0
    fed = federation(
        organisations=4,
        curator={
            "rounds": {
                "max_rounds": 2,
                "min_participants": 3,
                "training_timeout": training_timeout,
                "rejoin_wait": rejoin_wait,
            },
            "secagg": {"phase_timeout": 4.0},
            "faults": {"pause_before_round": 2, "pause_seconds": 3600.0},
        },
        roster={"threshold_fraction": 0.6},
        participant={"faults": {"record_inputs": True}},
    )
    dead = fed.organisations[0]
    processes = fed.start(
        faults={dead: {"record_inputs": True, "stall_before": "masked_input", "stall_round": 1}},
        curator_after="broker_connected",
    )
    fed.wait_event(processes[dead], "fault_injection_stall", 120.0, round=1)
    processes[dead].kill()
    first = processes["curator"]
    fed.wait_event(first, "fault_injection_pause", 60.0)  # round 1 completed and saved without it
    first.kill()
    saved = curator_checkpoint(fed)
    assert saved.rounds_completed == 1 and saved.unresponsive == (dead,)

    fed.curator_settings["faults"] = {}  # the restarted curator does not pause
    second = fed.start_curator()
    report = fed.finish(timeout=150.0)
    assert report["restarts"] == 1 and report["rounds_completed"] == 2
    resumed = second.find("round_announced", round=2)
    assert resumed is not None and second.find("round_goes_on_without", organisations=[dead])
    training = report["history"][1]["seconds"]["training"]
    assert rejoin_wait - 0.5 <= training < training_timeout / 3, (
        f"round 2 after the restart waited {training} s for the dead participant; rejoin_wait is "
        f"{rejoin_wait} s, the training timeout {training_timeout} s"
    )
    assert report["history"][1]["participants"] == sorted(fed.organisations[1:])
    check_federation(fed, report)
