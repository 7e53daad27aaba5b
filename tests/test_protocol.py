"""Federation messages: strict validation; any bytes decode to a message or a ProtocolError."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera import protocol
from tessera.errors import ProtocolError
from tessera.fedavg import UpdateLayout
from tessera.models import ModelSpec

LAYOUT = UpdateLayout(
    num_params=6, num_classes=2, clip=1.0, ring_bits=32, value_bits=12, max_weight=1000, max_participants=4
)
ANNOUNCEMENT = protocol.RoundAnnouncement(
    federation="fed",
    round=3,
    attempt=1,
    aggregation="r3a1-abcd",
    model=ModelSpec(name="mlp", kwargs={"input_dim": 2, "num_classes": 2}),
    model_fingerprint="0" * 64,
    layout=protocol.LayoutHeader.of(LAYOUT),
    roster_fingerprint="1" * 64,
)
WEIGHTS = np.arange(6, dtype=np.float32)


def _all() -> list[tuple[protocol.Header, bytes]]:
    return [
        (ANNOUNCEMENT, protocol.weights_to_bytes(WEIGHTS)),
        (protocol.Ready(federation="fed", round=3, attempt=1, aggregation="r3a1-abcd"), b""),
        (protocol.Leave(federation="fed", reason=protocol.LeaveReason.BUDGET_EXHAUSTED, detail="eps"), b""),
        (protocol.Finished(federation="fed", rounds_completed=3, reason="done"), b""),
        (protocol.SecAgg(federation="fed"), b"TSA\x01..."),
    ]


def test_every_message_round_trips() -> None:
    for header, payload in _all():
        decoded, body = protocol.decode(protocol.encode(header, payload), max_payload=1024)
        assert decoded == header and body == payload
    _, payload = protocol.decode(protocol.encode(*_all()[0]), max_payload=1024)
    assert np.array_equal(protocol.weights_from_bytes(payload), WEIGHTS)
    assert ANNOUNCEMENT.layout.layout() == LAYOUT


def _with_header(fields: dict, kind: int = 2, payload: bytes = b"") -> bytes:
    raw = json.dumps(fields).encode()
    return struct.pack(">3sBBI", b"TFL", 1, kind, len(raw)) + raw + payload


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "too short"),
        (b"XYZ\x01\x02\x00\x00\x00\x00", "bad magic"),
        (b"TFL\x07\x02\x00\x00\x00\x00", "unsupported message version 7"),
        (b"TFL\x01\x63\x00\x00\x00\x00", "unknown message kind 99"),
        (b"TFL\x01\x02\xff\xff\xff\xff", "header length"),
        (_with_header({"federation": "fed", "round": 1}), "attempt: Field required"),
        (
            _with_header({"federation": "fed", "round": 1, "attempt": 0, "aggregation": "a", "extra": 1}),
            "extra: Extra inputs",
        ),
        (
            _with_header({"federation": "Bad Fed", "round": 1, "attempt": 0, "aggregation": "a"}),
            "federation: String should match",
        ),
        (
            _with_header({"federation": "fed", "round": -1, "attempt": 0, "aggregation": "a"}),
            "round: Input should be greater",
        ),
        (_with_header([1, 2]), "JSON object"),  # type: ignore[arg-type]
        (b"TFL\x01\x02\x00\x00\x00\x02{x", "not valid JSON"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        protocol.decode(body, max_payload=1024)


def test_payload_limits_and_weights_length() -> None:
    header, payload = _all()[0]
    with pytest.raises(ProtocolError, match="exceeds the limit of 8"):
        protocol.decode(protocol.encode(header, payload), max_payload=8)
    with pytest.raises(ProtocolError, match="expected 24 for 6 parameters"):
        protocol.decode(protocol.encode(header, payload[:-4]), max_payload=1024)
    with pytest.raises(ProtocolError, match="NaN or infinity"):
        protocol.weights_from_bytes(np.array([np.nan], dtype="<f4").tobytes())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    for body in (data, b"TFL\x01" + data, b"TFL\x01\x01" + data):
        with contextlib.suppress(ProtocolError):
            protocol.decode(body, max_payload=1024)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(5)), st.data())
def test_mutated_messages_only_raise_protocol_error(index: int, data: st.DataObject) -> None:
    raw = bytearray(protocol.encode(*_all()[index]))
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        protocol.decode(bytes(raw), max_payload=1024)
