"""Binary wire format of the secure-aggregation messages: versioned, typed, strictly validated.

Layout of every message (big-endian integers)::

    magic "TSA" | version u8 | type u8 | ids | body

    ids  = federation (u8 length + ASCII) | round u64 | aggregation (u8 length + ASCII)

Vectors travel as raw little-endian ring elements: m elements of Z_(2^32) take exactly 4m bytes, not a JSON
list. Counts and lengths are checked against :class:`WireLimits`, derived from the federation's size, the
vector length and the ring, *before* anything is allocated; the whole message must be consumed exactly.

:func:`decode` never raises anything but :class:`ProtocolError` for any input bytes whatsoever (property-tested
with random and mutated inputs), so a transport can hand it untrusted payloads directly.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tessera.crypto import KEY_BYTES, SEAL_OVERHEAD, SIGNATURE_BYTES
from tessera.errors import ConfigurationError, ProtocolError
from tessera.secagg._common import SHARE_PLAINTEXT_BYTES
from tessera.secagg.config import MAX_PARTICIPANTS, AggregationConfig, Graph, RingBits, SessionIds
from tessera.secagg.messages import (
    Abort,
    AdvertisedKeys,
    AdvertiseKeys,
    ConsistencyProof,
    ConsistencySignature,
    EncryptedShare,
    EncryptedShares,
    ForwardedShares,
    MaskedInput,
    Message,
    RevealedShare,
    StartAggregation,
    SurvivorList,
    UnmaskRequest,
    UnmaskShares,
)
from tessera.secagg.shamir import SHARE_BYTES

MAGIC = b"TSA"
VERSION = 1
MAX_REASON_BYTES = 1024
_CIPHERTEXT_BYTES = SHARE_PLAINTEXT_BYTES + SEAL_OVERHEAD
_IDS_MAX = 1 + 32 + 8 + 1 + 64
_HEADER = len(MAGIC) + 2


@dataclass(frozen=True, kw_only=True)
class WireLimits:
    """Bounds for decoding, from the federation's roster size, the vector length and the ring."""

    max_participants: int
    vector_length: int
    ring_bits: RingBits

    @classmethod
    def for_config(cls, config: AggregationConfig) -> WireLimits:
        return cls(max_participants=config.n, vector_length=config.vector_length, ring_bits=config.ring_bits)

    def __post_init__(self) -> None:
        if not 1 <= self.max_participants <= MAX_PARTICIPANTS:
            raise ConfigurationError(f"max_participants must be in [1, {MAX_PARTICIPANTS}]")
        if self.vector_length < 1 or self.ring_bits not in (32, 64):
            raise ConfigurationError("vector_length must be >= 1 and ring_bits 32 or 64")

    @property
    def max_message_bytes(self) -> int:
        """The largest message any party may send under these limits (a masked input, usually)."""
        n = self.max_participants
        vector = 4 + 1 + 8 + self.vector_length * self.ring_bits // 8
        advert = 4 + 3 * KEY_BYTES + SIGNATURE_BYTES
        shares = 4 + 4 + n * (4 + 2 + _CIPHERTEXT_BYTES)
        request = 4 * 4 + n * (4 + 4 + SIGNATURE_BYTES + 4 + 4)
        unmask = 4 + 8 + 2 * n * (4 + SHARE_BYTES)
        start = 4 + 4 * n + 4 + 8 + 2 + 8 + KEY_BYTES
        body = max(vector, 4 + n * advert, shares, request, unmask, start, 2 + MAX_REASON_BYTES)
        return _HEADER + _IDS_MAX + body


class _Reader:
    """Cursor over untrusted bytes; every shortfall is a ProtocolError."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise ProtocolError(f"message truncated: wanted {n} bytes at offset {self._pos}")
        out = bytes(self._data[self._pos : end])
        self._pos = end
        return out

    def view(self, n: int) -> memoryview:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise ProtocolError(f"message truncated: wanted {n} bytes at offset {self._pos}")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack(">Q", self.take(8))[0]
        return value

    def count(self, limit: int, what: str) -> int:
        n = self.u32()
        if n > limit:
            raise ProtocolError(f"{what}: {n} entries, at most {limit} allowed")
        return n

    def ascii(self, what: str) -> str:
        raw = self.take(self.u8())
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"{what} is not ASCII") from exc

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise ProtocolError(f"{len(self._data) - self._pos} trailing bytes after the message")


# --- writing ---------------------------------------------------------------------------------------------------


def _ids(ids: SessionIds) -> bytes:
    fed, agg = ids.federation.encode(), ids.aggregation.encode()
    return struct.pack(">B", len(fed)) + fed + struct.pack(">QB", ids.round, len(agg)) + agg


def _u32s(values: tuple[int, ...]) -> bytes:
    return struct.pack(f">I{len(values)}I", len(values), *values)


def _encrypted(items: tuple[EncryptedShare, ...]) -> bytes:
    parts = [struct.pack(">I", len(items))]
    for item in items:
        parts.append(struct.pack(">IH", item.peer, len(item.ciphertext)) + item.ciphertext)
    return b"".join(parts)


def _revealed(items: tuple[RevealedShare, ...]) -> bytes:
    return struct.pack(">I", len(items)) + b"".join(struct.pack(">I", i.owner) + i.share for i in items)


def _advert_body(m: AdvertiseKeys) -> bytes:
    return struct.pack(">I", m.sender) + m.encryption_key + m.masking_key + m.commitment + m.signature


def _write_start(m: StartAggregation) -> bytes:
    c = m.config
    return (
        _u32s(c.participants)
        + struct.pack(
            ">IQBBII",
            c.threshold,
            c.vector_length,
            c.ring_bits,
            c.graph is Graph.SPARSE,
            c.neighbours,
            c.neighbourhood_threshold,
        )
        + c.graph_seed
    )


def _write_masked(m: MaskedInput) -> bytes:
    width = m.vector.dtype.itemsize
    little = m.vector.astype(f"<u{width}", copy=False)
    return struct.pack(">IBQ", m.sender, width * 8, little.shape[0]) + little.tobytes()


def _write_advertised(m: AdvertisedKeys) -> bytes:
    return struct.pack(">I", len(m.advertisements)) + b"".join(_advert_body(a) for a in m.advertisements)


def _write_shares(m: EncryptedShares) -> bytes:
    return struct.pack(">I", m.sender) + _encrypted(m.shares)


def _write_forwarded(m: ForwardedShares) -> bytes:
    return _encrypted(m.shares)


def _write_survivors(m: SurvivorList) -> bytes:
    return _u32s(m.survivors)


def _write_signature(m: ConsistencySignature) -> bytes:
    return struct.pack(">I", m.sender) + m.signature


def _write_request(m: UnmaskRequest) -> bytes:
    proofs = b"".join(struct.pack(">I", p.signer) + p.signature for p in m.signatures)
    return (
        _u32s(m.survivors)
        + struct.pack(">I", len(m.signatures))
        + proofs
        + _u32s(m.reveal_self_mask_of)
        + _u32s(m.reveal_key_of)
    )


def _write_unmask(m: UnmaskShares) -> bytes:
    return struct.pack(">I", m.sender) + _revealed(m.self_mask_shares) + _revealed(m.key_shares)


def _write_abort(m: Abort) -> bytes:
    reason = m.reason.encode()[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode()
    return struct.pack(">H", len(reason)) + reason


# Each writer takes exactly its own message type; the table is keyed by that type, hence Any.
_WRITERS: dict[type, tuple[int, Callable[[Any], bytes]]] = {
    StartAggregation: (1, _write_start),
    AdvertiseKeys: (2, _advert_body),
    AdvertisedKeys: (3, _write_advertised),
    EncryptedShares: (4, _write_shares),
    ForwardedShares: (5, _write_forwarded),
    MaskedInput: (6, _write_masked),
    SurvivorList: (7, _write_survivors),
    ConsistencySignature: (8, _write_signature),
    UnmaskRequest: (9, _write_request),
    UnmaskShares: (10, _write_unmask),
    Abort: (11, _write_abort),
}


def encode(message: Message) -> bytes:
    """Serialise a protocol message."""
    type_code, writer = _WRITERS[type(message)]
    return MAGIC + bytes((VERSION, type_code)) + _ids(message.ids) + writer(message)


# --- reading ---------------------------------------------------------------------------------------------------


def _read_ids(r: _Reader) -> SessionIds:
    federation = r.ascii("federation id")
    round_id = r.u64()
    aggregation = r.ascii("aggregation id")
    try:
        return SessionIds(federation=federation, round=round_id, aggregation=aggregation)
    except ConfigurationError as exc:
        raise ProtocolError(f"invalid ids: {exc}") from exc


def _read_index_list(r: _Reader, limits: WireLimits, what: str) -> tuple[int, ...]:
    n = r.count(limits.max_participants, what)
    return tuple(r.u32() for _ in range(n))


def _read_advert(r: _Reader, ids: SessionIds) -> AdvertiseKeys:
    return AdvertiseKeys(
        ids=ids,
        sender=r.u32(),
        encryption_key=r.take(KEY_BYTES),
        masking_key=r.take(KEY_BYTES),
        commitment=r.take(KEY_BYTES),
        signature=r.take(SIGNATURE_BYTES),
    )


def _read_encrypted(r: _Reader, limits: WireLimits) -> tuple[EncryptedShare, ...]:
    n = r.count(limits.max_participants, "encrypted shares")
    items = []
    for _ in range(n):
        peer, length = r.u32(), r.u16()
        if length != _CIPHERTEXT_BYTES:
            raise ProtocolError(f"share ciphertext of {length} bytes, expected {_CIPHERTEXT_BYTES}")
        items.append(EncryptedShare(peer=peer, ciphertext=r.take(length)))
    return tuple(items)


def _read_revealed(r: _Reader, limits: WireLimits) -> tuple[RevealedShare, ...]:
    n = r.count(limits.max_participants, "revealed shares")
    return tuple(RevealedShare(owner=r.u32(), share=r.take(SHARE_BYTES)) for _ in range(n))


def _read_start(r: _Reader, ids: SessionIds, limits: WireLimits) -> StartAggregation:
    participants = _read_index_list(r, limits, "participants")
    threshold, vector_length, ring_bits, sparse, neighbours, n_threshold = struct.unpack(
        ">IQBBII", r.take(22)
    )
    seed = r.take(KEY_BYTES)
    if sparse not in (0, 1):
        raise ProtocolError("graph flag must be 0 or 1")
    if vector_length != limits.vector_length or ring_bits != limits.ring_bits:
        raise ProtocolError(
            f"configuration for {vector_length} elements of a {ring_bits}-bit ring, expected "
            f"{limits.vector_length} of {limits.ring_bits}"
        )
    try:
        config = AggregationConfig(
            ids=ids,
            participants=participants,
            threshold=threshold,
            vector_length=vector_length,
            ring_bits=ring_bits,
            graph=Graph.SPARSE if sparse else Graph.FULL,
            neighbours=neighbours,
            neighbourhood_threshold=n_threshold,
            graph_seed=seed,
        )
    except ConfigurationError as exc:
        raise ProtocolError(f"invalid configuration: {exc}") from exc
    return StartAggregation(config=config)


def _read_masked(r: _Reader, ids: SessionIds, limits: WireLimits) -> MaskedInput:
    sender, bits, length = r.u32(), r.u8(), r.u64()
    if bits != limits.ring_bits or length != limits.vector_length:
        raise ProtocolError(
            f"masked input of {length} {bits}-bit elements, expected {limits.vector_length} of {limits.ring_bits}"
        )
    width = bits // 8
    vector = np.frombuffer(r.view(length * width), dtype=np.dtype(f"<u{width}"))
    return MaskedInput(ids=ids, sender=sender, vector=vector)


def _read_unmask_request(r: _Reader, ids: SessionIds, limits: WireLimits) -> UnmaskRequest:
    survivors = _read_index_list(r, limits, "survivors")
    n = r.count(limits.max_participants, "signatures")
    proofs = tuple(ConsistencyProof(signer=r.u32(), signature=r.take(SIGNATURE_BYTES)) for _ in range(n))
    return UnmaskRequest(
        ids=ids,
        survivors=survivors,
        signatures=proofs,
        reveal_self_mask_of=_read_index_list(r, limits, "self-mask owners"),
        reveal_key_of=_read_index_list(r, limits, "key owners"),
    )


def _read_abort(r: _Reader, ids: SessionIds) -> Abort:
    length = r.u16()
    if length > MAX_REASON_BYTES:
        raise ProtocolError(f"abort reason of {length} bytes, at most {MAX_REASON_BYTES}")
    try:
        reason = r.take(length).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("abort reason is not UTF-8") from exc
    return Abort(ids=ids, reason=reason)


_READERS: dict[int, Callable[[_Reader, SessionIds, WireLimits], Message]] = {
    1: _read_start,
    2: lambda r, ids, limits: _read_advert(r, ids),
    3: lambda r, ids, limits: AdvertisedKeys(
        ids=ids,
        advertisements=tuple(
            _read_advert(r, ids) for _ in range(r.count(limits.max_participants, "advertisements"))
        ),
    ),
    4: lambda r, ids, limits: EncryptedShares(ids=ids, sender=r.u32(), shares=_read_encrypted(r, limits)),
    5: lambda r, ids, limits: ForwardedShares(ids=ids, shares=_read_encrypted(r, limits)),
    6: _read_masked,
    7: lambda r, ids, limits: SurvivorList(ids=ids, survivors=_read_index_list(r, limits, "survivors")),
    8: lambda r, ids, limits: ConsistencySignature(
        ids=ids, sender=r.u32(), signature=r.take(SIGNATURE_BYTES)
    ),
    9: _read_unmask_request,
    10: lambda r, ids, limits: UnmaskShares(
        ids=ids,
        sender=r.u32(),
        self_mask_shares=_read_revealed(r, limits),
        key_shares=_read_revealed(r, limits),
    ),
    11: lambda r, ids, limits: _read_abort(r, ids),
}


def decode(data: bytes, limits: WireLimits) -> Message:
    """Parse one message from untrusted bytes; raises only :class:`ProtocolError`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("message must be bytes")
    if len(data) > limits.max_message_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {limits.max_message_bytes}")
    r = _Reader(bytes(data))
    if r.take(len(MAGIC)) != MAGIC:
        raise ProtocolError("not a secure-aggregation message (bad magic)")
    version, type_code = r.u8(), r.u8()
    if version != VERSION:
        raise ProtocolError(f"unsupported wire version {version} (this build speaks {VERSION})")
    reader = _READERS.get(type_code)
    if reader is None:
        raise ProtocolError(f"unknown message type {type_code}")
    message = reader(r, _read_ids(r), limits)
    r.finish()
    return message


__all__ = ["MAGIC", "VERSION", "WireLimits", "decode", "encode"]
