"""The participant's side of secure aggregation as a sans-I/O state machine (SECAGG.md).

Rules, in the order they apply:

    state            accepts              sends                      then
    ---------------  -------------------  -------------------------  ---------------
    READY            StartAggregation     AdvertiseKeys              ADVERTISED
    ADVERTISED       AdvertisedKeys (U1)  EncryptedShares            SHARED
    SHARED           ForwardedShares(U2)  MaskedInput                MASKED
    MASKED           SurvivorList (U3)    ConsistencySignature       SIGNED
    SIGNED           UnmaskRequest        UnmaskShares               DONE
    any but DONE     Abort                nothing                    ABORTED

A message that does not fit -- wrong ids, wrong phase, bad signature, a roster outsider, a U3 that differs
from the signed one, a request for both shares of one participant -- raises :class:`ProtocolError` and leaves
the state exactly as it was, so a correct retransmission can still proceed. Checks run before any state is
touched; new state is assigned at the end of each handler.

Nothing here touches a socket or a clock; randomness comes in as ``rand``. Keys are fresh per session:
a session is one aggregation and is never restarted (a retried round creates a new session).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from tessera.crypto import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    AgreementKey,
    CryptoFailure,
    RandomSource,
    SigningKey,
    check_agreement_public_key,
    open_sealed,
    seal,
    system_random,
    verify_signature,
)
from tessera.errors import ConfigurationError, LocalUsageError, ProtocolError
from tessera.secagg._common import (
    SHARE_PLAINTEXT_BYTES,
    add_pairwise_mask,
    add_self_mask,
    advertised_neighbourhoods,
    encode_share_plaintext,
    pairwise_seed,
    seed_commitment,
    share_associated_data,
    share_key,
)
from tessera.secagg.config import AggregationConfig, ParticipantPolicy, Roster
from tessera.secagg.messages import (
    Abort,
    AdvertisedKeys,
    AdvertiseKeys,
    ConsistencySignature,
    CuratorMessage,
    EncryptedShare,
    EncryptedShares,
    ForwardedShares,
    MaskedInput,
    ParticipantMessage,
    RevealedShare,
    RingVector,
    StartAggregation,
    SurvivorList,
    UnmaskRequest,
    UnmaskShares,
    advertisement_signed_bytes,
    consistency_signed_bytes,
)
from tessera.secagg.shamir import SHARE_BYTES, decode_share, encode_share, share_secret


class ParticipantState(enum.Enum):
    READY = "ready"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    SIGNED = "signed"
    DONE = "done"
    ABORTED = "aborted"


class ParticipantSession:
    """One participant in one aggregation.

    ``receive`` takes a message from the curator and returns the messages to send back (at most one).
    ``share_problems`` lists forwarded ciphertexts that failed to open (a tampering curator or peer): the
    session still masks against their senders -- membership of U2 is what the masks depend on -- but cannot
    contribute their shares when unmasking.
    """

    def __init__(
        self,
        *,
        index: int,
        identity: SigningKey,
        roster: Roster,
        policy: ParticipantPolicy,
        vector: RingVector,
        rand: RandomSource = system_random,
    ) -> None:
        if index not in roster:
            raise LocalUsageError(f"participant {index} is not in the roster")
        if roster.key(index) != identity.public_bytes:
            raise LocalUsageError(f"the identity key does not match roster entry {index}")
        expected = np.uint32 if policy.ring_bits == 32 else np.uint64
        if vector.ndim != 1 or vector.dtype != expected or vector.shape[0] != policy.vector_length:
            raise LocalUsageError(
                f"input must be a 1-D {np.dtype(expected).name} vector of length {policy.vector_length}"
            )
        self.index = index
        self._identity = identity
        self._roster = roster
        self._policy = policy
        self._vector = vector
        self._rand = rand
        self.state = ParticipantState.READY
        self.share_problems: list[ProtocolError] = []
        self.abort_reason: str | None = None
        self._config: AggregationConfig | None = None
        self._encryption_key: AgreementKey | None = None
        self._masking_key: AgreementKey | None = None
        self._seed = b""
        self._advertised: dict[int, AdvertiseKeys] = {}
        self._neighbours: frozenset[int] = frozenset()
        self._own_shares: tuple[int, int] = (0, 0)  # own share of (s_u, b_u)
        self._held: dict[int, tuple[int, int]] = {}  # owner -> (share of s_owner, share of b_owner)
        self._u2: frozenset[int] = frozenset()  # senders this participant got shares from, plus itself
        # The masked input computed ahead of ForwardedShares (prepare_masked_input) against these peers.
        self._premasked: RingVector | None = None
        self._premasked_peers: frozenset[int] = frozenset()
        self._survivors: tuple[int, ...] = ()

    # --- dispatch ---------------------------------------------------------------------------------------------

    @property
    def config(self) -> AggregationConfig:
        if self._config is None:
            raise LocalUsageError("no aggregation has started yet")
        return self._config

    def receive(self, message: CuratorMessage) -> list[ParticipantMessage]:
        """Handle one message from the curator; raises ProtocolError (state unchanged) if it does not fit."""
        handler = self._HANDLERS.get((self.state, type(message)))
        if isinstance(message, Abort):
            return self._on_abort(message)
        if self.state is not ParticipantState.READY:
            self._check_ids(message)
        if handler is None:
            raise ProtocolError(
                f"{type(message).__name__} is not expected in state {self.state.value}", sender="curator"
            )
        try:
            return handler(self, message)
        except CryptoFailure as exc:  # never let a crypto error out as anything but the session's own
            raise ProtocolError(
                f"{type(message).__name__} failed a cryptographic check: {exc}", sender="curator"
            ) from exc

    def _check_ids(self, message: CuratorMessage) -> None:
        if message.ids != self.config.ids:
            raise ProtocolError(
                f"message for {message.ids}, this session is {self.config.ids}", sender="curator"
            )

    # --- phase 0 ----------------------------------------------------------------------------------------------

    def _on_start(self, message: StartAggregation) -> list[ParticipantMessage]:
        config = message.config
        try:
            config.validate()
            self._policy.check(config, self.index)
        except ConfigurationError as exc:
            raise ProtocolError(f"unacceptable configuration: {exc}", sender="curator") from exc
        outsiders = [u for u in config.participants if u not in self._roster]
        if outsiders:
            raise ProtocolError(f"invited participants {outsiders} are not in the roster", sender="curator")
        encryption_key = AgreementKey.generate(self._rand)
        masking_key = AgreementKey.generate(self._rand)
        seed = self._rand(KEY_BYTES)
        commitment = seed_commitment(seed, config.ids, self.index)
        signed = advertisement_signed_bytes(
            config.ids, self.index, encryption_key.public_bytes, masking_key.public_bytes, commitment
        )
        advert = AdvertiseKeys(
            ids=config.ids,
            sender=self.index,
            encryption_key=encryption_key.public_bytes,
            masking_key=masking_key.public_bytes,
            commitment=commitment,
            signature=self._identity.sign(signed),
        )
        self._config, self._encryption_key, self._masking_key, self._seed = (
            config,
            encryption_key,
            masking_key,
            seed,
        )
        self._advertised = {self.index: advert}
        self.state = ParticipantState.ADVERTISED
        return [advert]

    # --- phase 1 ----------------------------------------------------------------------------------------------

    def _on_advertised(self, message: AdvertisedKeys) -> list[ParticipantMessage]:
        config = self.config
        adverts: dict[int, AdvertiseKeys] = {}
        for advert in message.advertisements:
            u = advert.sender
            if u in adverts:
                raise ProtocolError(f"participant {u} advertised twice", sender="curator")
            if u not in config.participants:
                raise ProtocolError(f"participant {u} is not invited to this aggregation", sender="curator")
            if advert.ids != config.ids:
                raise ProtocolError(f"advertisement of {u} is for {advert.ids}", sender="curator")
            try:
                verify_signature(
                    self._roster.key(u),
                    advertisement_signed_bytes(
                        advert.ids, u, advert.encryption_key, advert.masking_key, advert.commitment
                    ),
                    advert.signature,
                )
            except CryptoFailure as exc:
                raise ProtocolError(
                    f"advertisement of participant {u} has a bad signature", sender="curator"
                ) from exc
            try:
                check_agreement_public_key(advert.encryption_key)
                check_agreement_public_key(advert.masking_key)
            except CryptoFailure as exc:
                # Signed by u itself, so u is hostile, and an honest curator leaves such an advertiser out
                # of U1: this curator forwarded it. Refuse the round (nothing has been revealed yet).
                raise ProtocolError(
                    f"advertisement of participant {u} carries a low-order or invalid X25519 key",
                    sender="curator",
                ) from exc
            adverts[u] = advert
        own = self._advertised[self.index]
        if adverts.get(self.index) != own:
            raise ProtocolError(
                "this participant's own advertisement is missing or altered", sender="curator"
            )
        if len(adverts) < config.threshold:
            raise ProtocolError(
                f"|U1| = {len(adverts)} is below the threshold {config.threshold}", sender="curator"
            )

        neighbours = advertised_neighbourhoods(config, adverts)[self.index]
        holders = sorted(neighbours | {self.index})
        threshold = config.share_threshold(len(adverts))
        assert self._masking_key is not None and self._encryption_key is not None
        key_shares = share_secret(
            self._masking_key.private_bytes(), threshold=threshold, xs=holders, rand=self._rand
        )
        seed_shares = share_secret(self._seed, threshold=threshold, xs=holders, rand=self._rand)
        sealed = []
        for v in sorted(neighbours):
            key = share_key(self._encryption_key, adverts[v].encryption_key, config.ids, self.index, v)
            plaintext = encode_share_plaintext(self.index, v, key_shares[v], seed_shares[v])
            ciphertext = seal(
                key,
                plaintext,
                associated_data=share_associated_data(config.ids, self.index, v),
                rand=self._rand,
            )
            sealed.append(EncryptedShare(peer=v, ciphertext=ciphertext))
        self._advertised = adverts
        self._neighbours = neighbours
        self._own_shares = (key_shares[self.index], seed_shares[self.index])
        self.state = ParticipantState.SHARED
        return [EncryptedShares(ids=config.ids, sender=self.index, shares=tuple(sealed))]

    # --- phase 2 ----------------------------------------------------------------------------------------------

    def prepare_masked_input(self) -> bool:
        """Compute the masked input now, against every neighbour that advertised keys, so that answering
        ForwardedShares costs one copy instead of n - 1 keystreams. Optional, and the result is the same.

        Meant for the driver to call right after sending its shares, while the curator collects everybody
        else's: that wait is otherwise idle. Neighbours whose shares do not arrive (they dropped between the
        two phases) have their masks taken out again then. Returns whether it did anything (only in the
        state after ShareKeys, once).
        """
        if self.state is not ParticipantState.SHARED or self._premasked is not None:
            return False
        try:
            self._premasked = self._mask(self._neighbours)
        except CryptoFailure:  # cannot happen with validated keys; ForwardedShares would report it
            return False
        self._premasked_peers = self._neighbours
        return True

    def _mask(self, peers: frozenset[int]) -> RingVector:
        """The input plus the self mask plus the pairwise mask with each of ``peers``."""
        config = self.config
        assert self._masking_key is not None
        masked = self._vector.copy()
        add_self_mask(masked, self._seed, config.ids, self.index, config.ring_bits, +1)
        for v in sorted(peers - {self.index}):
            seed = pairwise_seed(
                self._masking_key, self._advertised[v].masking_key, config.ids, self.index, v
            )
            add_pairwise_mask(masked, seed, own=self.index, peer=v, ring_bits=config.ring_bits)
        return masked

    def _on_forwarded(self, message: ForwardedShares) -> list[ParticipantMessage]:
        config = self.config
        senders = [item.peer for item in message.shares]
        if len(set(senders)) != len(senders):
            raise ProtocolError("forwarded shares name a sender twice", sender="curator")
        strangers = sorted(set(senders) - self._neighbours)
        if strangers:
            raise ProtocolError(f"forwarded shares from non-neighbours {strangers}", sender="curator")
        u2 = frozenset(senders) | {self.index}
        if len(u2) < config.share_threshold(len(self._advertised)):
            raise ProtocolError(f"only {len(u2)} holders left, below the share threshold", sender="curator")

        assert self._encryption_key is not None and self._masking_key is not None
        held: dict[int, tuple[int, int]] = {}
        problems: list[ProtocolError] = []
        for item in message.shares:
            u = item.peer
            try:
                key = share_key(
                    self._encryption_key, self._advertised[u].encryption_key, config.ids, u, self.index
                )
                plaintext = open_sealed(
                    key, item.ciphertext, associated_data=share_associated_data(config.ids, u, self.index)
                )
                held[u] = self._parse_share_plaintext(plaintext, owner=u)
            except (CryptoFailure, ValueError) as exc:
                problems.append(
                    ProtocolError(f"share ciphertext from participant {u} does not open: {exc}", sender=u)
                )

        if self._premasked is None:
            masked = self._mask(u2)
        else:
            # Masked ahead against all neighbours in U1: take out the masks of those not in U2. (u2 is a
            # subset of the neighbours plus this participant: strangers were refused above.)
            # Seeds first: the only step that can fail, and it must fail before anything changes.
            gone = {
                v: pairwise_seed(
                    self._masking_key, self._advertised[v].masking_key, config.ids, self.index, v
                )
                for v in sorted(self._premasked_peers - u2)
            }
            masked, self._premasked = self._premasked, None
            for v, seed in gone.items():
                # Adding the pair's mask with the roles swapped is subtracting it.
                add_pairwise_mask(masked, seed, own=v, peer=self.index, ring_bits=config.ring_bits)
        self._held = held
        self._u2 = u2
        self.share_problems.extend(problems)
        self.state = ParticipantState.MASKED
        return [MaskedInput(ids=config.ids, sender=self.index, vector=masked)]

    def _parse_share_plaintext(self, plaintext: bytes, *, owner: int) -> tuple[int, int]:
        if len(plaintext) != SHARE_PLAINTEXT_BYTES:
            raise ValueError("wrong share plaintext length")
        claimed_owner = int.from_bytes(plaintext[0:4], "big")
        claimed_holder = int.from_bytes(plaintext[4:8], "big")
        if claimed_owner != owner or claimed_holder != self.index:
            raise ValueError("share plaintext names the wrong owner or holder")
        key_share = decode_share(plaintext[8 : 8 + SHARE_BYTES])
        seed_share = decode_share(plaintext[8 + SHARE_BYTES :])
        return key_share, seed_share

    # --- phase 3 ----------------------------------------------------------------------------------------------

    def _on_survivors(self, message: SurvivorList) -> list[ParticipantMessage]:
        config = self.config
        survivors = message.survivors
        if list(survivors) != sorted(set(survivors)):
            raise ProtocolError("survivor list must be strictly ascending", sender="curator")
        if self.index not in survivors:
            raise ProtocolError(
                "survivor list omits this participant, which sent its masked input", sender="curator"
            )
        if len(survivors) < config.threshold:
            raise ProtocolError(
                f"|U3| = {len(survivors)} is below the threshold {config.threshold}", sender="curator"
            )
        unknown = [u for u in survivors if u not in self._advertised]
        if unknown:
            raise ProtocolError(f"survivors {unknown} never advertised keys", sender="curator")
        # Within this participant's view, a survivor must have shared keys (U3 is a subset of U2).
        unshared = [u for u in survivors if (u in self._neighbours or u == self.index) and u not in self._u2]
        if unshared:
            raise ProtocolError(f"survivors {unshared} never shared their keys", sender="curator")
        signature = self._identity.sign(consistency_signed_bytes(config.ids, survivors))
        self._survivors = survivors
        self.state = ParticipantState.SIGNED
        return [ConsistencySignature(ids=config.ids, sender=self.index, signature=signature)]

    # --- phase 4 ----------------------------------------------------------------------------------------------

    def _on_unmask(self, message: UnmaskRequest) -> list[ParticipantMessage]:
        config = self.config
        if message.survivors != self._survivors:
            raise ProtocolError(
                "unmask request presents a U3 different from the one this participant signed; refused",
                sender="curator",
            )
        self._check_consistency_proofs(message)
        seed_owners, key_owners = set(message.reveal_self_mask_of), set(message.reveal_key_of)
        both = sorted(seed_owners & key_owners)
        if both:
            raise ProtocolError(
                f"curator asked for both shares of participants {both}; refused", sender="curator"
            )
        survivors = set(self._survivors)
        if not seed_owners <= survivors:
            raise ProtocolError(
                f"asked for self-mask shares of non-survivors {sorted(seed_owners - survivors)}; refused",
                sender="curator",
            )
        if key_owners & survivors:
            raise ProtocolError(
                f"asked for mask-key shares of survivors {sorted(key_owners & survivors)}; refused",
                sender="curator",
            )
        strangers = sorted((seed_owners | key_owners) - self._u2)
        if strangers:
            raise ProtocolError(
                f"asked for shares of {strangers}, which did not share with us", sender="curator"
            )
        held = dict(self._held)
        held[self.index] = self._own_shares
        seed_shares = tuple(
            RevealedShare(owner=u, share=encode_share(held[u][1])) for u in sorted(seed_owners) if u in held
        )
        key_shares = tuple(
            RevealedShare(owner=u, share=encode_share(held[u][0])) for u in sorted(key_owners) if u in held
        )
        self._discard_secrets()
        self.state = ParticipantState.DONE
        return [
            UnmaskShares(
                ids=config.ids, sender=self.index, self_mask_shares=seed_shares, key_shares=key_shares
            )
        ]

    def _check_consistency_proofs(self, message: UnmaskRequest) -> None:
        config = self.config
        signed = consistency_signed_bytes(config.ids, self._survivors)
        signers: set[int] = set()
        for proof in message.signatures:
            if proof.signer in signers:
                raise ProtocolError(
                    f"consistency signature of {proof.signer} appears twice", sender="curator"
                )
            if proof.signer not in self._survivors or proof.signer not in self._roster:
                raise ProtocolError(
                    f"consistency signature from non-survivor {proof.signer}", sender="curator"
                )
            if len(proof.signature) != SIGNATURE_BYTES:
                raise ProtocolError(f"consistency signature of {proof.signer} is malformed", sender="curator")
            signers.add(proof.signer)
        # t valid signatures over our U3 are what the check needs; verifying more only costs time.
        valid = 0
        for proof in message.signatures:
            if valid >= config.threshold:
                break
            try:
                verify_signature(self._roster.key(proof.signer), signed, proof.signature)
            except CryptoFailure as exc:
                raise ProtocolError(
                    f"consistency signature of {proof.signer} does not verify over the signed U3",
                    sender="curator",
                ) from exc
            valid += 1
        if valid < config.threshold:
            raise ProtocolError(
                f"{valid} consistency signatures, {config.threshold} needed; refusing to unmask",
                sender="curator",
            )

    # --- abort ------------------------------------------------------------------------------------------------

    def _on_abort(self, message: Abort) -> list[ParticipantMessage]:
        if self._config is None or message.ids != self._config.ids:
            raise ProtocolError(f"abort for {message.ids} does not match this session", sender="curator")
        if self.state is ParticipantState.DONE:
            return []
        self._discard_secrets()
        self.abort_reason = message.reason
        self.state = ParticipantState.ABORTED
        return []

    def _discard_secrets(self) -> None:
        self._masking_key = self._encryption_key = None
        self._seed = b""
        self._premasked = None
        self._held = {}
        self._own_shares = (0, 0)

    _HANDLERS: ClassVar[
        dict[
            tuple[ParticipantState, type],
            Callable[[ParticipantSession, CuratorMessage], list[ParticipantMessage]],
        ]
    ] = {
        (ParticipantState.READY, StartAggregation): _on_start,  # type: ignore[dict-item]
        (ParticipantState.ADVERTISED, AdvertisedKeys): _on_advertised,  # type: ignore[dict-item]
        (ParticipantState.SHARED, ForwardedShares): _on_forwarded,  # type: ignore[dict-item]
        (ParticipantState.MASKED, SurvivorList): _on_survivors,  # type: ignore[dict-item]
        (ParticipantState.SIGNED, UnmaskRequest): _on_unmask,  # type: ignore[dict-item]
    }


__all__ = ["ParticipantSession", "ParticipantState"]
