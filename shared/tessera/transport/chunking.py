"""Splitting large payloads into chunks and reassembling them under limits (no I/O, injected clock).

A payload longer than the chunk size travels as ``n`` broker messages that all carry
``x-tessera-message-id`` (the same id), ``x-tessera-chunk`` (0-based index) and ``x-tessera-chunks`` (``n``).
The receiver holds the chunks of each *partial* message, keyed by (authenticated sender, message id) so two
senders can never mix, until all ``n`` arrived, then hands the whole payload up.

A hostile sender must not be able to exhaust the receiver's memory, so :class:`Reassembler` enforces:

- ``max_chunks`` per message and ``max_message_bytes`` per message (checked as chunks arrive);
- ``max_partial_messages`` in total and ``max_partials_per_sender``, and ``max_partial_bytes`` summed over
  all partial messages;
- ``partial_timeout``: a message still incomplete that long after its first chunk is dropped.

Whenever a limit is hit or a chunk contradicts its siblings (another chunk count, message type, routing key
or header set, or a different body under an index already received), the whole message is rejected: every
chunk held so far and the offending one are returned as a :class:`Rejected` outcome, with a reason, for the
caller to reject at the broker (→ dead letter). The id is remembered for a while so the message's later
chunks are rejected at once instead of starting a new partial that can never complete.

Identical duplicates (a publisher retrying after a lost confirm reuses the message id) are absorbed: their
tokens join the message so they are acknowledged with it.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

HEADER_MESSAGE_ID = "x-tessera-message-id"
HEADER_CHUNK = "x-tessera-chunk"
HEADER_CHUNKS = "x-tessera-chunks"
CHUNK_HEADERS = (HEADER_MESSAGE_ID, HEADER_CHUNK, HEADER_CHUNKS)
MAX_MESSAGE_ID_LENGTH = 128
_FAILED_IDS_REMEMBERED = 4096

T = TypeVar("T")


class ReassemblyLimits(BaseModel):
    """Receiver-side limits on chunked messages (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_message_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1, description="largest whole message, bytes"
    )
    max_chunks: int = Field(default=64, ge=1, description="most chunks one message may have")
    max_partial_messages: int = Field(
        default=16, ge=1, description="incomplete messages held at once, all senders"
    )
    max_partials_per_sender: int = Field(
        default=2, ge=1, description="incomplete messages held at once, per sender"
    )
    max_partial_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1, description="bytes held in incomplete messages"
    )
    partial_timeout: float = Field(
        default=300.0, gt=0, description="drop a message incomplete after this, seconds"
    )


def split(body: bytes, chunk_size: int) -> list[bytes]:
    """Split ``body`` into chunks of at most ``chunk_size`` bytes (one chunk, possibly empty, if it fits)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    if len(body) <= chunk_size:
        return [body]
    view = memoryview(body)
    return [bytes(view[i : i + chunk_size]) for i in range(0, len(body), chunk_size)]


@dataclass(frozen=True)
class Pending:
    """The chunk was stored; the message is not complete yet."""


@dataclass(frozen=True)
class Complete(Generic[T]):
    """All chunks arrived: the whole body and the tokens of every chunk delivery (to ack together)."""

    sender: str
    message_id: str
    body: bytes
    tokens: tuple[T, ...]
    redelivered: bool
    fingerprint: Hashable


@dataclass(frozen=True)
class Rejected(Generic[T]):
    """The message (or this chunk) is rejected: reject every token, log the reason."""

    sender: str
    message_id: str
    reason: str
    tokens: tuple[T, ...]


@dataclass
class _Partial(Generic[T]):
    count: int
    fingerprint: Hashable
    started: float
    chunks: dict[int, bytes] = field(default_factory=dict)
    tokens: list[T] = field(default_factory=list)
    size: int = 0
    redelivered: bool = False


class Reassembler(Generic[T]):
    """Collects chunks into whole messages under :class:`ReassemblyLimits`. Not thread-safe: one owner
    (the transport's I/O thread). ``T`` is the caller's token for a delivery (the broker delivery tag)."""

    def __init__(self, limits: ReassemblyLimits, clock: Callable[[], float]) -> None:
        self._limits = limits
        self._clock = clock
        self._partials: dict[tuple[str, str], _Partial[T]] = {}
        self._failed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._bytes = 0

    @property
    def held_tokens(self) -> int:
        """Deliveries held in incomplete messages (unacknowledged at the broker)."""
        return sum(len(p.tokens) for p in self._partials.values())

    @property
    def partial_messages(self) -> int:
        return len(self._partials)

    @property
    def partial_bytes(self) -> int:
        return self._bytes

    def add(
        self,
        *,
        sender: str,
        message_id: str,
        index: int,
        count: int,
        body: bytes,
        token: T,
        redelivered: bool = False,
        fingerprint: Hashable = None,
    ) -> Pending | Complete[T] | Rejected[T]:
        """Add one chunk. ``fingerprint`` holds what every chunk of a message must agree on (type, routing
        key, application headers)."""
        key = (sender, message_id)
        limits = self._limits
        if key in self._failed:
            return Rejected(sender, message_id, "message_already_rejected", (token,))
        if not 1 <= count <= limits.max_chunks:
            return self._fail(key, "chunk_count_out_of_range", token)
        if not 0 <= index < count:
            return self._fail(key, "chunk_index_out_of_range", token)

        partial = self._partials.get(key)
        if partial is None:
            if sum(1 for s, _ in self._partials if s == sender) >= limits.max_partials_per_sender:
                return self._fail(key, "too_many_partial_messages_from_sender", token)
            if len(self._partials) >= limits.max_partial_messages:
                return self._fail(key, "too_many_partial_messages", token)
            partial = _Partial(count=count, fingerprint=fingerprint, started=self._clock())
            self._partials[key] = partial
        elif partial.count != count:
            return self._fail(key, "chunk_count_contradicts_siblings", token)
        elif partial.fingerprint != fingerprint:
            return self._fail(key, "chunk_properties_contradict_siblings", token)

        partial.redelivered = partial.redelivered or redelivered
        previous = partial.chunks.get(index)
        if previous is not None:
            if not hmac.compare_digest(previous, body):
                return self._fail(key, "chunk_body_contradicts_duplicate", token)
            if len(partial.tokens) >= 2 * partial.count:
                return self._fail(key, "too_many_duplicate_chunks", token)
            partial.tokens.append(token)
            return Pending()

        if partial.size + len(body) > limits.max_message_bytes:
            return self._fail(key, "message_too_large", token)
        if self._bytes + len(body) > limits.max_partial_bytes:
            return self._fail(key, "partial_bytes_budget_exhausted", token)
        partial.chunks[index] = body
        partial.tokens.append(token)
        partial.size += len(body)
        self._bytes += len(body)
        if len(partial.chunks) < partial.count:
            return Pending()

        del self._partials[key]
        self._bytes -= partial.size
        whole = b"".join(partial.chunks[i] for i in range(partial.count))
        return Complete(sender, message_id, whole, tuple(partial.tokens), partial.redelivered, fingerprint)

    def expire(self) -> list[Rejected[T]]:
        """Reject every partial message older than ``partial_timeout``."""
        now = self._clock()
        stale = [k for k, p in self._partials.items() if now - p.started > self._limits.partial_timeout]
        out: list[Rejected[T]] = []
        for key in stale:
            rejected = self._fail(key, "partial_message_timed_out", None)
            out.append(rejected)
        return out

    def clear(self) -> None:
        """Forget every partial message without rejecting (the channel that held their deliveries is gone,
        so the broker redelivers them)."""
        self._partials.clear()
        self._bytes = 0

    def _fail(self, key: tuple[str, str], reason: str, token: T | None) -> Rejected[T]:
        partial = self._partials.pop(key, None)
        tokens: list[T] = []
        if partial is not None:
            self._bytes -= partial.size
            tokens.extend(partial.tokens)
        if token is not None:
            tokens.append(token)
        self._failed[key] = None
        while len(self._failed) > _FAILED_IDS_REMEMBERED:
            self._failed.popitem(last=False)
        return Rejected(key[0], key[1], reason, tuple(tokens))


__all__ = [
    "CHUNK_HEADERS",
    "HEADER_CHUNK",
    "HEADER_CHUNKS",
    "HEADER_MESSAGE_ID",
    "MAX_MESSAGE_ID_LENGTH",
    "Complete",
    "Pending",
    "Reassembler",
    "ReassemblyLimits",
    "Rejected",
    "split",
]
