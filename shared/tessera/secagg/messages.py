"""The protocol's messages: small frozen values, one per step of SECAGG.md.

Participants are named by roster index (the Shamir x-coordinate). ``sender`` fields are claims that the
receiving state machine checks against the authenticated sender the transport reports (RabbitMQ's
``user_id``); ``ids`` bind every message to one (federation, round, aggregation).

What is signed is defined here too (``*_signed_bytes``), so signer and verifier cannot drift apart.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from tessera.secagg.config import AggregationConfig, SessionIds

RingVector: TypeAlias = npt.NDArray[np.unsignedinteger[Any]]
"""A vector of Z_R elements: uint32 for R = 2^32, uint64 for R = 2^64."""


# --- participant -> curator ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AdvertiseKeys:
    """Phase 0: fresh X25519 public keys and a commitment to the self-mask seed, signed."""

    ids: SessionIds
    sender: int
    encryption_key: bytes  # c_u public
    masking_key: bytes  # s_u public
    commitment: bytes  # H(b_u)
    signature: bytes


@dataclass(frozen=True, kw_only=True)
class EncryptedShare:
    """u's shares of s_u and b_u for one holder v, sealed under a key only u and v can derive."""

    peer: int  # the recipient when u sends it; the sender when the curator forwards it
    ciphertext: bytes


@dataclass(frozen=True, kw_only=True)
class EncryptedShares:
    """Phase 1: one ciphertext per holder of u's shares (every other member of U1, or u's neighbours)."""

    ids: SessionIds
    sender: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True, kw_only=True, eq=False)
class MaskedInput:
    """Phase 2: y_u = x_u + PRG(b_u) + sum of pairwise masks, mod R."""

    ids: SessionIds
    sender: int
    vector: RingVector


@dataclass(frozen=True, kw_only=True)
class ConsistencySignature:
    """Phase 3: u's signature over (ids, U3)."""

    ids: SessionIds
    sender: int
    signature: bytes


@dataclass(frozen=True, kw_only=True)
class RevealedShare:
    owner: int  # whose secret this is a share of
    share: bytes  # a field element, SHARE_BYTES long


@dataclass(frozen=True, kw_only=True)
class UnmaskShares:
    """Phase 4: shares of b_u for survivors and of s_u for dropped participants -- never both for one u."""

    ids: SessionIds
    sender: int
    self_mask_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]


# --- curator -> participant ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StartAggregation:
    """Opens an aggregation: the configuration every party validates before phase 0."""

    config: AggregationConfig

    @property
    def ids(self) -> SessionIds:
        return self.config.ids


@dataclass(frozen=True, kw_only=True)
class AdvertisedKeys:
    """End of phase 0: the signed advertisements of U1, broadcast to U1."""

    ids: SessionIds
    advertisements: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True, kw_only=True)
class ForwardedShares:
    """End of phase 1: the ciphertexts addressed to one participant; their senders are U2 (as it sees it)."""

    ids: SessionIds
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True, kw_only=True)
class SurvivorList:
    """End of phase 2: U3, the participants whose masked input arrived; each signs it (phase 3)."""

    ids: SessionIds
    survivors: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class ConsistencyProof:
    signer: int
    signature: bytes


@dataclass(frozen=True, kw_only=True)
class UnmaskRequest:
    """End of phase 3: U3 with at least t signatures over it, and which shares the curator asks for."""

    ids: SessionIds
    survivors: tuple[int, ...]
    signatures: tuple[ConsistencyProof, ...]
    reveal_self_mask_of: tuple[int, ...]
    reveal_key_of: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Abort:
    """The curator abandoned the aggregation; participants discard its keys and never reuse them."""

    ids: SessionIds
    reason: str


ParticipantMessage: TypeAlias = (
    AdvertiseKeys | EncryptedShares | MaskedInput | ConsistencySignature | UnmaskShares
)
CuratorMessage: TypeAlias = (
    StartAggregation | AdvertisedKeys | ForwardedShares | SurvivorList | UnmaskRequest | Abort
)
Message: TypeAlias = ParticipantMessage | CuratorMessage


# --- what gets signed ----------------------------------------------------------------------------------------


def advertisement_signed_bytes(
    ids: SessionIds, sender: int, encryption_key: bytes, masking_key: bytes, commitment: bytes
) -> bytes:
    return (
        ids.context() + b"|advertise|" + struct.pack(">I", sender) + encryption_key + masking_key + commitment
    )


def consistency_signed_bytes(ids: SessionIds, survivors: tuple[int, ...]) -> bytes:
    return ids.context() + b"|survivors|" + struct.pack(f">I{len(survivors)}I", len(survivors), *survivors)


__all__ = [
    "Abort",
    "AdvertiseKeys",
    "AdvertisedKeys",
    "ConsistencyProof",
    "ConsistencySignature",
    "CuratorMessage",
    "EncryptedShare",
    "EncryptedShares",
    "ForwardedShares",
    "MaskedInput",
    "Message",
    "ParticipantMessage",
    "RevealedShare",
    "RingVector",
    "StartAggregation",
    "SurvivorList",
    "UnmaskRequest",
    "UnmaskShares",
    "advertisement_signed_bytes",
    "consistency_signed_bytes",
]
