"""Wire format: every message round-trips; any bytes whatsoever decode to a message or a ProtocolError."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.errors import ProtocolError
from tessera.secagg.curator import CuratorPhase
from tessera.secagg.messages import MaskedInput, Message
from tessera.secagg.wire import MAGIC, WireLimits, decode, encode

from .conftest import make_harness


def _all_messages() -> list[Message]:
    """One real message of every type, captured from a run with a dropout (so every list is non-empty)."""
    h = make_harness(6, m=32)
    seen: list[Message] = []
    h.start()
    while h.pending:
        seen.extend(item.message for item in h.pending)
        replies = h.deliver(
            skip=frozenset({6}) if h.curator.phase is CuratorPhase.MASKED_INPUT else frozenset()
        )
        seen.extend(m for _, m in replies)
        h.collect()
    aborted = make_harness(3)
    aborted.start()
    aborted.deliver(skip=frozenset({1, 2}))
    aborted.collect()
    seen.extend(item.message for item in aborted.pending)
    return seen


MESSAGES = _all_messages()
LIMITS = WireLimits(max_participants=6, vector_length=32, ring_bits=32)


def _equal(a: Message, b: Message) -> bool:
    if isinstance(a, MaskedInput) and isinstance(b, MaskedInput):
        return a.ids == b.ids and a.sender == b.sender and np.array_equal(a.vector, b.vector)
    return a == b


def test_every_message_type_round_trips() -> None:
    kinds = {type(m).__name__ for m in MESSAGES}
    assert len(kinds) == 11, kinds
    for message in MESSAGES:
        assert _equal(decode(encode(message), LIMITS), message)


def test_vectors_are_compact_binary() -> None:
    masked = next(m for m in MESSAGES if isinstance(m, MaskedInput))
    data = encode(masked)
    assert 32 * 4 < len(data) < 32 * 4 + 40  # m * log2(R) / 8 bytes plus a small header


@pytest.mark.parametrize("index", range(len(MESSAGES)))
def test_truncation_and_trailing_junk_are_protocol_errors(index: int) -> None:
    data = encode(MESSAGES[index])
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:cut], LIMITS)
    with pytest.raises(ProtocolError, match="trailing"):
        decode(data + b"\x00", LIMITS)


def test_oversized_message_is_rejected_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode(MAGIC + b"\x01\x06" + bytes(LIMITS.max_message_bytes), LIMITS)


def test_vector_of_the_wrong_length_or_ring_is_rejected() -> None:
    masked = next(m for m in MESSAGES if isinstance(m, MaskedInput))
    longer = dataclasses.replace(masked, vector=np.concatenate([masked.vector, masked.vector[:1]]))
    with pytest.raises(ProtocolError, match="expected 32 of 32"):
        decode(encode(longer), LIMITS)
    wider = dataclasses.replace(masked, vector=masked.vector.astype(np.uint64))
    with pytest.raises(ProtocolError, match="expected 32 of 32"):
        decode(encode(wider), LIMITS)


def test_counts_beyond_the_roster_are_rejected() -> None:
    small = WireLimits(max_participants=3, vector_length=32, ring_bits=32)
    start = MESSAGES[0]
    with pytest.raises(ProtocolError, match="at most 3 allowed"):
        decode(encode(start), small)


def test_wrong_version_and_unknown_type() -> None:
    data = encode(MESSAGES[0])
    with pytest.raises(ProtocolError, match="unsupported wire version 9"):
        decode(data[:3] + b"\x09" + data[4:], LIMITS)
    with pytest.raises(ProtocolError, match="unknown message type 200"):
        decode(data[:4] + b"\xc8" + data[5:], LIMITS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data, LIMITS)
    with contextlib.suppress(ProtocolError):
        decode(MAGIC + b"\x01" + data, LIMITS)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(range(len(MESSAGES))), st.data())
def test_mutated_messages_only_ever_raise_protocol_error(index: int, data: st.DataObject) -> None:
    raw = bytearray(encode(MESSAGES[index]))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        decode(bytes(raw), LIMITS)
