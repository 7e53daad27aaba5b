"""What must hold after any run of a federation, however it was disturbed (kills, restarts, a broker that went
away, slow or stalled organisations). :func:`check_federation` checks all of it, from three independent
sources: the broker's copy of every message (the tap), the processes' logs, and the files they left
(checkpoint, accountants, and the inputs the participants recorded with ``faults.record_inputs``).

1. Every aggregation id was announced for one (round, attempt) only, and no curator run announced an id that
   another run (or an earlier attempt) had used.
2. No key is used twice: each X25519 public key advertised in the tap (encryption and masking keys alike)
   belongs to one (aggregation, sender) only. A retried attempt therefore ran with fresh keys.
3. Each completed round equals the exact weighted mean of its survivors' inputs: the ring sum of the vectors
   its survivors recorded for the round's aggregation, decoded with the announced layout, added to the
   weights announced for the round, gives bit for bit the weights announced for the next round (or saved
   in the checkpoint, after the last); the record's total weight and ε mean are those of that sum; and its
   evaluation equals the direct evaluation of the announced weights on the survivors' validation splits.
4. An aggregation that aborted left no record, and a participant that revealed unmask shares for an
   aggregation that did not complete submitted a different (retrained) vector to the next attempt of that
   round, never the same one.
5. Each participant's ε never decreases from one trained round to the next (across restarts), its accountant
   file has one round per ``trained`` event (an update is never paid for twice, nor trained for free), and
   the ε of the file (recomputed with Opacus) is the one it logged last.
6. The curator's checkpoint loads, and its history is rounds 1..n without gaps or repeats.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import Federation


def announcements(fed: Federation) -> list[Any]:
    """Every RoundAnnouncement header the tap saw, in the order the broker routed them."""
    from tessera import protocol

    return [
        header
        for header, _ in fed.captured_messages(routing_key="to.all")
        if isinstance(header, protocol.RoundAnnouncement)
    ]


def secagg_messages(fed: Federation) -> list[tuple[str, Any]]:
    """(broker-authenticated sender, decoded secure-aggregation message) of everything in the tap."""
    from tessera import protocol
    from tessera.errors import ProtocolError
    from tessera.secagg.wire import WireLimits
    from tessera.secagg.wire import decode as decode_secagg

    heads = announcements(fed)
    if not heads:
        return []
    layout = heads[0].layout.layout()
    limits = WireLimits(
        max_participants=len(fed.organisations), vector_length=layout.length, ring_bits=layout.ring_bits
    )
    out = []
    for message in fed.drain_tap():
        try:
            header, payload = protocol.decode(message.body, max_payload=1 << 26)
            if isinstance(header, protocol.SecAgg):
                out.append((message.user_id or "", decode_secagg(payload, limits)))
        except ProtocolError:
            continue
    return out


def recorded_input(fed: Federation, organisation: str, aggregation: str) -> np.ndarray | None:
    path = (
        Path(fed.participant_settings[organisation]["state_dir"])
        / "fault-injection"
        / "inputs"
        / f"{aggregation}.npz"
    )
    if not path.exists():
        return None
    with np.load(path) as archive:
        return np.asarray(archive["vector"])


def curator_checkpoint(fed: Federation) -> Any:
    """The curator's checkpoint as the curator loads it (raises if it is damaged)."""
    from tessera.curator import checkpoint

    return checkpoint.load(Path(fed.curator_settings["state_dir"]))


def check_federation(
    fed: Federation, report: dict[str, Any], *, kills: dict[str, int] | None = None
) -> dict[str, Any]:
    """All the invariants of the module docstring; returns a few facts for the test to assert on.

    ``kills``: how often each organisation was SIGKILLed. Its accountant is saved *before* training
    (write-ahead), so each kill may have cost one round of ε that no ``trained`` event shows (over-counting,
    never under-counting, is what a crash may do)."""
    from tessera.secagg.messages import AdvertiseKeys, UnmaskShares

    heads = announcements(fed)
    assert heads, "the tap saw no announcement"
    layout = heads[0].layout.layout()

    # 1. aggregation ids
    slot: dict[str, tuple[int, int]] = {}
    for header in heads:
        previous = slot.setdefault(header.aggregation, (header.round, header.attempt))
        assert previous == (header.round, header.attempt), f"aggregation id {header.aggregation} reused"
    logged = [e["aggregation"] for e in fed.events("curator") if e["event"] == "round_announced"]
    assert len(logged) == len(set(logged)), f"a curator run announced an aggregation id twice: {logged}"
    assert set(logged) <= set(slot), "the tap missed an announcement the curator logged"

    # 2. keys
    messages = secagg_messages(fed)
    owner: dict[bytes, tuple[str, str]] = {}
    for sender, message in messages:
        if isinstance(message, AdvertiseKeys):
            for key in (message.encryption_key, message.masking_key):
                first = owner.setdefault(key, (message.ids.aggregation, sender))
                assert first == (message.ids.aggregation, sender), (
                    f"key {key.hex()[:16]} advertised by {first} and again by "
                    f"({message.ids.aggregation}, {sender})"
                )

    # 6. the checkpoint
    state = curator_checkpoint(fed)
    assert state is not None, "no checkpoint"
    history = report["history"]
    assert [r["round"] for r in history] == list(range(1, len(history) + 1)), "gaps or repeats"
    assert state.rounds_completed == report["rounds_completed"] == len(history)

    # 3. every completed round, exactly
    weights = fed.announced_weights()
    completed_by: dict[int, str] = {}
    for header in heads:  # the last aggregation announced for a round is the one that completed it
        completed_by[header.round] = header.aggregation
    aborted = {e["aggregation"] for e in fed.events("curator") if e["event"] == "aggregation_aborted"}
    for record in history:
        r = record["round"]
        aggregation = completed_by[r]
        assert aggregation not in aborted, f"round {r} recorded from aborted aggregation {aggregation}"
        survivors = record["participants"]
        fed.check_round(record, weights[r], survivors)
        after = weights.get(r + 1, state.weights)
        check_exact_sum(fed, layout, record, aggregation, survivors, weights[r], after)

    # 4. no reuse of a vector after revealing shares for an aggregation that did not complete
    revealed: dict[str, set[str]] = defaultdict(set)
    for sender, message in messages:
        if isinstance(message, UnmaskShares):
            revealed[sender].add(message.ids.aggregation)
    order = {header.aggregation: i for i, header in enumerate(heads)}
    for organisation, aggregations in revealed.items():
        for aggregation in aggregations - set(completed_by.values()):
            round_number = slot[aggregation][0]
            later = [a for a, (r, _) in slot.items() if r == round_number and order[a] > order[aggregation]]
            mine = recorded_input(fed, organisation, aggregation)
            for other in later:
                theirs = recorded_input(fed, organisation, other)
                if mine is not None and theirs is not None:
                    assert not np.array_equal(mine, theirs), (
                        f"{organisation} reused its vector of {aggregation} (shares revealed) in {other}"
                    )

    # An aborted aggregation is retried: the same round is announced again later under another id.
    for aggregation in aborted:
        round_number = slot[aggregation][0]
        retried = [h for h in heads if h.round == round_number and order[h.aggregation] > order[aggregation]]
        assert retried or report["rounds_completed"] < round_number, f"{aggregation} aborted, never retried"

    # 5. privacy accounting
    for organisation in fed.organisations:
        events = fed.events(organisation)
        trained = [e for e in events if e["event"] == "trained"]
        # ε as each run saw it: at start-up (privacy_plan) and after each trained round, in run order.
        seen = [
            e["epsilon_spent"] if e["event"] == "privacy_plan" else e["epsilon"]
            for e in events
            if e["event"] == "trained" or (e["event"] == "privacy_plan" and "epsilon_spent" in e)
        ]
        seen = [round(v, 4) for v in seen if v is not None]
        assert seen == sorted(seen), f"{organisation}: ε went down {seen}"
        if not trained:
            continue
        document = fed.accountant(organisation)
        slack = (kills or {}).get(organisation, 0)
        assert len(trained) <= document["rounds_done"] <= len(trained) + slack, (
            f"{organisation}: accountant counts {document['rounds_done']} rounds, {len(trained)} trained, "
            f"{slack} kills"
        )
        stored = fed.accountant_epsilon(organisation)
        if document["rounds_done"] == len(trained):
            assert stored == pytest.approx(trained[-1]["epsilon"], abs=1e-4), organisation
        else:
            assert stored > trained[-1]["epsilon"], organisation
    return {"aborted": aborted, "announced": heads, "revealed": revealed}


def check_exact_sum(
    fed: Federation,
    layout: Any,
    record: dict[str, Any],
    aggregation: str,
    survivors: list[str],
    before: np.ndarray,
    after: np.ndarray,
) -> None:
    vectors = {o: recorded_input(fed, o, aggregation) for o in survivors}
    missing = [o for o, v in vectors.items() if v is None]
    assert not missing, f"round {record['round']}: no recorded input of {missing} for {aggregation}"
    total = np.zeros(layout.length, dtype=next(iter(vectors.values())).dtype)  # type: ignore[union-attr]
    for vector in vectors.values():
        total += vector  # unsigned: wraps modulo the ring, as the secure sum does
    aggregate = layout.decode(total)
    expected = (before + aggregate.mean_update).astype(np.float32)
    where = f"round {record['round']} ({aggregation})"
    assert np.array_equal(expected, after), f"{where}: the new weights are not the exact mean of the inputs"
    assert record["total_weight"] == aggregate.total_weight, where
    assert record["epsilon_mean"] == pytest.approx(aggregate.epsilon_sum / len(survivors), abs=1e-9), where


__all__ = ["announcements", "check_federation", "curator_checkpoint", "recorded_input", "secagg_messages"]
