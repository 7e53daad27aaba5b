"""Derivations both sides of the protocol must compute identically (SECAGG.md, phases 1, 2 and 4)."""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Mapping

from tessera.crypto import KEY_BYTES, AgreementKey, add_mask_stream, commit, hkdf
from tessera.secagg.config import AggregationConfig, RingBits, SessionIds, neighbourhoods
from tessera.secagg.messages import AdvertiseKeys, RingVector
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


# scrypt (RFC 7914) parameters of the graph seed: 16 MiB and about 40-60 ms here per evaluation, paid once per
# sparse aggregation by every party, and by a grinding curator once per candidate U1.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def graph_seed(config: AggregationConfig, adverts: Mapping[int, AdvertiseKeys]) -> bytes:
    """The SecAgg+ graph's seed, derived from the signed advertisements of U1 and the ids.

    Every advertisement holds two fresh X25519 keys and a commitment made by its sender after the curator sent
    the configuration, and signed; the curator can neither forge nor alter them, so its only lever on the
    graph is which advertisers it leaves out of U1. Each such choice costs it one scrypt evaluation, and each
    candidate graph is an independent random Harary graph (see docs/design-notes.md for the bound).
    """
    h = hashlib.sha256(b"tessera-secagg-graph-v1\x00" + config.ids.context() + config.graph_seed)
    for u in sorted(adverts):
        advert = adverts[u]
        h.update(struct.pack(">I", u) + advert.encryption_key + advert.masking_key + advert.commitment)
    return _stretch(h.digest())


@functools.lru_cache(maxsize=64)
def _stretch(digest: bytes) -> bytes:
    # Cached because in-process drivers (the simulation, tests) run every party in one process; each deployed
    # party computes it once per aggregation anyway.
    return hashlib.scrypt(
        digest,
        salt=b"tessera-secagg-graph-v1",
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        maxmem=64 * 1024 * 1024,
        dklen=KEY_BYTES,
    )


def advertised_neighbourhoods(
    config: AggregationConfig, adverts: Mapping[int, AdvertiseKeys]
) -> dict[int, frozenset[int]]:
    """Each member of U1's neighbours, the sparse graph seeded by :func:`graph_seed` (no seed for the full one)."""
    if not config.is_sparse_for(len(adverts)):
        return neighbourhoods(config, adverts)
    return neighbourhoods(config, adverts, seed=graph_seed(config, adverts))


def _check_ring(acc: RingVector, ring_bits: RingBits) -> None:
    if acc.dtype.itemsize * 8 != ring_bits:
        raise ValueError(f"a {acc.dtype} vector is not in the {ring_bits}-bit ring")


__all__ = [
    "KEY_BYTES",
    "SHARE_PLAINTEXT_BYTES",
    "add_pairwise_mask",
    "add_self_mask",
    "advertised_neighbourhoods",
    "encode_share_plaintext",
    "graph_seed",
    "pairwise_seed",
    "seed_commitment",
    "self_mask_seed",
    "share_associated_data",
    "share_key",
]
