"""Garbage, oversized, replayed, foreign and wrongly-addressed messages on the real broker.

They are published with pika directly, as a hostile or broken client would: into the curator's queue with an
organisation's own credentials and ``user_id`` (the only way in: the broker refuses everything else, which
the test checks too), and into a participant's inbox with the curator's credentials (only the curator may
write there). Replays are real messages of an earlier round captured by the test's tap.

Each message the broker lets through must be logged as ``message_rejected`` (or, for a stale message while
the curator collects ready reports, ``message_dropped``) with a reason, and dropped; no process may crash,
and every round must complete with all organisations, at the first attempt, with the exact result.
"""

from __future__ import annotations

import os

import pika.exceptions
import pytest
from tessera import protocol
from tessera.secagg.messages import MaskedInput, StartAggregation
from tessera.secagg.wire import WireLimits
from tessera.secagg.wire import decode as decode_secagg
from tessera.transport import topology as topo

pytestmark = pytest.mark.integration

HUGE = 4 * 1024 * 1024
OTHER_FEDERATION = "not-this-federation"


def rejections(events, logger, sender=None):
    return [
        e
        for e in events
        if e["event"] in ("message_rejected", "message_dropped")
        and e.get("logger") == logger
        and (sender is None or e.get("sender") == sender)
    ]


def refused(fed, user, exchange, routing_key, body, **kwargs):
    """The broker's reply code when it refuses the publish (it must refuse it)."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        fed.publish(user, exchange, routing_key, body, **kwargs)
    return info.value.reply_code


def test_hostile_messages_are_rejected_and_rounds_complete_exactly(federation):
    rounds = 4  # round 4 is there so the replays sent during round 3 are read even if round 3 is quick
    fed = federation(
        organisations=3,
        curator={"rounds": {"max_rounds": rounds}, "secagg": {"phase_timeout": 8.0}},
    )
    staller, sender, target = fed.organisations
    # The staller holds round 2 in the masked-input phase for 4 s: the injections below land mid-aggregation.
    processes = fed.start(
        faults={staller: {"stall_before": "masked_input", "stall_round": 2, "stall_seconds": 4.0}}
    )
    curator = processes["curator"]
    fed.wait_event(processes[staller], "fault_injection_stall", 90.0, round=2)

    # --- real messages of round 1 (and of the current aggregation), captured by the tap ----------------------
    layout = fed.report()["layout"]
    limits = WireLimits(
        max_participants=len(fed.organisations),
        vector_length=layout["vector_length"],
        ring_bits=layout["ring_bits"],
    )

    def secagg(routing_keys, kind, round_number):
        for message in fed.drain_tap():
            if message.routing_key not in routing_keys:
                continue
            header, payload = protocol.decode(message.body, max_payload=1 << 26)
            if isinstance(header, protocol.SecAgg):
                decoded = decode_secagg(payload, limits)
                if isinstance(decoded, kind) and decoded.ids.round == round_number:
                    return message.body
        raise AssertionError(f"the tap saw no {kind.__name__} of round {round_number} on {routing_keys}")

    def federation_message(routing_key, kind, round_number):
        for message in fed.drain_tap():
            if message.routing_key != routing_key:
                continue
            header, _ = protocol.decode(message.body, max_payload=1 << 26)
            if isinstance(header, kind) and header.round == round_number:
                return message.body
        raise AssertionError(f"the tap saw no {kind.__name__} of round {round_number} on {routing_key}")

    ready_round_1 = federation_message(f"from.{sender}", protocol.Ready, 1)
    masked_round_1 = secagg({f"from.{sender}"}, MaskedInput, 1)
    announcement_round_1 = federation_message("to.all", protocol.RoundAnnouncement, 1)
    announcement_round_2 = federation_message("to.all", protocol.RoundAnnouncement, 2)
    # A start goes to all the ready participants in one publish (to.selected, BCC), to one with its own key.
    start_round_1_for_sender = secagg({f"to.{sender}", topo.SELECTED_KEY}, StartAggregation, 1)
    start_round_2_for_target = secagg({f"to.{target}", topo.SELECTED_KEY}, StartAggregation, 2)

    # --- into the curator's queue, as an organisation ---------------------------------------------------------
    to_curator = [
        ("random bytes", os.urandom(512), "bad magic"),
        (
            "another federation",
            protocol.encode(
                protocol.Ready(federation=OTHER_FEDERATION, round=2, attempt=0, aggregation="r2a0-0000")
            ),
            "another federation",
        ),
        (
            "oversized",
            protocol.encode(protocol.SecAgg(federation=fed.federation), os.urandom(HUGE)),
            "exceeds",
        ),
        ("truncated", ready_round_1[:7], "too short"),
        ("replayed ready of round 1", ready_round_1, "stale"),  # acked and dropped, as in any phase
        ("replayed masked input of round 1", masked_round_1, "message is for"),
    ]
    for _, body, _ in to_curator:
        fed.publish(sender, topo.TO_CURATOR_EXCHANGE, f"from.{sender}", body)

    # Whatever the broker refuses never reaches anyone: another organisation's routing key, another user_id,
    # the default exchange (straight into a queue), the curator's exchange towards participants.
    assert refused(fed, sender, topo.TO_CURATOR_EXCHANGE, f"from.{target}", ready_round_1) == 403
    assert (
        refused(fed, sender, topo.TO_CURATOR_EXCHANGE, f"from.{sender}", ready_round_1, user_id=target) == 406
    )
    assert refused(fed, sender, "", topo.CURATOR_INBOX, ready_round_1) == 403
    assert refused(fed, sender, topo.TO_PARTICIPANTS_EXCHANGE, f"to.{target}", announcement_round_1) == 403
    assert refused(fed, target, "", topo.participant_inbox(target), announcement_round_1) == 403

    # --- into a participant's inbox, as the curator -----------------------------------------------------------
    to_participant = [
        ("random bytes", os.urandom(512), "bad magic"),
        (
            "finished, for another federation",
            protocol.encode(
                protocol.Finished(federation=OTHER_FEDERATION, rounds_completed=9, reason="go home")
            ),
            "another federation",
        ),
        (
            "oversized",
            protocol.encode(protocol.SecAgg(federation=fed.federation), os.urandom(HUGE)),
            "exceeds",
        ),
        ("replayed announcement of round 1", announcement_round_1, "stale announcement of round 1"),
        ("replayed announcement of the current round", announcement_round_2, "repeated announcement"),
        ("another organisation's message of round 1", start_round_1_for_sender, "does not match"),
        ("replayed start of the current aggregation", start_round_2_for_target, "duplicate start"),
    ]
    for _, body, _ in to_participant:
        fed.publish(fed.curator_user, topo.TO_PARTICIPANTS_EXCHANGE, f"to.{target}", body)

    def all_seen():
        at_curator = rejections(curator.events(), "tessera.curator", sender)
        at_target = rejections(processes[target].events(), "tessera.participant")
        return len(at_curator) >= len(to_curator) and len(at_target) >= len(to_participant)

    fed.wait_for("every injected message to be rejected", all_seen, 30.0)
    for name, process, injected in (
        ("curator", curator, to_curator),
        (target, processes[target], to_participant),
    ):
        logger = "tessera.curator" if name == "curator" else "tessera.participant"
        logged = rejections(process.events(), logger, sender if name == "curator" else None)
        assert len(logged) == len(injected), (name, [e["reason"] for e in logged])
        for (what, _, reason), event in zip(injected, logged, strict=True):
            expected = "message_dropped" if reason == "stale" else "message_rejected"
            assert event["event"] == expected, (name, what, event)
            assert reason in event["reason"], (name, what, event["reason"])

    # --- round 3: a replay while the curator collects ready reports -----------------------------------------
    fed.wait_event(curator, "round_announced", 60.0, round=3)
    fed.publish(sender, topo.TO_CURATOR_EXCHANGE, f"from.{sender}", ready_round_1)
    fed.publish(sender, topo.TO_CURATOR_EXCHANGE, f"from.{sender}.retry", ready_round_1)
    fed.wait_for(
        "the round-3 replays to be dropped",
        lambda: len(rejections(curator.events(), "tessera.curator", sender)) == len(to_curator) + 2,
        30.0,
    )
    for event in rejections(curator.events(), "tessera.curator", sender)[len(to_curator) :]:
        # A Ready for another aggregation is stale whenever it comes: acked and dropped.
        assert (event["event"], event["reason"]) == ("message_dropped", "stale"), event

    report = fed.finish()  # every process exits with 0: nothing crashed

    history = report["history"]
    assert [(r["round"], r["attempt"]) for r in history] == [(r, 0) for r in range(1, rounds + 1)]
    weights = fed.announced_weights()
    for record in history:
        assert all(a == sorted(fed.organisations) for a in record["phases"].values()), record
        fed.check_round(record, weights[record["round"]], fed.organisations)
    # The replayed announcement did not make the target train (and spend privacy) again.
    trained = [e["round"] for e in processes[target].events() if e["event"] == "trained"]
    assert trained == list(range(1, rounds + 1))
    assert fed.accountant(target)["rounds_done"] == rounds
    for name in [staller, sender]:
        assert not rejections(fed.events(name), "tessera.participant"), name

    # Rejected messages were dead-lettered, not requeued: one per rejection the services logged.
    rejected = [
        e
        for name in ["curator", *fed.organisations]
        for e in fed.events(name)
        if e["event"] == "message_rejected" and e.get("logger") == "tessera.transport"
    ]
    stale = sum(1 for _, _, reason in to_curator if reason == "stale")
    assert len(rejected) >= len(to_curator) - stale + len(to_participant)
    assert fed.queue_depth(topo.DEAD_LETTER_QUEUE) == len(rejected)
