"""Receiving: manual acks, the prefetch window, reassembly of chunked messages, sender checks.

Receiving uses manual acks and a bounded prefetch. The application acks a :class:`Delivery` only after its
effect is saved, or rejects it (no requeue → ``curator.dead-letter``). Deliveries without ``user_id``, from
an unexpected sender, or with broken chunking are rejected by the endpoint itself, with a logged reason.

Prefetch and chunks: the ``basic_qos`` window (channel-wide) is ``prefetch`` plus the deliveries held in
incomplete chunked messages plus the extra chunk deliveries of whole messages the application holds, so
each message counts once against ``prefetch`` and incomplete messages can never starve the window (which
would deadlock). What incomplete messages can hold is bounded by the reassembly limits.

Quorum queues (``docs/topology.md``, "Queue types") refuse a consumer on a channel with a channel-wide
(``global``) window, and a per-consumer window is fixed when the consumer starts. On a quorum inbox the I/O
thread therefore consumes with a per-consumer window and, when the window must change, cancels the
consumer and starts a new one whose window is the wanted one less the deliveries the earlier consumers
still hold unsettled (they stay valid on the channel), so the channel's total stays what it would be with a
global window. This happens between event batches of the I/O loop, not inside a delivery callback, and
only when a window changes (chunked messages), not per message. The curator knows its inboxes' type (it
resolves and declares it); a participant configured with ``auto`` starts with a global window and, if the
broker refuses that (540 "does not support global qos": its inbox is a quorum queue), reconnects with
per-consumer windows.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import structlog
from pika.adapters.blocking_connection import BlockingChannel

from tessera.errors import LocalUsageError
from tessera.transport.chunking import (
    CHUNK_HEADERS,
    HEADER_CHUNK,
    HEADER_CHUNKS,
    HEADER_MESSAGE_ID,
    MAX_MESSAGE_ID_LENGTH,
    Complete,
    Rejected,
)
from tessera.transport.link import _describe, _Link

log = structlog.get_logger("tessera.transport")

_DELIVERY_COUNT_HEADER = "x-delivery-count"


@dataclass
class _Handle:
    generation: int
    tags: tuple[int, ...]
    settled: bool = False


@dataclass(frozen=True)
class Delivery:
    """One whole received message. ``sender`` is the broker-authenticated user (``curator`` or an
    organisation id). ``redelivered`` is true if the broker delivered (any chunk of) it before; handlers
    must be idempotent (key on ``message_id``). Settle it with :meth:`_Endpoint.ack` or ``reject``."""

    sender: str
    body: bytes = field(repr=False)
    message_type: str | None
    headers: Mapping[str, Any]
    message_id: str | None
    routing_key: str
    redelivered: bool
    chunks: int
    _handle: _Handle = field(repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.body)


def _parse_chunk_headers(raw: Mapping[str, Any]) -> tuple[str, int, int] | None:
    message_id = raw.get(HEADER_MESSAGE_ID)
    index = raw.get(HEADER_CHUNK)
    count = raw.get(HEADER_CHUNKS)
    if isinstance(message_id, bytes):
        try:
            message_id = message_id.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_MESSAGE_ID_LENGTH:
        return None
    if type(index) is not int or type(count) is not int:
        return None
    return message_id, index, count


class _Consumer(_Link):
    """The receiving part of an endpoint (application side and I/O thread side)."""

    # ------------------------------------------------------------------ application side: receive

    def receive(self, timeout: float | None = None) -> Delivery | None:
        """The next whole message, or ``None`` after ``timeout`` seconds (``None``: wait indefinitely).
        Raises :class:`TransportClosed` once the endpoint is closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_open()
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                return None
            try:
                delivery = self._deliveries.get(timeout=wait)
            except queue.Empty:
                continue
            if delivery._handle.generation != self._generation:
                # Its channel is gone: the broker will deliver it again on the new connection.
                self._log.info(
                    "stale_delivery_dropped", sender=delivery.sender, message_id=delivery.message_id
                )
                continue
            return delivery

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge after the message's effect is saved. Returns ``False`` if the delivery's connection
        is gone (the broker redelivers it; the handler must tolerate that)."""
        return self._settle(delivery, ack=True, reason=None)

    def reject(self, delivery: Delivery, reason: str) -> bool:
        """Reject without requeue: the message goes to ``curator.dead-letter``. ``reason`` is logged."""
        return self._settle(delivery, ack=False, reason=reason)

    def _settle(self, delivery: Delivery, *, ack: bool, reason: str | None) -> bool:
        handle = delivery._handle
        with self._lock:
            if handle.settled:
                raise LocalUsageError("this delivery was already acknowledged or rejected")
            handle.settled = True
            conn, generation = self._conn, self._generation
        if not ack:
            self._log.warning(
                "message_rejected",
                reason=reason,
                sender=delivery.sender,
                message_id=delivery.message_id,
                size=delivery.size,
                by="application",
            )
        if conn is None or handle.generation != generation:
            self._log.info("settle_skipped_stale_delivery", ack=ack, message_id=delivery.message_id)
            return False

        def apply() -> None:
            channel = self._consume_ch
            if self._generation != handle.generation or channel is None or not channel.is_open:
                return
            for tag in handle.tags:
                if ack:
                    channel.basic_ack(tag)
                else:
                    channel.basic_reject(tag, requeue=False)
                self._unsettled.pop(tag, None)
            self._app_extra -= len(handle.tags) - 1
            self._update_qos()

        try:
            conn.add_callback_threadsafe(apply)
        except (pika.exceptions.AMQPError, RuntimeError, AttributeError) as exc:
            self._log.info("settle_skipped_connection_gone", error=_describe(exc))
            return False
        return True

    # ------------------------------------------------------------------ I/O thread

    def _update_qos(self, *, between_events: bool = False) -> None:
        channel = self._consume_ch
        if channel is None or not channel.is_open:
            return
        wanted = min(65535, self._settings.prefetch + self._reassembler.held_tokens + self._app_extra)
        if not self._per_consumer_qos:
            if wanted != self._qos:
                channel.basic_qos(prefetch_count=wanted, global_qos=True)
                self._qos = wanted
            return
        if not between_events:
            return  # a consumer is replaced from the I/O loop, never inside a delivery callback
        # What earlier (cancelled) consumers delivered and is still unsettled counts against the window
        # too: the new consumer gets the rest, so the channel's total is ``wanted`` as with a global window.
        earlier = sum(1 for consumer in self._unsettled.values() if consumer != self._consumer_tag)
        window = max(0, wanted - earlier)
        self._qos = wanted
        if window == self._consumer_window and (self._consumer_tag is not None or window == 0):
            return
        if self._consumer_tag is not None:
            # pika nacks (requeues) deliveries that arrive for the cancelled consumer before cancel-ok;
            # the broker redelivers them to the next consumer (redelivered=True).
            channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
        self._consumer_window = window
        if window > 0:  # a window of 0 would mean "unlimited"
            channel.basic_qos(prefetch_count=window, global_qos=False)
            self._consumer_tag = channel.basic_consume(self._inbox, self._on_message, auto_ack=False)

    def _reject_tags(
        self, tags: tuple[int, ...], reason: str, sender: str | None, message_id: str | None
    ) -> None:
        self._log.warning(
            "message_rejected",
            reason=reason,
            sender=sender,
            message_id=message_id,
            deliveries=len(tags),
            by="transport",
        )
        channel = self._consume_ch
        if channel is None or not channel.is_open:
            return
        for tag in tags:
            channel.basic_reject(tag, requeue=False)
            self._unsettled.pop(tag, None)

    def _on_message(
        self,
        channel: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        tag = method.delivery_tag
        self._unsettled[tag] = method.consumer_tag
        sender = properties.user_id
        routing_key = method.routing_key
        if not sender:
            self._reject_tags((tag,), "missing_user_id", None, properties.message_id)
            return
        reason = self._check_origin(sender, routing_key)
        if reason is not None:
            self._reject_tags((tag,), reason, sender, properties.message_id)
            return
        headers = dict(properties.headers or {})
        # A quorum queue counts redeliveries in this header: the broker's bookkeeping, not the sender's
        # content (chunks of one message must agree on their headers, and a redelivered one would not).
        headers.pop(_DELIVERY_COUNT_HEADER, None)
        chunk_headers = {h: headers.pop(h) for h in CHUNK_HEADERS if h in headers}
        generation = self._generation
        if not chunk_headers:
            if len(body) > self._settings.reassembly.max_message_bytes:
                self._reject_tags((tag,), "message_too_large", sender, properties.message_id)
                return
            self._hand_over(
                Delivery(
                    sender,
                    body,
                    properties.type,
                    headers,
                    properties.message_id,
                    routing_key,
                    bool(method.redelivered),
                    1,
                    _Handle(generation, (tag,)),
                )
            )
            return
        parsed = _parse_chunk_headers(chunk_headers)
        if parsed is None:
            self._reject_tags((tag,), "malformed_chunk_headers", sender, properties.message_id)
            return
        message_id, index, count = parsed
        fingerprint = (properties.type, routing_key, repr(sorted(headers.items())))
        outcome = self._reassembler.add(
            sender=sender,
            message_id=message_id,
            index=index,
            count=count,
            body=body,
            token=tag,
            redelivered=bool(method.redelivered),
            fingerprint=fingerprint,
        )
        if isinstance(outcome, Rejected):
            self._reject_tags(outcome.tokens, outcome.reason, sender, message_id)
        elif isinstance(outcome, Complete):
            self._app_extra += len(outcome.tokens) - 1
            self._log.debug(
                "chunked_message_reassembled", sender=sender, chunks=count, size=len(outcome.body)
            )
            self._hand_over(
                Delivery(
                    sender,
                    outcome.body,
                    properties.type,
                    headers,
                    message_id,
                    routing_key,
                    outcome.redelivered,
                    count,
                    _Handle(generation, outcome.tokens),
                )
            )
        self._update_qos()

    def _hand_over(self, delivery: Delivery) -> None:
        self._log.debug(
            "message_received",
            sender=delivery.sender,
            message_type=delivery.message_type,
            message_id=delivery.message_id,
            size=delivery.size,
            redelivered=delivery.redelivered,
        )
        self._deliveries.put(delivery)
