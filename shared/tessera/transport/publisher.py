"""Publishing: persistent messages with publisher confirms, chunking, one publish for several recipients.

Messages
--------
Every publish is persistent (``delivery_mode=2``), carries ``user_id`` = the authenticated user (the broker
refuses any other value, so the receiver learns the sender from the broker, not from the content), a message
type, a message id and application headers, and is ``mandatory`` on a confirm channel: an unroutable or
nacked publish is an error (:class:`PublishFailed`), a refused one too (:class:`PublishRefused`). Payloads
larger than ``chunk_size`` are split (``tessera.transport.chunking``); the receiver reassembles them under
limits and the application only ever sees whole messages.

One body for several organisations (:meth:`CuratorTransport.send_many`) is one publish and one confirm, not
one per recipient: routing key ``to.selected`` (``topology.SELECTED_KEY``, bound to no queue) and a ``BCC``
header with the recipients' ``to.X`` keys on every chunk. RabbitMQ routes it to each inbox bound with one of
those keys (once per queue) and strips ``BCC`` before delivery, so a recipient sees routing key
``to.selected`` and nothing about the other recipients. ``mandatory`` then only means "routed to at least
one of them" (the broker returns a message, not a copy per queue), so after the confirm the I/O thread checks
each recipient's inbox with a passive declare: a missing one (deleted behind the curator's back, since the
curator declares every inbox on each connection) missed the message, and the call raises
:class:`PublishFailed` naming those organisations (``undelivered``) while the others keep their copy. This
costs one small round trip per recipient, not one publish of the body per recipient. It sees a deleted
queue, not a deleted binding (AMQP cannot list bindings; only the curator and operators can unbind).
``CC`` and ``BCC`` are routing instructions to the broker, so applications may not set them as headers.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import structlog

from tessera.errors import LocalUsageError
from tessera.transport.chunking import (
    HEADER_CHUNK,
    HEADER_CHUNKS,
    HEADER_MESSAGE_ID,
    MAX_MESSAGE_ID_LENGTH,
    split,
)
from tessera.transport.errors import NOT_FOUND, PublishFailed, PublishRefused
from tessera.transport.link import _ConnectionLost, _describe, _Link

log = structlog.get_logger("tessera.transport")

RESERVED_HEADER_PREFIX = "x-tessera-"
BCC_HEADER = "BCC"
"""RabbitMQ's sender-selected distribution: extra routing keys, removed from the message before delivery."""
_ROUTING_HEADERS = frozenset({"cc", "bcc"})  # RabbitMQ routes on "CC" and "BCC"; refused in any case
_MAX_BCC_BYTES = 32 * 1024  # per publish: the content header (with BCC) must fit in one frame (128 KiB)


@dataclass(eq=False)
class _PublishRequest:
    exchange: str
    routing_key: str
    chunks: list[bytes]
    message_type: str
    message_id: str
    headers: dict[str, Any]
    broker_headers: dict[str, Any]
    generation: int
    recipients: dict[str, str] = field(default_factory=dict)
    """Inbox queue → organisation of a multi-recipient publish, checked after the confirm."""
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
        broker_headers: Mapping[str, Any] | None = None,
        recipients: Mapping[str, str] | None = None,
    ) -> str:
        """Publish and wait for the broker's confirm; returns the message id. See the module docstring.

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
        extra = dict(broker_headers or {})
        limits = self._settings.reassembly
        if len(body) > limits.max_message_bytes:
            raise LocalUsageError(f"payload of {len(body)} bytes exceeds max_message_bytes")
        chunks = split(body, self._settings.chunk_size)
        if len(chunks) > limits.max_chunks:
            raise LocalUsageError(f"payload needs {len(chunks)} chunks, more than max_chunks")
        message_id = message_id or uuid.uuid4().hex
        if len(message_id) > MAX_MESSAGE_ID_LENGTH:
            raise LocalUsageError("message_id is too long")

        bound = self._log.bind(routing_key=routing_key, message_id=message_id, message_type=message_type)
        if BCC_HEADER in extra:
            bound = bound.bind(recipients=len(extra[BCC_HEADER]))
        deadline = time.monotonic() + self._settings.publish_timeout
        nacks = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                bound.warning("publish_failed", reason="timeout")
                raise PublishFailed(f"no confirm within {self._settings.publish_timeout} s")
            if not self._connected.wait(min(remaining, 0.5)):
                self._check_open()
                continue
            with self._lock:
                conn, generation = self._conn, self._generation
                if conn is None:
                    continue
                request = _PublishRequest(
                    self._exchange,
                    routing_key,
                    chunks,
                    message_type,
                    message_id,
                    app_headers,
                    extra,
                    generation,
                    dict(recipients or {}),
                )
                self._inflight.add(request)
            try:
                conn.add_callback_threadsafe(functools.partial(self._do_publish, request))
                finished = request.done.wait(max(0.0, deadline - time.monotonic()))
            except (pika.exceptions.AMQPError, RuntimeError, AttributeError) as exc:
                request.error, finished = _ConnectionLost(_describe(exc)), True
            finally:
                with self._lock:
                    self._inflight.discard(request)
            if not finished:
                request.cancelled = True
                continue  # the deadline check above raises
            error = request.error
            if error is None and request.missing:
                missing = tuple(request.missing)
                bound.warning("publish_failed", reason="inbox_missing", undelivered=list(missing))
                raise PublishFailed(_undelivered_reason(missing), undelivered=missing)
            if error is None:
                bound.debug("message_published", size=len(body), chunks=len(chunks))
                return message_id
            if isinstance(error, _ConnectionLost):
                bound.info("publish_retry_after_connection_loss", error=str(error))
                continue
            if isinstance(error, pika.exceptions.ChannelClosedByBroker):
                bound.warning("publish_refused", reply_code=error.reply_code, reply_text=error.reply_text)
                raise PublishRefused(error.reply_code, error.reply_text) from error
            if isinstance(error, pika.exceptions.UnroutableError):
                if request.recipients:  # a multi-recipient publish that reached none of them
                    missing = tuple(request.recipients.values())
                    bound.warning("publish_failed", reason="unroutable", undelivered=list(missing))
                    raise PublishFailed(
                        _undelivered_reason(missing), undelivered=missing, unroutable=True
                    ) from error
                bound.warning("publish_failed", reason="unroutable")
                keys = repr(routing_key) + (f" or its {BCC_HEADER} keys" if BCC_HEADER in extra else "")
                raise PublishFailed(
                    f"unroutable: no queue is bound for routing key {keys}", unroutable=True
                ) from error
            if isinstance(error, pika.exceptions.NackError):
                nacks += 1
                if nacks >= self._settings.publish_attempts:
                    bound.warning("publish_failed", reason="nacked", attempts=nacks)
                    raise PublishFailed(f"the broker nacked the message {nacks} times") from error
                delay = self._settings.connection.reconnect.delay(nacks - 1, self._rng)
                bound.info("publish_nacked_retrying", attempt=nacks, delay=round(delay, 3))
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                continue
            bound.warning("publish_failed", reason="unexpected", error=_describe(error))
            raise PublishFailed(f"unexpected publish error: {_describe(error)}") from error

    def _do_publish(self, request: _PublishRequest) -> None:
        """I/O thread: publish every chunk on the confirm channel (each call waits for its confirm)."""
        try:
            channel = self._publish_ch
            if request.cancelled:
                return
            if request.generation != self._generation or channel is None or not channel.is_open:
                request.error = _ConnectionLost("connection replaced before publishing")
                return
            total = len(request.chunks)
            for index, chunk in enumerate(request.chunks):
                headers = dict(request.headers)
                headers.update(request.broker_headers)
                if total > 1:
                    headers[HEADER_MESSAGE_ID] = request.message_id
                    headers[HEADER_CHUNK] = index
                    headers[HEADER_CHUNKS] = total
                properties = pika.BasicProperties(
                    content_type="application/octet-stream",
                    delivery_mode=pika.DeliveryMode.Persistent,
                    user_id=self.user,
                    type=request.message_type,
                    message_id=request.message_id,
                    timestamp=int(time.time()),
                    app_id="tessera",
                    headers=headers or None,
                )
                channel.basic_publish(
                    request.exchange, request.routing_key, chunk, properties=properties, mandatory=True
                )
            # After the last confirm: an inbox missing now was missing when (some chunk of) the message
            # was routed, as only this thread re-declares inboxes (on a new connection).
            request.missing = [
                org for inbox, org in request.recipients.items() if not self._queue_exists(inbox)
            ]
        except pika.exceptions.ChannelClosedByBroker as exc:
            request.error = exc
            self._reopen_publish_channel()
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            request.error = exc
        except (pika.exceptions.AMQPError, OSError) as exc:
            request.error = _ConnectionLost(_describe(exc))
        except Exception as exc:  # never let a bug kill the I/O loop silently
            request.error = exc
        finally:
            request.done.set()

    def _queue_exists(self, name: str) -> bool:
        """I/O thread: a passive declare; the broker closes the channel on a 404, so it is reopened."""
        channel = self._probe_ch
        if channel is None or not channel.is_open:
            with self._lock:
                conn = self._conn
            if conn is None or not conn.is_open:
                raise _ConnectionLost("no connection for the inbox check")
            channel = self._probe_ch = conn.channel()
        try:
            channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._probe_ch = None
            if exc.reply_code != NOT_FOUND:
                raise _ConnectionLost(f"inbox check of {name!r} failed: {_describe(exc)}") from exc
            return False
        return True

    def _reopen_publish_channel(self) -> None:
        with self._lock:
            conn = self._conn
        if conn is None or not conn.is_open:
            return
        try:
            channel = conn.channel()
            channel.confirm_delivery()
            self._publish_ch = channel
        except pika.exceptions.AMQPError as exc:
            self._log.warning("publish_channel_reopen_failed", error=_describe(exc))
