"""Hostile and malformed input: each is rejected with a clear error, state is unchanged, the round goes on."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from tessera.errors import ProtocolError
from tessera.secagg.curator import CuratorPhase, CuratorSession
from tessera.secagg.messages import (
    AdvertisedKeys,
    AdvertiseKeys,
    EncryptedShare,
    EncryptedShares,
    ForwardedShares,
    MaskedInput,
    RevealedShare,
    UnmaskRequest,
    UnmaskShares,
)
from tessera.secagg.participant import ParticipantState
from tessera.secagg.shamir import PRIME, SHARE_BYTES
from tessera.secagg.simulation import DropPoint, make_federation, simulate

from .conftest import Harness, make_harness


def received_from(curator: CuratorSession) -> frozenset[int]:
    """Who has answered in the current phase, read from the session's own bookkeeping."""
    return frozenset(curator._answered) if not curator.finished else frozenset()


def _curator_snapshot(h: Harness) -> tuple:
    c = h.curator
    return (c.phase, received_from(c), c.next_deadline, c._total.copy().tobytes())


def _advance_to(h: Harness, phase: CuratorPhase) -> None:
    h.start()
    while h.curator.phase is not phase:
        h.step()


def _flip(data: bytes, at: int = 5) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# --- curator side -------------------------------------------------------------------------------------------


def test_forged_advertisement_signature_is_rejected_and_round_continues() -> None:
    h = make_harness(5)
    h.start()
    replies = h.deliver()
    u, advert = replies[0]
    assert isinstance(advert, AdvertiseKeys)
    before = _curator_snapshot(h)
    forged = dataclasses.replace(advert, signature=_flip(advert.signature))
    with pytest.raises(ProtocolError, match="signature does not verify"):
        h.curator.receive(u, forged, h.now)
    missing = dataclasses.replace(advert, signature=b"")
    with pytest.raises(ProtocolError, match="signature does not verify"):
        h.curator.receive(u, missing, h.now)
    assert _curator_snapshot(h) == before
    h.collect()
    h.run()
    assert h.curator.result is not None
    assert np.array_equal(h.curator.result.total, h.plain_sum(set(range(1, 6))))


def test_advertisement_signed_by_another_member_is_rejected() -> None:
    h = make_harness(5)
    h.start()
    replies = dict(h.deliver())
    # Participant 2's advertisement relabelled as 3's: 3's roster key does not verify it.
    stolen = dataclasses.replace(replies[2], sender=3)
    with pytest.raises(ProtocolError, match="signature"):
        h.curator.receive(3, stolen, h.now)


def test_sender_outside_roster_and_impersonation_are_rejected() -> None:
    h = make_harness(5)
    h.start()
    u, advert = h.deliver()[0]
    with pytest.raises(ProtocolError, match="not in the roster"):
        h.curator.receive(99, dataclasses.replace(advert, sender=99), h.now)
    with pytest.raises(ProtocolError, match="claims to come from"):
        h.curator.receive(u + 1, advert, h.now)


def test_replay_from_another_round_or_aggregation_is_rejected_by_both_sides() -> None:
    old = make_harness(5, round_id=1, seed=7)
    _advance_to(old, CuratorPhase.SHARE)
    old_replies = old.deliver()
    new = make_harness(5, round_id=2, seed=7)
    new.start()
    new.deliver()
    new.collect()
    new.deliver()
    u, shares = old_replies[0]
    before = _curator_snapshot(new)
    with pytest.raises(ProtocolError, match="is for fed/1/a0"):
        new.curator.receive(u, shares, new.now)
    assert _curator_snapshot(new) == before
    # And a curator message of the other aggregation, sent to a participant of this one.
    other = make_harness(5, aggregation="a1", seed=7)
    _advance_to(other, CuratorPhase.SHARE)
    assert isinstance(other.pending[0].message, AdvertisedKeys)
    p = new.participants[1]
    state = p.state
    with pytest.raises(ProtocolError):
        p.receive(other.pending[0].message)
    assert p.state is state


def test_duplicate_and_wrong_phase_messages_are_rejected_without_state_change() -> None:
    h = make_harness(5)
    _advance_to(h, CuratorPhase.MASKED_INPUT)
    replies = h.deliver()
    u, masked = replies[0]
    h.curator.receive(u, masked, h.now)
    before = _curator_snapshot(h)
    with pytest.raises(ProtocolError, match="duplicate MaskedInput"):
        h.curator.receive(u, masked, h.now)
    fake_advert = AdvertiseKeys(
        ids=h.config.ids,
        sender=u,
        encryption_key=bytes(32),
        masking_key=bytes(32),
        commitment=bytes(32),
        signature=bytes(64),
    )
    with pytest.raises(ProtocolError, match="not accepted in phase masked_input"):
        h.curator.receive(u, fake_advert, h.now)
    assert _curator_snapshot(h) == before
    h.replies = replies[1:]
    h.collect()
    h.run()
    assert h.curator.result is not None
    assert np.array_equal(h.curator.result.total, h.plain_sum(set(range(1, 6))))


def test_wrong_length_or_type_vector_is_rejected() -> None:
    h = make_harness(5, m=16)
    _advance_to(h, CuratorPhase.MASKED_INPUT)
    u, masked = h.deliver()[0]
    assert isinstance(masked, MaskedInput)
    for bad in (
        masked.vector[:-1],
        np.concatenate([masked.vector, masked.vector]),
        masked.vector.astype(np.uint64),
    ):
        with pytest.raises(ProtocolError, match="masked input must be 16 elements"):
            h.curator.receive(u, dataclasses.replace(masked, vector=bad), h.now)
    assert received_from(h.curator) == frozenset()


def test_shares_addressed_wrongly_are_rejected() -> None:
    h = make_harness(5)
    _advance_to(h, CuratorPhase.SHARE)
    u, shares = h.deliver()[0]
    assert isinstance(shares, EncryptedShares)
    twice = dataclasses.replace(shares, shares=(*shares.shares[:-1], shares.shares[0]))
    with pytest.raises(ProtocolError, match="exactly its 4 holders"):
        h.curator.receive(u, twice, h.now)
    short = dataclasses.replace(
        shares, shares=(EncryptedShare(peer=shares.shares[0].peer, ciphertext=b"x"), *shares.shares[1:])
    )
    with pytest.raises(ProtocolError, match="ciphertext must be"):
        h.curator.receive(u, short, h.now)


# --- participant side ----------------------------------------------------------------------------------------


def test_tampered_share_ciphertext_is_reported_and_round_still_exact() -> None:
    h = make_harness(6)
    _advance_to(h, CuratorPhase.MASKED_INPUT)
    # The curator (or a peer) flips a bit in one ciphertext forwarded to participant 1.
    for item in h.pending:
        if item.recipients == (1,):
            message = item.message
            assert isinstance(message, ForwardedShares)
            first = message.shares[0]
            tampered = EncryptedShare(peer=first.peer, ciphertext=_flip(first.ciphertext, 20))
            h.pending[h.pending.index(item)] = dataclasses.replace(
                item, message=dataclasses.replace(message, shares=(tampered, *message.shares[1:]))
            )
    h.run()
    problems = h.participants[1].share_problems
    assert len(problems) == 1 and "does not open" in problems[0].reason
    assert h.curator.result is not None
    assert np.array_equal(h.curator.result.total, h.plain_sum(set(range(1, 7))))


def test_forged_advertisement_in_broadcast_is_refused_by_participant() -> None:
    h = make_harness(5)
    _advance_to(h, CuratorPhase.SHARE)
    broadcast = h.pending[0].message
    assert isinstance(broadcast, AdvertisedKeys)
    ads = list(broadcast.advertisements)
    ads[2] = dataclasses.replace(ads[2], masking_key=bytes(32))  # curator swaps in its own key
    p = h.participants[1]
    with pytest.raises(ProtocolError, match="bad signature"):
        p.receive(dataclasses.replace(broadcast, advertisements=tuple(ads)))
    assert p.state is ParticipantState.ADVERTISED
    outsider = dataclasses.replace(ads[0], sender=42)
    with pytest.raises(ProtocolError, match="not invited"):
        p.receive(dataclasses.replace(broadcast, advertisements=(*broadcast.advertisements, outsider)))
    assert p.state is ParticipantState.ADVERTISED
    assert p.receive(broadcast)  # the genuine broadcast still works


def test_holders_asked_for_the_same_shares_get_one_unmask_request() -> None:
    h = make_harness(6)  # the full graph: every holder holds shares of everybody
    _advance_to(h, CuratorPhase.UNMASK)
    requests = [item for item in h.pending if isinstance(item.message, UnmaskRequest)]
    assert len(requests) == 1 and requests[0].recipients == tuple(range(1, 7))


def _to_unmask_request(h: Harness, recipient: int) -> UnmaskRequest:
    _advance_to(h, CuratorPhase.UNMASK)
    for item in h.pending:
        if recipient in item.recipients:
            assert isinstance(item.message, UnmaskRequest)
            return item.message
    raise AssertionError("no unmask request")


def test_request_for_both_shares_of_one_participant_is_refused() -> None:
    h = make_harness(6)
    # Participant 6 drops before masked input, so the curator legitimately needs its key share...
    h.start()
    for _ in range(2):
        h.step()
    h.deliver(skip=frozenset({6}))
    h.collect()
    h.step()
    request = next(i.message for i in h.pending if 1 in i.recipients)
    assert isinstance(request, UnmaskRequest)
    assert 6 in request.reveal_key_of
    p = h.participants[1]
    # ...a greedy curator also asks for 6's self-mask share, or for a survivor's mask key.
    both = dataclasses.replace(request, reveal_self_mask_of=(*request.reveal_self_mask_of, 6))
    with pytest.raises(ProtocolError, match="both shares of participants \\[6\\]; refused"):
        p.receive(both)
    survivor_key = dataclasses.replace(
        request,
        reveal_self_mask_of=tuple(u for u in request.reveal_self_mask_of if u != 2),
        reveal_key_of=(*request.reveal_key_of, 2),
    )
    with pytest.raises(ProtocolError, match="mask-key shares of survivors \\[2\\]"):
        p.receive(survivor_key)
    assert p.state is ParticipantState.SIGNED
    (answer,) = p.receive(request)
    assert isinstance(answer, UnmaskShares)
    assert {s.owner for s in answer.key_shares} == {6}
    assert 6 not in {s.owner for s in answer.self_mask_shares}


def test_unmask_request_with_a_different_u3_is_refused() -> None:
    h = make_harness(6)
    request = _to_unmask_request(h, 1)
    p = h.participants[1]
    smaller = dataclasses.replace(request, survivors=request.survivors[:-1])
    with pytest.raises(ProtocolError, match="U3 different from the one this participant signed"):
        p.receive(smaller)
    too_few = dataclasses.replace(request, signatures=request.signatures[: h.config.threshold - 1])
    with pytest.raises(ProtocolError, match="needed; refusing to unmask"):
        p.receive(too_few)
    assert p.state is ParticipantState.SIGNED


def test_survivor_list_without_self_or_below_threshold_is_refused() -> None:
    h = make_harness(6)
    _advance_to(h, CuratorPhase.CONSISTENCY)
    survivors = h.pending[0].message
    p = h.participants[1]
    with pytest.raises(ProtocolError, match="omits this participant"):
        p.receive(dataclasses.replace(survivors, survivors=(2, 3, 4, 5, 6)))
    with pytest.raises(ProtocolError, match="below the threshold"):
        p.receive(dataclasses.replace(survivors, survivors=(1, 2)))
    assert p.state is ParticipantState.MASKED


# --- bad shares at reconstruction ----------------------------------------------------------------------------


def _corrupt_unmask(h: Harness, liar: int) -> None:
    # Random offsets: equal offsets from two liars can cancel in a Lagrange combination (and then the
    # reconstruction is right, which the commitment check confirms) -- not the case under test.
    rng = np.random.default_rng(liar)
    for i, (u, message) in enumerate(h.replies):
        if u == liar and isinstance(message, UnmaskShares):
            bad = tuple(
                RevealedShare(
                    owner=s.owner,
                    share=((int.from_bytes(s.share, "big") + int(rng.integers(1, 2**62))) % PRIME).to_bytes(
                        SHARE_BYTES, "big"
                    ),
                )
                for s in message.self_mask_shares
            )
            h.replies[i] = (u, dataclasses.replace(message, self_mask_shares=bad))


def test_a_bad_share_among_more_than_t_is_routed_around() -> None:
    h = make_harness(7)  # t = 5, 7 holders
    _advance_to(h, CuratorPhase.UNMASK)
    h.deliver()
    liar = min(h.participants)  # its share is among the first t tried
    _corrupt_unmask(h, liar)
    h.collect()
    assert h.curator.result is not None
    assert h.curator.result.bad_share_senders == frozenset({liar})
    assert np.array_equal(h.curator.result.total, h.plain_sum(set(range(1, 8))))


def test_too_many_bad_shares_abort_instead_of_a_wrong_sum() -> None:
    h = make_harness(5, threshold=4)  # 5 holders, t = 4: two liars leave no honest t-subset
    _advance_to(h, CuratorPhase.UNMASK)
    h.deliver()
    _corrupt_unmask(h, 1)
    _corrupt_unmask(h, 2)
    h.collect()
    assert h.curator.result is None
    assert h.curator.phase is CuratorPhase.ABORTED
    assert "unmasking failed" in (h.curator.abort_reason or "")


# --- what the curator sees -----------------------------------------------------------------------------------


def test_curator_view_holds_no_input_and_one_kind_of_share_per_participant() -> None:
    n, m = 8, 64
    rng = np.random.default_rng(11)
    inputs = {u: rng.integers(0, 2**32, m, dtype=np.uint32) for u in range(1, n + 1)}
    from tessera.secagg.config import AggregationConfig, SessionIds

    config = AggregationConfig.create(
        ids=SessionIds(federation="view", round=1, aggregation="v"),
        participants=range(1, n + 1),
        vector_length=m,
        ring_bits=32,
    )
    roster, identities = make_federation(n)
    outcome = simulate(
        config,
        inputs,
        dropouts={3: DropPoint.MASKED_INPUT, 5: DropPoint.UNMASK},
        roster=roster,
        identities=identities,
        record_view=True,
    )
    assert outcome.total is not None
    seed_owners: set[int] = set()
    key_owners: set[int] = set()
    for _sender, message in outcome.curator_view:
        blob = repr(copy.copy(message)).encode()
        if isinstance(message, MaskedInput):
            for _u, x in inputs.items():
                # No masked vector equals, or shares a single coordinate run with, any raw input.
                assert not np.array_equal(message.vector, x)
                assert np.count_nonzero(message.vector == x) < 4
        if isinstance(message, UnmaskShares):
            seed_owners |= {s.owner for s in message.self_mask_shares}
            key_owners |= {s.owner for s in message.key_shares}
        for x in inputs.values():
            assert x.tobytes() not in blob
    assert seed_owners.isdisjoint(key_owners)
    assert key_owners == {3}
    assert seed_owners == set(range(1, n + 1)) - {3}
