"""Organisations that are slow, that stall, or whose connection the broker cuts, in one federation of five.

- ``slow`` sleeps after training in every round (``faults.slow_seconds``), about ten times as long as the
  others take to become ready on a quiet machine (measured and printed); the training deadline is long
  enough for it, so every round waits for it and includes it.
- ``staller`` hangs 8 s before sending its shares in round 2, twice the phase timeout: round 2 goes on
  without it (it is not among the share senders, so it is not in the sum); then it comes back, its late
  shares are refused, and it is in round 3 again.
- ``cut``: while round 2 is in flight, the broker closes its connection (``rabbitmqctl close_connection``, on
  the shared broker, only for this test's own user); it reconnects and is in the later rounds.

Every round completes at its first attempt, and :func:`invariants.check_federation` holds.
"""

from __future__ import annotations

import statistics
import subprocess
from datetime import datetime

import pytest

from .invariants import check_federation

pytestmark = pytest.mark.integration

ROUNDS = 3
SLOW_SECONDS = 12.0
PHASE_TIMEOUT = 4.0


def close_connections(user: str, reason: str, node: str | None = None) -> int:
    """Have the broker close every connection of ``user`` (a user of this test only); returns how many."""
    base = ["rabbitmqctl", "-q", *(["-n", node] if node else [])]
    listing = subprocess.run(
        [*base, "list_connections", "pid", "user"], capture_output=True, text=True, timeout=60, check=True
    )
    pids = [
        line.split("\t")[0]
        for line in listing.stdout.splitlines()
        if line.count("\t") == 1 and line.split("\t")[1] == user
    ]
    for pid in pids:
        subprocess.run([*base, "close_connection", pid, reason], capture_output=True, timeout=60, check=True)
    return len(pids)


def seconds_between(earlier: dict, later: dict) -> float:
    parse = datetime.fromisoformat
    return (
        parse(later["timestamp"].replace("Z", "+00:00")) - parse(earlier["timestamp"].replace("Z", "+00:00"))
    ).total_seconds()


def test_slow_stalled_and_cut_off_organisations(federation):
    fed = federation(
        organisations=5,
        curator={
            "rounds": {
                "max_rounds": ROUNDS,
                "min_participants": 3,
                "training_timeout": 40.0,
                "rejoin_wait": 40.0,
            },
            "secagg": {"phase_timeout": PHASE_TIMEOUT},
        },
        roster={"threshold_fraction": 0.6},
        participant={"faults": {"record_inputs": True}},
    )
    slow, staller, cut, *steady = fed.organisations
    processes = fed.start(
        faults={
            slow: {"record_inputs": True, "slow_seconds": SLOW_SECONDS},
            staller: {
                "record_inputs": True,
                "stall_before": "shares",
                "stall_round": 2,
                "stall_seconds": 2 * PHASE_TIMEOUT,
            },
        },
        curator_after="broker_connected",
    )
    curator = processes["curator"]
    fed.wait_event(processes[staller], "fault_injection_stall", 120.0, round=2)
    assert close_connections(cut, "tessera integration test: cut this organisation off") >= 1

    report = fed.finish(timeout=240.0)
    history = report["history"]
    assert [(r["round"], r["attempt"]) for r in history] == [(r, 0) for r in range(1, ROUNDS + 1)]
    everyone = sorted(fed.organisations)
    assert history[0]["participants"] == everyone
    second = history[1]
    assert staller not in second["participants"] and staller not in second["phases"]["share"]
    assert slow in second["participants"]
    assert second["seconds"]["share"] >= PHASE_TIMEOUT - 0.5, "round 2 waited the phase timeout for it"
    for record in history[2:]:
        assert record["participants"] == everyone, f"round {record['round']}: not everybody is back"
    assert [e for e in fed.events(cut) if e["event"] == "broker_connection_lost"], "the cut did not land"
    assert len([e for e in fed.events(cut) if e["event"] == "broker_connected"]) >= 2

    # How much slower `slow` is: from each announcement to its ready report, against the others' median.
    announced = {e["round"]: e for e in curator.events() if e["event"] == "round_announced"}
    ready = {
        (e["organisation"], e["round"]): e for e in curator.events() if e["event"] == "participant_ready"
    }
    ratios = []
    for r in range(1, ROUNDS + 1):
        others = [seconds_between(announced[r], ready[(o, r)]) for o in steady if (o, r) in ready]
        mine = seconds_between(announced[r], ready[(slow, r)])
        ratios.append(mine / max(statistics.median(others), 1e-3))
        assert mine >= SLOW_SECONDS, f"round {r}: the slow organisation was ready after {mine} s"
    # About 10x on a quiet machine (the steady ones are ready in about a second); on a busy one the steady
    # ones slow down and the ratio drops (2.5-6x at load average 90), so it is printed, not asserted.
    print(f"slow organisation / median of the steady ones, time to ready per round: {ratios}")
    check_federation(fed, report)
