"""Publishing: persistent messages with publisher confirms, chunking, one publish for several recipients.

Messages
--------
Every publish is persistent (``delivery_mode=2``), carries ``user_id`` = the authenticated user (the broker
refuses any other value, so the receiver learns the sender from the broker, not from the content), a message
type, a message id and application headers, and is ``mandatory`` on a confirm channel: an unroutable or
nacked publish is an error (:class:`PublishFailed`), a refused one too (:class:`PublishRefused`). Payloads
larger than ``chunk_size`` are split (``tessera.transport.chunking``); the receiver reassembles them under
limits and the application only ever sees whole messages. Confirms are tracked per channel
(:mod:`tessera.transport.confirms`), so the messages of one ``_publish_all`` (``send_each``) are in flight
together and cost about one broker round trip, not one each.

One body for several organisations (:meth:`CuratorTransport.send_many`) is one publish and one confirm, not
one per recipient: routing key ``to.selected`` (``topology.SELECTED_KEY``, bound to no queue) and a ``BCC``
header with the recipients' ``to.X`` keys on every chunk. RabbitMQ routes it to each inbox bound with one of
those keys (once per queue) and strips ``BCC`` before delivery, so a recipient sees routing key
``to.selected`` and nothing about the other recipients. ``mandatory`` then only means "routed to at least
one of them" (the broker returns a message, not a copy per queue), so after the confirm the I/O thread checks
each recipient's inbox with a passive declare: a missing one (deleted behind the curator's back, since the
curator declares every inbox on each connection) missed the message, and the call raises
:class:`PublishFailed` naming those organisations (``undelivered``) while the others keep their copy. This
costs small round trips, made several at once (:mod:`tessera.transport.inbox_probe`), not one publish of the
body per recipient. It sees a deleted queue, not a deleted binding (AMQP cannot list bindings; only the curator and operators can unbind).
``CC`` and ``BCC`` are routing instructions to the broker, so applications may not set them as headers.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import structlog

from tessera.errors import LocalUsageError, TransportError
from tessera.transport.chunking import (
    HEADER_CHUNK,
    HEADER_CHUNKS,
    HEADER_MESSAGE_ID,
    MAX_MESSAGE_ID_LENGTH,
    split,
)
from tessera.transport.confirms import ConfirmTracker, Flight
from tessera.transport.errors import PublishFailed, PublishRefused
from tessera.transport.inbox_probe import ProbeResult
from tessera.transport.link import _ConnectionLost, _describe, _Link

log = structlog.get_logger("tessera.transport")

RESERVED_HEADER_PREFIX = "x-tessera-"
BCC_HEADER = "BCC"
"""RabbitMQ's sender-selected distribution: extra routing keys, removed from the message before delivery."""
_ROUTING_HEADERS = frozenset({"cc", "bcc"})  # RabbitMQ routes on "CC" and "BCC"; refused in any case
_MAX_BCC_BYTES = 32 * 1024  # per publish: the content header (with BCC) must fit in one frame (128 KiB)


@dataclass(frozen=True, eq=False)
class _Outbound:
    """A validated message, ready to be published (its chunks already split)."""

    routing_key: str
    size: int
    chunks: list[bytes]
    message_type: str
    message_id: str
    headers: dict[str, Any]
    broker_headers: dict[str, Any]
    recipients: dict[str, str]
    """Inbox queue → organisation of a multi-recipient publish, checked after the confirm."""


@dataclass(eq=False)
class _PublishRequest:
    exchange: str
    outbound: _Outbound
    generation: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    cancelled: bool = False
    missing: list[str] = field(default_factory=list)
    """Filled by the I/O thread: the organisations among ``recipients`` whose inbox does not exist."""


def _undelivered_reason(organisations: tuple[str, ...]) -> str:
    names = ", ".join(repr(o) for o in organisations)
    return f"not delivered to {names}: no inbox exists for them (the other recipients received it)"


def _bcc_batches(keys: list[str]) -> list[list[str]]:
    """``keys`` in order, split so that each batch's ``BCC`` header stays under ``_MAX_BCC_BYTES``."""
    batches: list[list[str]] = [[]]
    size = 0
    for key in keys:
        cost = len(key) + 5  # a longstr in a field array: type octet, 4-octet length, the key
        if batches[-1] and size + cost > _MAX_BCC_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(key)
        size += cost
    return batches


class _Publisher(_Link):
    """The publishing part of an endpoint (application side and I/O thread side)."""

    # ------------------------------------------------------------------ application side: publish

    def _publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_type: str,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
    ) -> str:
        """Publish one message and wait for the broker's confirm; returns the message id. See the module
        docstring."""
        outbound = self._outbound(
            routing_key, body, message_type=message_type, headers=headers, message_id=message_id
        )
        (result,) = self._publish_all([outbound])
        if isinstance(result, BaseException):
            raise result
        return result

    def _outbound(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_type: str,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        broker_headers: Mapping[str, Any] | None = None,
        recipients: Mapping[str, str] | None = None,
    ) -> _Outbound:
        """Check one message (:class:`LocalUsageError` if it cannot be sent) and split it into chunks.

        ``broker_headers`` (the transport's own, such as ``BCC``) go on every chunk besides the
        application's ``headers``, which may not use their names. ``recipients`` (inbox → organisation)
        are the inboxes a multi-recipient publish must reach: :class:`PublishFailed` with ``undelivered``
        if some do not exist."""
        self._check_open()
        if not isinstance(body, bytes | bytearray | memoryview):
            raise LocalUsageError("the body must be bytes")
        body = bytes(body)
        if not message_type or len(message_type) > 255:
            raise LocalUsageError("message_type must be a non-empty string of at most 255 characters")
        app_headers = dict(headers or {})
        if any(str(k).startswith(RESERVED_HEADER_PREFIX) for k in app_headers):
            raise LocalUsageError(f"headers starting with {RESERVED_HEADER_PREFIX!r} are reserved")
        if any(str(k).lower() in _ROUTING_HEADERS for k in app_headers):
            raise LocalUsageError("the headers CC and BCC are reserved (the broker routes on them)")
        limits = self._settings.reassembly
        if len(body) > limits.max_message_bytes:
            raise LocalUsageError(f"payload of {len(body)} bytes exceeds max_message_bytes")
        chunks = split(body, self._settings.chunk_size)
        if len(chunks) > limits.max_chunks:
            raise LocalUsageError(f"payload needs {len(chunks)} chunks, more than max_chunks")
        message_id = message_id or uuid.uuid4().hex
        if len(message_id) > MAX_MESSAGE_ID_LENGTH:
            raise LocalUsageError("message_id is too long")
        return _Outbound(
            routing_key,
            len(body),
            chunks,
            message_type,
            message_id,
            app_headers,
            dict(broker_headers or {}),
            dict(recipients or {}),
        )

    def _publish_all(self, outbounds: Sequence[_Outbound]) -> list[str | TransportError]:
        """Publish every message at once and wait for all their confirms (they overlap: see
        :mod:`tessera.transport.confirms`); for each, its message id or the error it ended with.

        Each message is retried on its own after a lost connection or a nack, as a single publish is,
        until ``publish_timeout`` (counted once for the whole set)."""
        deadline = time.monotonic() + self._settings.publish_timeout
        results: dict[int, str | TransportError] = {}
        nacks = dict.fromkeys(range(len(outbounds)), 0)
        pending = list(range(len(outbounds)))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for i in pending:
                    self._bound(outbounds[i]).warning("publish_failed", reason="timeout")
                    results[i] = PublishFailed(f"no confirm within {self._settings.publish_timeout} s")
                break
            if not self._connected.wait(min(remaining, 0.5)):
                self._check_open()
                continue
            with self._lock:
                conn, generation = self._conn, self._generation
                if conn is None:
                    continue
                requests = [_PublishRequest(self._exchange, outbounds[i], generation) for i in pending]
                self._inflight.update(requests)
            try:
                conn.add_callback_threadsafe(functools.partial(self._do_publish, requests))
                for request in requests:
                    request.done.wait(max(0.0, deadline - time.monotonic()))
            except (pika.exceptions.AMQPError, RuntimeError, AttributeError) as exc:
                for request in requests:
                    if not request.done.is_set():
                        request.error = _ConnectionLost(_describe(exc))
                        request.done.set()
            finally:
                with self._lock:
                    self._inflight.difference_update(requests)
            retry: list[int] = []
            pause = 0.0
            for i, request in zip(pending, requests, strict=True):
                if not request.done.is_set():
                    request.cancelled = True
                    retry.append(i)  # the deadline check above ends it
                    continue
                outcome = self._outcome(request, nacks, i)
                if isinstance(outcome, float):
                    retry.append(i)
                    pause = max(pause, outcome)
                else:
                    results[i] = outcome
            pending = retry
            if pause:
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        return [results[i] for i in range(len(outbounds))]

    def _bound(self, outbound: _Outbound) -> Any:
        bound = self._log.bind(
            routing_key=outbound.routing_key,
            message_id=outbound.message_id,
            message_type=outbound.message_type,
        )
        if BCC_HEADER in outbound.broker_headers:
            bound = bound.bind(recipients=len(outbound.broker_headers[BCC_HEADER]))
        return bound

    def _outcome(
        self, request: _PublishRequest, nacks: dict[int, int], index: int
    ) -> str | TransportError | float:
        """What a settled request means: its message id, a final error, or the seconds to wait before
        publishing it again (0 after a lost connection, a backoff after a nack)."""
        outbound = request.outbound
        bound = self._bound(outbound)
        error = request.error
        if error is None and request.missing:
            missing = tuple(request.missing)
            bound.warning("publish_failed", reason="inbox_missing", undelivered=list(missing))
            return PublishFailed(_undelivered_reason(missing), undelivered=missing)
        if error is None:
            bound.debug("message_published", size=outbound.size, chunks=len(outbound.chunks))
            return outbound.message_id
        if isinstance(error, _ConnectionLost):
            bound.info("publish_retry_after_connection_loss", error=str(error))
            return 0.0
        if isinstance(error, pika.exceptions.ChannelClosedByBroker):
            bound.warning("publish_refused", reply_code=error.reply_code, reply_text=error.reply_text)
            refused = PublishRefused(error.reply_code, error.reply_text)
            refused.__cause__ = error
            return refused
        if isinstance(error, pika.exceptions.UnroutableError):
            if outbound.recipients:  # a multi-recipient publish that reached none of them
                missing = tuple(outbound.recipients.values())
                bound.warning("publish_failed", reason="unroutable", undelivered=list(missing))
                return PublishFailed(_undelivered_reason(missing), undelivered=missing, unroutable=True)
            bound.warning("publish_failed", reason="unroutable")
            keys = repr(outbound.routing_key)
            if BCC_HEADER in outbound.broker_headers:
                keys += f" or its {BCC_HEADER} keys"
            return PublishFailed(f"unroutable: no queue is bound for routing key {keys}", unroutable=True)
        if isinstance(error, pika.exceptions.NackError):
            nacks[index] += 1
            if nacks[index] >= self._settings.publish_attempts:
                bound.warning("publish_failed", reason="nacked", attempts=nacks[index])
                return PublishFailed(f"the broker nacked the message {nacks[index]} times")
            delay = self._settings.connection.reconnect.delay(nacks[index] - 1, self._rng)
            bound.info("publish_nacked_retrying", attempt=nacks[index], delay=round(delay, 3))
            return float(delay)
        bound.warning("publish_failed", reason="unexpected", error=_describe(error))
        return PublishFailed(f"unexpected publish error: {_describe(error)}")

    # ------------------------------------------------------------------ I/O thread

    def _do_publish(self, requests: list[_PublishRequest]) -> None:
        """I/O thread: hand every request's chunks to the channel's confirm tracker without waiting; each
        request is done when its confirms are in (:meth:`_on_settled`)."""
        for request in requests:
            try:
                tracker = self._confirms
                if request.cancelled:
                    request.done.set()
                    continue
                if request.generation != self._generation or tracker is None or not tracker.channel.is_open:
                    request.error = _ConnectionLost("connection replaced before publishing")
                    request.done.set()
                    continue
                tracker.send(self._flight(request))
            except Exception as exc:  # never let a bug kill the I/O loop silently
                request.error = request.error or exc
                request.done.set()

    def _flight(self, request: _PublishRequest) -> Flight:
        outbound = request.outbound
        total = len(outbound.chunks)
        chunks: list[tuple[bytes, pika.BasicProperties]] = []
        for index, chunk in enumerate(outbound.chunks):
            headers = dict(outbound.headers)
            headers.update(outbound.broker_headers)
            if total > 1:
                headers[HEADER_MESSAGE_ID] = outbound.message_id
                headers[HEADER_CHUNK] = index
                headers[HEADER_CHUNKS] = total
            properties = pika.BasicProperties(
                content_type="application/octet-stream",
                delivery_mode=pika.DeliveryMode.Persistent,
                user_id=self.user,
                type=outbound.message_type,
                message_id=outbound.message_id,
                timestamp=int(time.time()),
                app_id="tessera",
                headers=headers or None,
            )
            chunks.append((chunk, properties))
        return Flight(
            outbound.message_id,
            request.exchange,
            outbound.routing_key,
            chunks,
            on_settled=self._on_settled,
            context=request,
        )

    def _on_settled(self, flight: Flight) -> None:
        """I/O thread, from the confirm tracker: the broker has answered for every chunk (or the channel
        closed). A multi-recipient message is then checked for missing inboxes, outside pika's callback
        (the check may open channels, which waits for the broker)."""
        request: _PublishRequest = flight.context
        if flight.error is not None:
            error = flight.error
            if isinstance(error, pika.exceptions.ChannelClosedByBroker):
                request.error = error  # the I/O loop opens a new publishing channel
            else:
                request.error = _ConnectionLost(_describe(error))
        elif flight.nacked:
            request.error = pika.exceptions.NackError([])
        elif flight.returned:
            request.error = pika.exceptions.UnroutableError([])
        elif request.outbound.recipients:
            with self._lock:
                conn = self._conn
            if conn is not None:
                conn.add_callback_threadsafe(functools.partial(self._check_recipients, request))
                return
            request.error = _ConnectionLost("connection closed before the inbox check")
        request.done.set()

    def _check_recipients(self, request: _PublishRequest) -> None:
        """I/O thread: which recipients' inboxes are missing, all asked at once
        (:mod:`tessera.transport.inbox_probe`). One missing now was missing when the message was routed,
        as only this thread re-declares inboxes, on a new connection (and then this is a retry)."""
        probe = self._probe
        if request.generation != self._generation or probe is None:
            request.error = _ConnectionLost("connection replaced before the inbox check")
            request.done.set()
            return
        queues = request.outbound.recipients

        def checked(result: ProbeResult) -> None:
            if isinstance(result, BaseException):
                request.error = _ConnectionLost(f"inbox check failed: {_describe(result)}")
            else:
                request.missing = [queues[name] for name in result]
            request.done.set()

        try:
            probe.check(list(queues), checked)
        except Exception as exc:  # never let a bug kill the I/O loop silently
            request.error = request.error or exc
            request.done.set()

    def _reopen_publish_channel(self) -> None:
        with self._lock:
            conn = self._conn
        if conn is None or not conn.is_open:
            return
        try:
            channel = conn.channel()
            self._confirms = ConfirmTracker(channel)
            self._publish_ch = channel
        except pika.exceptions.AMQPError as exc:
            self._log.warning("publish_channel_reopen_failed", error=_describe(exc))
