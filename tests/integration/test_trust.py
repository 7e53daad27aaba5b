"""Trust that does not rest on the coordinator, over the real broker with real processes.

- A hostile curator *process* (``hostile_curator.py``: the curator's broker credentials, the roster of public
  keys, no organisation's private key) cannot swap the roster, change the layout, lower the threshold, impose
  a graph the roster does not allow, or sign an advertisement for a company: every attempt is refused and
  logged by every participant, no participant sends anything that carries a secret, and all stay up.
- A roster member that advertises a low-order key in every aggregation cannot stop the federation: the
  curator leaves it out of each aggregation, excludes it after ``rounds.max_offences`` attempts (reported),
  the honest participants stay up, and every round is exact over them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HOSTILE = Path(__file__).with_name("hostile_curator.py")
SECRET_CARRIERS = {"EncryptedShares", "MaskedInput", "UnmaskShares"}


def test_a_hostile_curator_process_is_refused_at_every_step(federation):
    fed = federation(organisations=3)
    fed.provision()
    participants = {o: fed.start_participant(o) for o in fed.organisations}
    for organisation, process in participants.items():
        fed.wait_for(f"{organisation} connected", lambda p=process: p.find("broker_connected"), 90.0)
    attacks = ["other_roster", "other_layout", "low_threshold", "sparse_graph", "forged_advertisement"]
    plan = {
        "roster_file": fed.curator_settings["roster_file"],
        "model": fed.curator_settings["model"],
        "num_classes": fed.curator_settings["num_classes"],
        "broker": fed.curator_settings["broker"],
        "attacks": attacks,
        "wait": 6.0,
    }
    (fed.root / "hostile-plan.json").write_text(json.dumps(plan))
    out = fed.root / "hostile-observed.json"
    run = subprocess.run(
        [sys.executable, str(HOSTILE), str(fed.root / "hostile-plan.json"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    observed = json.loads(out.read_text())["observed"]
    everyone = fed.organisations

    # Announcements under another roster or with another layout: nobody even reports ready.
    assert observed["other_roster"] == {o: [] for o in everyone}
    assert observed["other_layout"] == {o: [] for o in everyone}
    # Proper announcements get Ready; the weakened aggregations get nothing back; the forged advertisement
    # gets no shares.
    for attack in ("low_threshold", "sparse_graph", "forged_advertisement"):
        assert observed[f"{attack}:ready"] == {o: ["Ready"] for o in everyone}, attack
        assert observed[attack] == {o: [] for o in everyone}, (attack, observed[attack])
    assert observed["forged_advertisement:advertise"] == {o: ["AdvertiseKeys"] for o in everyone}

    # Nothing that carries a secret ever left a participant (the tap sees every message on the broker).
    sent = [m for m in fed.drain_tap() if m.routing_key.startswith("from.") and m.message_type == "secagg"]
    from tessera import protocol
    from tessera.secagg.wire import WireLimits, decode

    limits = WireLimits(max_participants=3, vector_length=10**6, ring_bits=32)
    leaked = []
    for message in sent:
        _, payload = protocol.decode(message.body, max_payload=1 << 26)
        kind = type(decode(payload, limits)).__name__
        if kind in SECRET_CARRIERS:
            leaked.append((message.user_id, kind))
    assert leaked == []

    # Every refusal is logged, with its reason, by every participant, and every participant is still up.
    reasons = {
        "other_roster": "round announced under roster",
        "other_layout": "differs from the roster's",
        "low_threshold": "below the federation's",
        "sparse_graph": "the federation uses the full graph",
        "forged_advertisement": "bad signature",
    }
    for organisation, process in participants.items():
        rejected = [e["reason"] for e in process.events() if e["event"] == "message_rejected"]
        for attack, reason in reasons.items():
            assert any(reason in r for r in rejected), (organisation, attack, rejected)
        assert process.returncode is None, f"{organisation} exited"
    fed.check_alive()


def test_an_insider_with_a_low_order_key_is_excluded_and_the_others_finish(federation):
    rounds = 3
    fed = federation(
        organisations=4,
        curator={"rounds": {"max_rounds": rounds, "min_participants": 3, "max_offences": 2}},
    )
    insider, *honest = fed.organisations
    processes = fed.start(faults={insider: {"advertise_low_order_key": True}})
    report = fed.finish(timeout=300.0)

    assert report["rounds_completed"] == rounds
    assert set(report["excluded"]) == {insider}
    assert "low-order" in report["excluded"][insider]
    weights = fed.announced_weights()
    for record in report["history"]:
        assert insider not in record["participants"]
        assert record["phases"]["advertise"] == sorted(honest)
        fed.check_round(record, weights[record["round"]], honest)
    # Invited to the first two aggregations, left out of each, then no longer invited.
    assert [insider in r["invited"] for r in report["history"]] == [True, True, False]
    curator_events = processes["curator"].events()
    assert [e["organisation"] for e in curator_events if e["event"] == "participant_excluded"] == [insider]
    for organisation in honest:
        events = processes[organisation].events()
        assert not [e for e in events if e["event"] in ("message_handling_failed", "message_rejected")]
        assert processes[organisation].returncode == 0
