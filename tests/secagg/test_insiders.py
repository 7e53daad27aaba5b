"""A hostile roster member or curator that sends invalid key material cannot stop the honest parties.

- A member that advertises a low-order X25519 key (a signed advertisement: only it could have made it) is
  left out of U1 by the curator; the aggregation completes exactly over the others.
- A curator that forwards such an advertisement anyway is refused by every honest participant with a
  ProtocolError, before any secret leaves it; nothing else escapes.
- Property: any one malformed or invalid piece of key material, in any message of any phase, yields only the
  receiving session's own error type (ProtocolError), never another exception, and leaves the session usable.
- The SecAgg+ graph depends on the signed advertisements: a curator's seed alone does not decide it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tessera.crypto import CryptoFailure, check_agreement_public_key
from tessera.errors import Misbehaviour, ProtocolError
from tessera.secagg._common import advertised_neighbourhoods
from tessera.secagg.config import AggregationRules, Graph, ParticipantPolicy
from tessera.secagg.curator import CuratorPhase
from tessera.secagg.messages import (
    AdvertisedKeys,
    AdvertiseKeys,
    ConsistencyProof,
    ConsistencySignature,
    EncryptedShare,
    EncryptedShares,
    ForwardedShares,
    MaskedInput,
    RevealedShare,
    UnmaskRequest,
    UnmaskShares,
    advertisement_signed_bytes,
)
from tessera.secagg.participant import ParticipantState

from tests.secagg.conftest import Harness, make_harness

# RFC 7748 section 6.1 / Bernstein's list: points of order dividing 8, canonical and not.
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]


def hostile_advert(h: Harness, advert: AdvertiseKeys, *, masking_key: bytes) -> AdvertiseKeys:
    """The member's own advertisement with a bad key, re-signed with its own identity key (an insider)."""
    signed = advertisement_signed_bytes(
        advert.ids, advert.sender, advert.encryption_key, masking_key, advert.commitment
    )
    return dataclasses.replace(
        advert, masking_key=masking_key, signature=h.identities[advert.sender].sign(signed)
    )


@pytest.mark.parametrize("key", LOW_ORDER, ids=[k.hex()[:8] for k in LOW_ORDER])
def test_low_order_keys_are_recognised(key: bytes) -> None:
    with pytest.raises(CryptoFailure):
        check_agreement_public_key(key)


def test_an_insider_with_a_low_order_key_is_left_out_and_the_others_finish_exactly() -> None:
    h = make_harness(5, m=32)
    h.start()
    h.deliver()
    insider = 3
    h.replies = [
        (u, hostile_advert(h, m, masking_key=bytes(32)) if u == insider else m) for u, m in h.replies
    ]
    # The curator refuses the advertisement as misbehaviour and goes on without its sender.
    with pytest.raises(Misbehaviour, match="low-order"):
        h.curator.receive(insider, dict(h.replies)[insider], h.now)
    h.replies = [(u, m) for u, m in h.replies if u != insider]
    for u, m in h.replies:
        assert h.curator.receive(u, m, h.now) == []  # still waiting for the insider...
    assert h.curator.poll(h.now) == [] and h.curator.phase is CuratorPhase.ADVERTISE
    h.curator.stop_waiting_for(insider)  # ...until the driver gives up on it: no wait for the deadline
    h.replies = []
    h.pending = h.curator.poll(h.now)
    assert h.curator.phase is CuratorPhase.SHARE
    h.run()
    result = h.curator.result
    assert result is not None
    assert result.survivors == frozenset({1, 2, 4, 5})
    assert np.array_equal(result.total, h.plain_sum({1, 2, 4, 5}))
    assert h.curator.phase_log[CuratorPhase.ADVERTISE][1] == frozenset({1, 2, 4, 5})
    # Every honest participant finished; none of them ever saw the bad key.
    assert all(h.participants[u].state is ParticipantState.DONE for u in (1, 2, 4, 5))


def test_a_curator_that_forwards_a_low_order_key_is_refused_before_any_secret_leaves() -> None:
    h = make_harness(5, m=8)
    h.start()
    h.deliver()
    insider = 2
    adverts = {u: m for u, m in h.replies}
    # A hostile curator forwards the insider's signed advertisement with its low-order key.
    forged = AdvertisedKeys(
        ids=h.config.ids,
        advertisements=tuple(
            hostile_advert(h, adverts[u], masking_key=LOW_ORDER[2]) if u == insider else adverts[u]
            for u in sorted(adverts)
        ),
    )
    for u in (1, 3, 4, 5):
        participant = h.participants[u]
        with pytest.raises(ProtocolError, match="low-order or invalid X25519 key"):
            participant.receive(forged)
        assert participant.state is ParticipantState.ADVERTISED  # unchanged: no shares were made


# --- property: invalid key material anywhere yields the session's own error ---------------------------------


def _run_to(h: Harness, phase: CuratorPhase) -> None:
    """Drive the harness until the curator is in ``phase`` with its participants' replies collected."""
    h.start()
    while h.curator.phase is not phase:
        h.step()
    h.deliver()


@st.composite
def mutated(draw: st.DrawFn, message: object) -> object:
    """``message`` with one piece of key material replaced by junk, a low-order point or a wrong length."""
    junk = st.binary(min_size=0, max_size=40) | st.sampled_from(LOW_ORDER)
    if isinstance(message, AdvertiseKeys):
        field = draw(st.sampled_from(["encryption_key", "masking_key", "commitment", "signature"]))
        return dataclasses.replace(message, **{field: draw(junk)})
    if isinstance(message, EncryptedShares):
        i = draw(st.integers(0, len(message.shares) - 1))
        shares = list(message.shares)
        shares[i] = EncryptedShare(peer=shares[i].peer, ciphertext=draw(junk))
        return dataclasses.replace(message, shares=tuple(shares))
    if isinstance(message, MaskedInput):
        return dataclasses.replace(message, vector=np.zeros(draw(st.integers(0, 3)), dtype=np.uint64))
    if isinstance(message, ConsistencySignature):
        return dataclasses.replace(message, signature=draw(junk))
    if isinstance(message, UnmaskShares):
        items = list(message.self_mask_shares) or [RevealedShare(owner=1, share=b"")]
        items[0] = RevealedShare(owner=items[0].owner, share=draw(junk))
        return dataclasses.replace(message, self_mask_shares=tuple(items))
    raise AssertionError(type(message))


PHASES = [
    CuratorPhase.ADVERTISE,
    CuratorPhase.SHARE,
    CuratorPhase.MASKED_INPUT,
    CuratorPhase.CONSISTENCY,
    CuratorPhase.UNMASK,
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sender=st.integers(1, 4), phase=st.sampled_from(PHASES), data=st.data())
def test_invalid_key_material_to_the_curator_raises_only_protocol_errors(sender, phase, data) -> None:
    h = make_harness(4, m=8, seed=sender)
    _run_to(h, phase)
    message = dict(h.replies)[sender]
    bad = data.draw(mutated(message))
    before = (h.curator.phase, frozenset(h.curator._answered))
    try:
        h.curator.receive(sender, bad, h.now)  # type: ignore[arg-type]
    except ProtocolError:
        assert (h.curator.phase, frozenset(h.curator._answered)) == before
    # Whatever happened, the honest messages still complete the phase and the protocol goes on.
    for u, m in h.replies:
        if u not in frozenset(h.curator._answered) and not h.curator.finished:
            h.curator.receive(u, m, h.now)


@st.composite
def forwarded_cases(draw: st.DrawFn) -> tuple[str, int]:
    return draw(st.sampled_from(["advertised", "forwarded", "request"])), draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=forwarded_cases(), junk=st.binary(min_size=0, max_size=40) | st.sampled_from(LOW_ORDER))
def test_invalid_key_material_to_a_participant_raises_only_protocol_errors(case, junk) -> None:
    kind, pick = case
    h = make_harness(4, m=8, seed=pick % 7)
    h.start()
    if kind == "advertised":
        h.step()
        (item,) = h.pending
        assert isinstance(item.message, AdvertisedKeys)
        adverts = list(item.message.advertisements)
        i = pick % len(adverts)
        field = ["encryption_key", "masking_key", "commitment", "signature"][pick % 4]
        adverts[i] = dataclasses.replace(adverts[i], **{field: junk})
        if field != "signature" and len(junk) == 32 and pick % 2:
            # An insider signs its own bad advertisement: the signature holds, the key must be refused.
            a = adverts[i]
            signed = advertisement_signed_bytes(
                a.ids, a.sender, a.encryption_key, a.masking_key, a.commitment
            )
            adverts[i] = dataclasses.replace(a, signature=h.identities[a.sender].sign(signed))
        message: object = dataclasses.replace(item.message, advertisements=tuple(adverts))
        target = 1 + (pick // 7) % 4
    elif kind == "forwarded":
        h.step()
        h.step()
        item = h.pending[pick % len(h.pending)]
        assert isinstance(item.message, ForwardedShares)
        shares = list(item.message.shares)
        j = pick % len(shares)
        shares[j] = EncryptedShare(peer=shares[j].peer, ciphertext=junk)
        message = dataclasses.replace(item.message, shares=tuple(shares))
        (target,) = item.recipients
    else:
        while not (h.pending and isinstance(h.pending[0].message, UnmaskRequest)):
            h.step()
        item = h.pending[0]
        proofs = list(item.message.signatures)
        k = pick % len(proofs)
        proofs[k] = ConsistencyProof(signer=proofs[k].signer, signature=junk)
        message = dataclasses.replace(item.message, signatures=tuple(proofs))
        target = item.recipients[pick % len(item.recipients)]
    participant = h.participants[target]
    state = participant.state
    try:
        participant.receive(message)  # type: ignore[arg-type]
    except ProtocolError:
        assert participant.state is state
    # A participant that refused still takes the honest message.
    if participant.state is state:
        participant.receive(item.message)


# --- the graph is not the curator's choice ---------------------------------------------------------------------


def test_the_sparse_graph_follows_the_signed_advertisements_not_the_curators_seed() -> None:
    h = make_harness(12, m=4, graph=Graph.SPARSE)
    h.start()
    h.deliver()
    adverts = {u: m for u, m in h.replies}
    graph = advertised_neighbourhoods(h.config, adverts)
    # Another curator seed *and* other advertisements give another graph; the curator sends its seed before
    # any advertisement exists, so it cannot pick a seed for the advertisements it will get.
    other_seed = dataclasses.replace(h.config, graph_seed=bytes(32))
    assert advertised_neighbourhoods(other_seed, adverts) != graph
    fresh = make_harness(12, m=4, graph=Graph.SPARSE, seed=99)
    fresh.start()
    fresh.deliver()
    other_adverts = {u: dataclasses.replace(m, ids=h.config.ids) for u, m in fresh.replies}
    assert advertised_neighbourhoods(h.config, other_adverts) != graph
    # Both sides derive the same graph.
    for u, m in h.replies:
        h.curator.receive(u, m, h.now)
    assert dict(h.curator.neighbours) == graph


def test_participants_refuse_configurations_weaker_than_the_roster() -> None:
    h = make_harness(10, m=4, graph=Graph.SPARSE)
    h.start()
    (start,) = h.pending
    rules = AggregationRules(threshold_fraction=0.9, graph=Graph.SPARSE)
    policy = ParticipantPolicy(federation="fed", vector_length=4, ring_bits=32, rules=rules)
    from tessera.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="below the federation's 9"):
        policy.check(start.message.config, 1)  # type: ignore[union-attr]
    full_only = ParticipantPolicy(federation="fed", vector_length=4, ring_bits=32, rules=AggregationRules())
    with pytest.raises(ConfigurationError, match="full graph"):
        full_only.check(start.message.config, 1)  # type: ignore[union-attr]
    few = ParticipantPolicy(
        federation="fed", vector_length=4, ring_bits=32, rules=AggregationRules(min_participants=11)
    )
    with pytest.raises(ConfigurationError, match="minimum is 11"):
        few.check(start.message.config, 1)  # type: ignore[union-attr]
