"""Derivations both sides of the protocol must compute identically (SECAGG.md, phases 1, 2 and 4)."""

from __future__ import annotations

import struct

from tessera.crypto import KEY_BYTES, AgreementKey, add_mask_stream, commit, hkdf
from tessera.secagg.config import RingBits, SessionIds
from tessera.secagg.messages import RingVector
from tessera.secagg.shamir import SHARE_BYTES

SHARE_PLAINTEXT_BYTES = 8 + 2 * SHARE_BYTES  # owner, holder, share of s_u, share of b_u


def _pair(a: int, b: int) -> bytes:
    return struct.pack(">II", a, b)


def share_key(own: AgreementKey, peer_public: bytes, ids: SessionIds, sender: int, recipient: int) -> bytes:
    """AEAD key for shares sent from ``sender`` to ``recipient``: one key per direction, used once."""
    return own.derive(peer_public, context=ids.context(), purpose=b"share|" + _pair(sender, recipient))


def share_associated_data(ids: SessionIds, sender: int, recipient: int) -> bytes:
    return ids.context() + b"|share|" + _pair(sender, recipient)


def encode_share_plaintext(owner: int, holder: int, key_share: int, seed_share: int) -> bytes:
    return (
        _pair(owner, holder)
        + key_share.to_bytes(SHARE_BYTES, "big")
        + seed_share.to_bytes(SHARE_BYTES, "big")
    )


def pairwise_seed(own: AgreementKey, peer_public: bytes, ids: SessionIds, u: int, v: int) -> bytes:
    """s_uv: the same 32 bytes for (u, v) and (v, u)."""
    return own.derive(peer_public, context=ids.context(), purpose=b"mask|" + _pair(min(u, v), max(u, v)))


def self_mask_seed(seed: bytes, ids: SessionIds, owner: int) -> bytes:
    return hkdf(seed, context=ids.context(), purpose=b"self-mask|" + struct.pack(">I", owner))


def seed_commitment(seed: bytes, ids: SessionIds, owner: int) -> bytes:
    return commit(seed, context=ids.context() + struct.pack(">I", owner))


def add_pairwise_mask(acc: RingVector, seed: bytes, *, own: int, peer: int, ring_bits: RingBits) -> None:
    """acc += p_(own,peer): +PRG(s_uv) if own < peer else -PRG(s_uv), mod R, in place."""
    _check_ring(acc, ring_bits)
    add_mask_stream(acc, seed, subtract=own > peer)


def add_self_mask(
    acc: RingVector, seed: bytes, ids: SessionIds, owner: int, ring_bits: RingBits, sign: int
) -> None:
    _check_ring(acc, ring_bits)
    add_mask_stream(acc, self_mask_seed(seed, ids, owner), subtract=sign < 0)


def _check_ring(acc: RingVector, ring_bits: RingBits) -> None:
    if acc.dtype.itemsize * 8 != ring_bits:
        raise ValueError(f"a {acc.dtype} vector is not in the {ring_bits}-bit ring")


__all__ = [
    "KEY_BYTES",
    "SHARE_PLAINTEXT_BYTES",
    "add_pairwise_mask",
    "add_self_mask",
    "encode_share_plaintext",
    "pairwise_seed",
    "seed_commitment",
    "self_mask_seed",
    "share_associated_data",
    "share_key",
]
