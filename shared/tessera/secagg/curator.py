"""The curator's side of secure aggregation as a sans-I/O state machine (SECAGG.md).

    phase          waits for (from)                   closes when                 then sends (to)
    -------------  ---------------------------------  --------------------------  -----------------------------
    ADVERTISE      AdvertiseKeys (invited)            all arrived or deadline     AdvertisedKeys (U1)
    SHARE          EncryptedShares (U1)               all arrived or deadline     ForwardedShares (each of U2)
    MASKED_INPUT   MaskedInput (U2)                   all arrived or deadline     SurvivorList (U3)
    CONSISTENCY    ConsistencySignature (U3)          all arrived or deadline     UnmaskRequest (each of U4)
    UNMASK         UnmaskShares (U4)                  all arrived or deadline     -> DONE with the sum

Whenever a phase closes with fewer than ``threshold`` senders, the session moves to ABORTED and sends
:class:`Abort` to every invited participant: no partial or wrong sum ever exists. Reconstructions are verified
(commitment for b_u, public key for s_u); a bad share is routed around when more than t shares are at hand,
and an unverifiable reconstruction aborts.

``receive(sender, message, now)`` takes the *authenticated* sender (RabbitMQ's ``user_id`` mapped to a roster
index by the transport). A message that does not fit raises :class:`ProtocolError` and changes nothing; one
that no honest participant sends (a bad signature, a low-order key, malformed shares or vectors) raises its
subclass :class:`Misbehaviour`, which the service counts against the sender. An advertiser whose keys are
invalid is simply left out of U1.
Time comes in as ``now`` (seconds, any monotonic origin); ``poll(now)`` closes a phase whose deadline passed.
Masked inputs are summed on arrival, so memory stays at one vector whatever n is.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from tessera.crypto import (
    KEY_BYTES,
    SEAL_OVERHEAD,
    SIGNATURE_BYTES,
    AgreementKey,
    CryptoFailure,
    check_agreement_public_key,
    public_key_matches,
    ring_dtype,
    secure_equal,
    verify_signature,
)
from tessera.errors import LocalUsageError, Misbehaviour, ProtocolError
from tessera.secagg._common import (
    SHARE_PLAINTEXT_BYTES,
    add_pairwise_mask,
    add_self_mask,
    advertised_neighbourhoods,
    pairwise_seed,
    seed_commitment,
)
from tessera.secagg.config import AggregationConfig, Roster
from tessera.secagg.messages import (
    Abort,
    AdvertisedKeys,
    AdvertiseKeys,
    ConsistencyProof,
    ConsistencySignature,
    CuratorMessage,
    EncryptedShare,
    EncryptedShares,
    ForwardedShares,
    MaskedInput,
    ParticipantMessage,
    RingVector,
    StartAggregation,
    SurvivorList,
    UnmaskRequest,
    UnmaskShares,
    advertisement_signed_bytes,
    consistency_signed_bytes,
)
from tessera.secagg.shamir import LagrangeCache, ReconstructionFailed, decode_share, reconstruct_verified


class CuratorPhase(enum.Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True, kw_only=True)
class PhaseTimeouts:
    """Seconds each phase waits for stragglers before closing with whoever answered."""

    advertise: float = 30.0
    share: float = 30.0
    masked_input: float = 60.0
    consistency: float = 30.0
    unmask: float = 30.0


@dataclass(frozen=True)
class Outgoing:
    """A message to send to each of ``recipients`` (roster indices)."""

    recipients: tuple[int, ...]
    message: CuratorMessage


@dataclass(frozen=True, kw_only=True, eq=False)
class AggregationResult:
    """The output of a completed aggregation: the sum over ``survivors`` and who took part where."""

    total: RingVector
    advertised: frozenset[int]  # U1
    shared: frozenset[int]  # U2
    survivors: frozenset[int]  # U3: exactly whose inputs are in ``total``
    signed: frozenset[int]  # U4
    responded: frozenset[int]  # U5
    bad_share_senders: frozenset[int] = field(default_factory=frozenset)


class CuratorSession:
    """The curator in one aggregation. Create, call :meth:`start`, then feed :meth:`receive` and :meth:`poll`."""

    def __init__(
        self,
        *,
        config: AggregationConfig,
        roster: Roster,
        timeouts: PhaseTimeouts | None = None,
    ) -> None:
        missing = [u for u in config.participants if u not in roster]
        if missing:
            raise LocalUsageError(f"participants {missing} are not in the roster")
        self.config = config
        self._roster = roster
        self._timeouts = timeouts or PhaseTimeouts()
        self.phase = CuratorPhase.ADVERTISE
        self.next_deadline: float | None = None
        self.result: AggregationResult | None = None
        self.abort_reason: str | None = None
        self._started = False
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._neighbours: dict[int, frozenset[int]] = {}
        self._ciphertexts: dict[int, tuple[EncryptedShare, ...]] = {}
        self._total: RingVector = np.zeros(config.vector_length, dtype=ring_dtype(config.ring_bits))
        self._survivors: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self._requested: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        self._seed_shares: dict[int, dict[int, int]] = {}  # owner -> holder -> share of b_owner
        self._key_shares: dict[int, dict[int, int]] = {}  # owner -> holder -> share of s_owner
        # Who the open phase waits for, fixed when it opens, and who has answered it so far.
        self._expected: frozenset[int] = frozenset(config.participants)
        self._answered: set[int] = set()
        self.phase_log: dict[CuratorPhase, tuple[frozenset[int], frozenset[int]]] = {}
        """For each closed phase: (who was expected, who answered) -- dropouts per phase for logs/metrics."""

    # --- driving ----------------------------------------------------------------------------------------------

    def start(self, now: float) -> list[Outgoing]:
        """Invite the participants (phase 0)."""
        if self._started:
            raise LocalUsageError("the aggregation has already started")
        self._started = True
        self.next_deadline = now + self._timeouts.advertise
        return [Outgoing(self.config.participants, StartAggregation(config=self.config))]

    @property
    def finished(self) -> bool:
        return self.phase in (CuratorPhase.DONE, CuratorPhase.ABORTED)

    def receive(self, sender: int, message: ParticipantMessage, now: float) -> list[Outgoing]:
        """Take one message from authenticated participant ``sender``; raises ProtocolError if it does not fit."""
        if not self._started:
            raise LocalUsageError("call start() first")
        if sender not in self._roster:
            raise ProtocolError("sender is not in the roster", sender=sender)
        if message.sender != sender:
            raise Misbehaviour(f"message claims to come from {message.sender}", sender=sender)
        if message.ids != self.config.ids:
            raise ProtocolError(f"message is for {message.ids}, not {self.config.ids}", sender=sender)
        if self.finished:
            raise ProtocolError(f"aggregation is already {self.phase.value}", sender=sender)
        rule = _PHASES[self.phase]
        if not isinstance(message, rule.accepts):
            raise ProtocolError(
                f"{type(message).__name__} is not accepted in phase {self.phase.value}", sender=sender
            )
        if sender not in self._expected:
            raise ProtocolError(f"not a participant of phase {self.phase.value}", sender=sender)
        if sender in self._answered:
            raise ProtocolError(f"duplicate {type(message).__name__}", sender=sender)
        try:
            rule.handle(self, sender, message)
        except CryptoFailure as exc:  # handlers translate their own; this is the backstop
            raise Misbehaviour(
                f"{type(message).__name__} failed a cryptographic check", sender=sender
            ) from exc
        self._answered.add(sender)
        if self._answered >= self._expected:
            return self._close_phase(now)
        return []

    def stop_waiting_for(self, sender: int) -> None:
        """The driver's decision that the current phase will not get a valid answer from ``sender`` (it sent
        a :class:`Misbehaviour`): :meth:`poll` then closes the phase once everybody else has answered,
        instead of waiting for the deadline. (:meth:`receive` itself never changes state on bad input.)"""
        if not self.finished and sender not in self._answered:
            self._expected = self._expected - {sender}

    def poll(self, now: float) -> list[Outgoing]:
        """Close the current phase if its deadline has passed, or if everybody it still waits for answered."""
        if self.finished or self.next_deadline is None:
            return []
        if now < self.next_deadline and not self._answered >= self._expected:
            return []
        return self._close_phase(now)

    # --- handlers: validate everything, then store ------------------------------------------------------------

    def _on_advertise(self, sender: int, message: AdvertiseKeys) -> None:
        if not (
            len(message.encryption_key) == len(message.masking_key) == len(message.commitment) == KEY_BYTES
        ):
            raise Misbehaviour("advertised keys and commitment must be 32 bytes each", sender=sender)
        signed = advertisement_signed_bytes(
            message.ids, sender, message.encryption_key, message.masking_key, message.commitment
        )
        try:
            verify_signature(self._roster.key(sender), signed, message.signature)
        except CryptoFailure as exc:
            raise Misbehaviour("advertisement signature does not verify", sender=sender) from exc
        try:
            check_agreement_public_key(message.encryption_key)
            check_agreement_public_key(message.masking_key)
        except CryptoFailure as exc:
            # Forwarded, such a key would make every honest peer's key agreement fail: its advertiser is
            # left out of this aggregation instead (and counted as an offence by the service).
            raise Misbehaviour("advertised a low-order or invalid X25519 key", sender=sender) from exc
        self._adverts[sender] = message

    def _on_share(self, sender: int, message: EncryptedShares) -> None:
        recipients = [item.peer for item in message.shares]
        wanted = self._neighbours[sender]
        if len(recipients) != len(set(recipients)) or set(recipients) != wanted:
            raise Misbehaviour(
                f"shares must go to exactly its {len(wanted)} holders, once each", sender=sender
            )
        expected_len = SHARE_PLAINTEXT_BYTES + SEAL_OVERHEAD
        if any(len(item.ciphertext) != expected_len for item in message.shares):
            raise Misbehaviour(f"each share ciphertext must be {expected_len} bytes", sender=sender)
        self._ciphertexts[sender] = message.shares

    def _on_masked(self, sender: int, message: MaskedInput) -> None:
        vector = message.vector
        if (
            vector.ndim != 1
            or vector.dtype != self._total.dtype
            or vector.shape[0] != self.config.vector_length
        ):
            raise Misbehaviour(
                f"masked input must be {self.config.vector_length} elements of Z_2^{self.config.ring_bits}",
                sender=sender,
            )
        np.add(self._total, vector, out=self._total)

    def _on_consistency(self, sender: int, message: ConsistencySignature) -> None:
        if len(message.signature) != SIGNATURE_BYTES:
            raise Misbehaviour("consistency signature is malformed", sender=sender)
        try:
            verify_signature(
                self._roster.key(sender),
                consistency_signed_bytes(self.config.ids, self._survivors),
                message.signature,
            )
        except CryptoFailure as exc:
            raise Misbehaviour("consistency signature does not verify over U3", sender=sender) from exc
        self._signatures[sender] = message.signature

    def _on_unmask(self, sender: int, message: UnmaskShares) -> None:
        want_seeds, want_keys = self._requested[sender]
        seed_owners = [item.owner for item in message.self_mask_shares]
        key_owners = [item.owner for item in message.key_shares]
        if len(set(seed_owners)) != len(seed_owners) or len(set(key_owners)) != len(key_owners):
            raise Misbehaviour("a share is revealed twice", sender=sender)
        if not set(seed_owners) <= want_seeds or not set(key_owners) <= want_keys:
            raise Misbehaviour("revealed shares that were not asked for", sender=sender)
        try:
            seeds = {item.owner: decode_share(item.share) for item in message.self_mask_shares}
            keys = {item.owner: decode_share(item.share) for item in message.key_shares}
        except ValueError as exc:
            raise Misbehaviour(f"malformed share: {exc}", sender=sender) from exc
        for owner, value in seeds.items():
            self._seed_shares.setdefault(owner, {})[sender] = value
        for owner, value in keys.items():
            self._key_shares.setdefault(owner, {})[sender] = value

    # --- phase transitions ------------------------------------------------------------------------------------

    def _close_phase(self, now: float) -> list[Outgoing]:
        closing = self.phase
        answered = frozenset(self._answered)
        self.phase_log[closing] = (self._expected, answered)
        if len(answered) < self.config.threshold:
            return self._abort(
                f"phase {closing.value}: {len(answered)} participants answered, threshold is {self.config.threshold}"
            )
        rule = _PHASES[closing]
        out = rule.close(self)
        if self.finished:  # the last phase completed the sum, or its reconstruction failed
            return out
        # Who answered one phase is whom the next waits for: U1, U2, U3, the signers.
        self.phase, self._expected, self._answered = rule.then, answered, set()
        self.next_deadline = now + _PHASES[self.phase].deadline(self._timeouts)
        return out

    def _after_advertise(self) -> list[Outgoing]:
        self._neighbours = advertised_neighbourhoods(self.config, self._adverts)
        adverts = tuple(self._adverts[u] for u in sorted(self._adverts))
        return [
            Outgoing(
                tuple(sorted(self._adverts)), AdvertisedKeys(ids=self.config.ids, advertisements=adverts)
            )
        ]

    def _after_share(self) -> list[Outgoing]:
        inbox: dict[int, list[EncryptedShare]] = {v: [] for v in self._ciphertexts}
        for u in sorted(self._ciphertexts):
            for item in self._ciphertexts[u]:
                if item.peer in inbox:
                    inbox[item.peer].append(EncryptedShare(peer=u, ciphertext=item.ciphertext))
        return [
            Outgoing((v,), ForwardedShares(ids=self.config.ids, shares=tuple(items)))
            for v, items in inbox.items()
        ]

    def _after_masked(self) -> list[Outgoing]:
        self._survivors = tuple(sorted(self._answered))
        return [Outgoing(self._survivors, SurvivorList(ids=self.config.ids, survivors=self._survivors))]

    def _after_consistency(self) -> list[Outgoing]:
        proofs = tuple(
            ConsistencyProof(signer=u, signature=self._signatures[u]) for u in sorted(self._signatures)
        )
        survivors = set(self._survivors)
        shared = set(self._ciphertexts)
        holders: dict[tuple[frozenset[int], frozenset[int]], list[int]] = {}
        for v in sorted(self._signatures):
            # v holds shares of itself and of every neighbour that shared (U2).
            owners = (self._neighbours[v] & shared) | {v}
            seeds = frozenset(owners & survivors)
            keys = frozenset(owners - survivors)
            self._requested[v] = (seeds, keys)
            holders.setdefault((seeds, keys), []).append(v)
        # Holders asked for the same shares get one message (with the full graph, that is everybody).
        return [
            Outgoing(
                tuple(recipients),
                UnmaskRequest(
                    ids=self.config.ids,
                    survivors=self._survivors,
                    signatures=proofs,
                    reveal_self_mask_of=tuple(sorted(seeds)),
                    reveal_key_of=tuple(sorted(keys)),
                ),
            )
            for (seeds, keys), recipients in holders.items()
        ]

    def _after_unmask(self) -> list[Outgoing]:
        config = self.config
        threshold = config.share_threshold(len(self._adverts))
        cache = LagrangeCache()
        suspects: set[int] = set()
        total = self._total
        try:
            for u in self._survivors:
                advert = self._adverts[u]
                seed, bad = reconstruct_verified(
                    self._seed_shares.get(u, {}),
                    threshold=threshold,
                    check=_commitment_check(config, u, advert.commitment),
                    cache=cache,
                    suspects=suspects,
                )
                suspects |= bad
                add_self_mask(total, seed, config.ids, u, config.ring_bits, -1)
            dropped = sorted(set(self._ciphertexts) - set(self._survivors))
            for u in dropped:
                advert = self._adverts[u]
                private, bad = reconstruct_verified(
                    self._key_shares.get(u, {}),
                    threshold=threshold,
                    check=_public_key_check(advert.masking_key),
                    cache=cache,
                    suspects=suspects,
                )
                suspects |= bad
                key = AgreementKey.from_private_bytes(private)
                for v in sorted(self._neighbours[u] & set(self._survivors)):
                    seed = pairwise_seed(key, self._adverts[v].masking_key, config.ids, u, v)
                    # Survivor v added p_vu = -p_uv; adding p_uv removes it.
                    add_pairwise_mask(total, seed, own=u, peer=v, ring_bits=config.ring_bits)
        except (ReconstructionFailed, CryptoFailure) as exc:
            return self._abort(f"unmasking failed: {exc}")
        self.result = AggregationResult(
            total=total,
            advertised=frozenset(self._adverts),
            shared=frozenset(self._ciphertexts),
            survivors=frozenset(self._survivors),
            signed=frozenset(self._signatures),
            responded=frozenset(self._answered),
            bad_share_senders=frozenset(suspects),
        )
        self.phase = CuratorPhase.DONE
        self.next_deadline = None
        return []

    def _abort(self, reason: str) -> list[Outgoing]:
        self.phase = CuratorPhase.ABORTED
        self.abort_reason = reason
        self.next_deadline = None
        self._total = self._total[:0]
        return [Outgoing(self.config.participants, Abort(ids=self.config.ids, reason=reason))]

    # --- introspection for tests and logs ---------------------------------------------------------------------

    @property
    def neighbours(self) -> Mapping[int, frozenset[int]]:
        return self._neighbours


@dataclass(frozen=True)
class _PhaseRule:
    """One row of the phase table: the message a phase accepts, how it stores one, how long it waits, what
    it sends when it closes with at least ``threshold`` answers, and the phase after it."""

    accepts: type
    handle: Callable[[CuratorSession, int, ParticipantMessage], None]
    deadline: Callable[[PhaseTimeouts], float]
    close: Callable[[CuratorSession], list[Outgoing]]
    then: CuratorPhase


# The protocol's phase order, once (SECAGG.md; the module docstring draws the same table). Handlers are typed
# for their own message; the rule's ``accepts`` guarantees they only ever get it, hence the ignores.
_PHASES: dict[CuratorPhase, _PhaseRule] = {
    CuratorPhase.ADVERTISE: _PhaseRule(
        AdvertiseKeys,
        CuratorSession._on_advertise,  # type: ignore[arg-type]
        lambda t: t.advertise,
        CuratorSession._after_advertise,
        CuratorPhase.SHARE,
    ),
    CuratorPhase.SHARE: _PhaseRule(
        EncryptedShares,
        CuratorSession._on_share,  # type: ignore[arg-type]
        lambda t: t.share,
        CuratorSession._after_share,
        CuratorPhase.MASKED_INPUT,
    ),
    CuratorPhase.MASKED_INPUT: _PhaseRule(
        MaskedInput,
        CuratorSession._on_masked,  # type: ignore[arg-type]
        lambda t: t.masked_input,
        CuratorSession._after_masked,
        CuratorPhase.CONSISTENCY,
    ),
    CuratorPhase.CONSISTENCY: _PhaseRule(
        ConsistencySignature,
        CuratorSession._on_consistency,  # type: ignore[arg-type]
        lambda t: t.consistency,
        CuratorSession._after_consistency,
        CuratorPhase.UNMASK,
    ),
    CuratorPhase.UNMASK: _PhaseRule(
        UnmaskShares,
        CuratorSession._on_unmask,  # type: ignore[arg-type]
        lambda t: t.unmask,
        CuratorSession._after_unmask,
        CuratorPhase.DONE,
    ),
}


def _commitment_check(config: AggregationConfig, owner: int, commitment: bytes) -> Callable[[bytes], bool]:
    return lambda seed: secure_equal(seed_commitment(seed, config.ids, owner), commitment)


def _public_key_check(public: bytes) -> Callable[[bytes], bool]:
    return lambda private: public_key_matches(private, public)


__all__ = ["AggregationResult", "CuratorPhase", "CuratorSession", "Outgoing", "PhaseTimeouts"]
