"""The federation's own messages around secure aggregation: versioned, typed, strictly validated.

Every message is one AMQP body::

    "TFL" | version u8 | kind u8 | header length u32 | header (JSON, UTF-8) | payload (binary)

The header is validated by a pydantic model that forbids unknown fields; the payload is binary (model
weights as little-endian float32, or a secure-aggregation message in its own wire format). Decoding any
bytes raises nothing but :class:`ProtocolError`, so services can feed it untrusted input.

What travels in the clear is only what the curator may know: the global model, round numbers, that a
participant is ready or leaving and why. Every per-organisation number (update, sample count, metrics) goes
through secure aggregation inside the :class:`SecAgg` payload.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Annotated, Any, ClassVar, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tessera.errors import ProtocolError
from tessera.fedavg import UpdateLayout
from tessera.models import ModelSpec
from tessera.secagg.config import AGGREGATION_ID_PATTERN, ID_PATTERN

MAGIC = b"TFL"
VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
_PREFIX = struct.Struct(">3sBBI")

FederationId = Annotated[str, Field(pattern=ID_PATTERN.pattern)]
RoundNumber = Annotated[int, Field(ge=0, lt=2**63)]


class _Header(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    kind: ClassVar[int]


class LayoutHeader(BaseModel):
    """The update layout's parameters, as the curator announces them."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    num_params: Annotated[int, Field(ge=1, le=2**31)]
    num_classes: Annotated[int, Field(ge=2, le=10_000)]
    clip: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    ring_bits: Literal[32, 64]
    value_bits: Annotated[int, Field(ge=2, le=53)]
    max_weight: Annotated[int, Field(ge=1, le=2**40)]
    max_participants: Annotated[int, Field(ge=2, le=10_000)]

    def layout(self) -> UpdateLayout:
        return UpdateLayout(**self.model_dump())

    @classmethod
    def of(cls, layout: UpdateLayout) -> LayoutHeader:
        return cls(
            num_params=layout.num_params,
            num_classes=layout.num_classes,
            clip=layout.clip,
            ring_bits=layout.ring_bits,
            value_bits=layout.value_bits,
            max_weight=layout.max_weight,
            max_participants=layout.max_participants,
        )


class RoundAnnouncement(_Header):
    """Curator -> participants: round ``round`` (attempt ``attempt``) starts from these global weights.

    The payload is the weights, float32 little-endian, in the model's documented parameter order.
    """

    kind: ClassVar[int] = 1
    federation: FederationId
    round: RoundNumber
    attempt: Annotated[int, Field(ge=0, lt=2**31)]
    aggregation: Annotated[str, Field(pattern=AGGREGATION_ID_PATTERN.pattern)]
    model: ModelSpec
    model_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    layout: LayoutHeader
    # The roster the curator runs with: a participant takes part only under the roster it pinned.
    roster_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    # Whether participants evaluate the announced model this round (distributed DP-SGD runs hundreds of short
    # rounds and evaluates every few); without it the evaluation counts are zero.
    evaluate: bool = True
    # Two-class tasks: predict class 1 from this probability on (the curator's evaluation setting).
    decision_threshold: Annotated[float, Field(gt=0, lt=1)] | None = None


class Ready(_Header):
    """Participant -> curator: its update for (round, attempt) is computed; it can join the aggregation."""

    kind: ClassVar[int] = 2
    federation: FederationId
    round: RoundNumber
    attempt: Annotated[int, Field(ge=0, lt=2**31)]
    # The announced aggregation id: attempt numbers restart after a curator restart, aggregation ids never repeat.
    aggregation: Annotated[str, Field(pattern=AGGREGATION_ID_PATTERN.pattern)]


class LeaveReason(enum.Enum):
    BUDGET_EXHAUSTED = "budget_exhausted"
    MODEL_REFUSED = "model_refused"
    SHUTDOWN = "shutdown"


class Leave(_Header):
    """Participant -> curator: it stops taking part (e.g. its privacy budget would be exceeded)."""

    kind: ClassVar[int] = 3
    federation: FederationId
    reason: LeaveReason
    detail: Annotated[str, Field(max_length=500)] = ""


class Finished(_Header):
    """Curator -> participants: training is over; participants may exit."""

    kind: ClassVar[int] = 4
    federation: FederationId
    rounds_completed: RoundNumber
    reason: Annotated[str, Field(max_length=500)]


class SecAgg(_Header):
    """Either direction: one secure-aggregation message, in its own wire format, as the payload."""

    kind: ClassVar[int] = 5
    federation: FederationId


Header: TypeAlias = RoundAnnouncement | Ready | Leave | Finished | SecAgg
_KINDS: dict[int, type[_Header]] = {
    cls.kind: cls for cls in (RoundAnnouncement, Ready, Leave, Finished, SecAgg)
}


def encode(header: Header, payload: bytes = b"") -> bytes:
    """One message body."""
    raw = header.model_dump_json().encode()
    return _PREFIX.pack(MAGIC, VERSION, header.kind, len(raw)) + raw + payload


def decode(body: bytes, *, max_payload: int) -> tuple[Header, bytes]:
    """Parse and validate a message body; raises only :class:`ProtocolError`."""
    if not isinstance(body, bytes | bytearray | memoryview):
        raise ProtocolError("message body must be bytes")
    body = bytes(body)
    if len(body) < _PREFIX.size:
        raise ProtocolError(f"message of {len(body)} bytes is too short")
    magic, version, kind, header_len = _PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise ProtocolError("not a Tessera federation message (bad magic)")
    if version != VERSION:
        raise ProtocolError(f"unsupported message version {version} (this build speaks {VERSION})")
    cls = _KINDS.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind}")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(body):
        raise ProtocolError(f"header length {header_len} is out of bounds")
    payload = body[_PREFIX.size + header_len :]
    if len(payload) > max_payload:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the limit of {max_payload}")
    try:
        fields = json.loads(body[_PREFIX.size : _PREFIX.size + header_len].decode("utf-8"))
        if not isinstance(fields, dict):
            raise ProtocolError("header must be a JSON object")
        header = cls.model_validate(fields, strict=False)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"header is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"invalid {cls.__name__} header: {where}: {first['msg']}") from exc
    if isinstance(header, RoundAnnouncement) and len(payload) != 4 * header.layout.num_params:
        raise ProtocolError(
            f"weights payload of {len(payload)} bytes, expected {4 * header.layout.num_params} "
            f"for {header.layout.num_params} parameters"
        )
    return header, payload  # type: ignore[return-value]


def weights_to_bytes(weights: npt.NDArray[np.floating[Any]]) -> bytes:
    return np.asarray(weights, dtype="<f4").tobytes()


def weights_from_bytes(payload: bytes) -> npt.NDArray[np.float32]:
    weights = np.frombuffer(payload, dtype="<f4").astype(np.float32)
    if not np.isfinite(weights).all():
        raise ProtocolError("weights contain NaN or infinity")
    return weights


__all__ = [
    "Finished",
    "Header",
    "LayoutHeader",
    "Leave",
    "LeaveReason",
    "Ready",
    "RoundAnnouncement",
    "SecAgg",
    "decode",
    "encode",
    "weights_from_bytes",
    "weights_to_bytes",
]
