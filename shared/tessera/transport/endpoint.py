"""The curator's and a participant's endpoints: publish with confirms, receive with manual acks, reconnect.

Threading — one I/O thread per endpoint, a queue to the application
-------------------------------------------------------------------
Each endpoint owns a background I/O thread that is the only user of its pika ``BlockingConnection`` (pika
is not thread-safe). That thread loops on ``process_data_events``, so heartbeats are answered however long
the application computes; the alternative, an application that calls ``poll()`` often, would drop the
connection during a 30 s training step or a large secure-aggregation computation (the pitfall "timeouts
tied to training time"), and would put that burden on every caller. The application thread:

- receives whole messages from a ``queue.Queue`` (:meth:`receive`);
- hands acks and rejects back to the I/O thread with ``connection.add_callback_threadsafe``;
- publishes by handing a request to the I/O thread the same way and waiting for the broker's confirm.

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

Reconnect
---------
When the connection drops, the I/O thread reconnects with exponential backoff and jitter (logged), declares
what it needs again and resumes consuming. Everything not acked before the drop is redelivered by the
broker with ``redelivered=True``; acks of deliveries from the old connection are ignored (their delivery
tags died with the channel), and such deliveries still waiting in the queue are dropped, because the broker
sends them again. Handlers must therefore tolerate a message twice (use ``message_id``). A publish that was
in flight when the connection dropped is retried on the new connection until ``publish_timeout``.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import random
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import pika
import pika.exceptions
import structlog
from pika.adapters.blocking_connection import BlockingChannel
from pydantic import BaseModel, ConfigDict, Field

from tessera.errors import ConfigurationError, LocalUsageError
from tessera.transport import topology as topo
from tessera.transport.chunking import (
    CHUNK_HEADERS,
    HEADER_CHUNK,
    HEADER_CHUNKS,
    HEADER_MESSAGE_ID,
    MAX_MESSAGE_ID_LENGTH,
    Complete,
    Reassembler,
    ReassemblyLimits,
    Rejected,
    split,
)
from tessera.transport.connection import (
    BROKER_MAX_MESSAGE_BYTES,
    MIB,
    ConnectionSettings,
    connection_parameters,
    connection_parameters_list,
    parameters_username,
    redact_url,
)
from tessera.transport.errors import (
    ACCESS_REFUSED,
    NOT_FOUND,
    PRECONDITION_FAILED,
    PublishFailed,
    PublishRefused,
    TransportClosed,
    TransportUnavailable,
)

log = structlog.get_logger("tessera.transport")

RESERVED_HEADER_PREFIX = "x-tessera-"
BCC_HEADER = "BCC"
"""RabbitMQ's sender-selected distribution: extra routing keys, removed from the message before delivery."""
_ROUTING_HEADERS = frozenset({"cc", "bcc"})  # RabbitMQ routes on "CC" and "BCC"; refused in any case
_MAX_BCC_BYTES = 32 * 1024  # per publish: the content header (with BCC) must fit in one frame (128 KiB)
_HEADER_ROOM = 64 * 1024  # properties and headers travel in the same broker message as the chunk
NOT_IMPLEMENTED = 540
_DELIVERY_COUNT_HEADER = "x-delivery-count"


class TransportSettings(BaseModel):
    """Everything an endpoint needs besides its federation and identity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    connection: ConnectionSettings
    prefetch: int = Field(default=8, ge=1, le=10_000, description="unacked whole messages delivered at once")
    chunk_size: int = Field(
        default=8 * MIB,
        ge=1,
        le=BROKER_MAX_MESSAGE_BYTES - _HEADER_ROOM,
        description="largest broker message body",
    )
    reassembly: ReassemblyLimits = ReassemblyLimits()
    publish_timeout: float = Field(
        default=60.0, gt=0, description="give up on an unconfirmed publish after, s"
    )
    publish_attempts: int = Field(default=3, ge=1, description="attempts of a publish the broker nacks")
    start_timeout: float = Field(default=30.0, gt=0, description="wait this long for the first connection, s")
    poll_interval: float = Field(
        default=0.2, gt=0, le=5.0, description="I/O thread's longest wait for events, s"
    )
    queue_type: topo.QueueType = Field(
        default=topo.QueueType.AUTO,
        description="x-queue-type of the queues the curator declares: auto (quorum where the broker "
        "supports it and the queues are not classic already), quorum or classic",
    )


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


class _ConnectionLost(Exception):
    """Internal: the connection went away before the publish was confirmed."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _refuses_global_qos(exc: BaseException) -> bool:
    """The broker's answer to a channel-wide window on a quorum queue's consumer."""
    return (
        isinstance(exc, pika.exceptions.ConnectionClosedByBroker)
        and exc.reply_code == NOT_IMPLEMENTED
        and "global qos" in str(exc.reply_text)
    )


def _is_fatal_at_start(exc: BaseException) -> bool:
    """Errors that retrying cannot fix (wrong credentials, no access to the vhost, missing permission, a
    queue that exists with other arguments such as another queue type)."""
    if isinstance(
        exc,
        pika.exceptions.ProbableAuthenticationError
        | pika.exceptions.AuthenticationError
        | pika.exceptions.ProbableAccessDeniedError
        | ConfigurationError,
    ):
        return True
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker) and exc.reply_code in (403, 530):
        return True
    return isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code in (
        ACCESS_REFUSED,
        PRECONDITION_FAILED,
    )


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


class _Endpoint:
    """Common machinery of both endpoints; see the module docstring. Use as a context manager or call
    :meth:`start` and :meth:`close`."""

    _role = "endpoint"

    def __init__(
        self,
        settings: TransportSettings,
        *,
        federation: str,
        expected_user: str,
        inbox: str,
        exchange: str,
    ) -> None:
        self._settings = settings
        self.federation = topo.validate_federation_id(federation)
        self._params = connection_parameters(
            settings.connection,
            virtual_host=topo.vhost(federation),
            connection_name=f"tessera-{self._role}-{expected_user}",
        )
        # The URL's broker, then ``connection.addresses``: each (re)connect tries them in turn, starting
        # after the one whose connection was lost (in a cluster, another node is the likelier to answer).
        self._params_list = connection_parameters_list(
            settings.connection,
            virtual_host=topo.vhost(federation),
            connection_name=f"tessera-{self._role}-{expected_user}",
        )
        self._first_address = 0
        self.user = parameters_username(self._params)
        if self.user != expected_user:
            raise ConfigurationError(
                f"the {self._role} must connect as broker user {expected_user!r}, not {self.user!r}"
            )
        self._inbox = inbox
        self._exchange = exchange
        self._log = log.bind(
            endpoint=self._role,
            user=self.user,
            vhost=self._params.virtual_host,
            broker=redact_url(settings.connection.url.get_secret_value()),
        )
        self._deliveries: queue.Queue[Delivery] = queue.Queue()
        self._lock = threading.Lock()
        self._conn: pika.BlockingConnection | None = None
        self._generation = 0
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None
        self._inflight: set[_PublishRequest] = set()
        self._rng = random.Random()
        # Owned by the I/O thread only.
        self._consume_ch: BlockingChannel | None = None
        self._publish_ch: BlockingChannel | None = None
        self._probe_ch: BlockingChannel | None = None  # passive declares, which close it on a 404
        self._reassembler: Reassembler[int] = Reassembler(settings.reassembly, time.monotonic)
        self._app_extra = 0
        self._qos = 0
        # Per-consumer windows (quorum inboxes, see the module docstring): the current consumer, its
        # window, and every unsettled delivery tag with the consumer it came from.
        self._per_consumer_qos = settings.queue_type is topo.QueueType.QUORUM
        self._consumer_tag: str | None = None
        self._consumer_window = 0
        self._unsettled: dict[int, str] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Start the I/O thread and wait for the first connection. Raises :class:`TransportUnavailable`
        (credentials, permissions, or no broker within ``start_timeout``)."""
        if self._thread is not None:
            raise LocalUsageError("the endpoint was already started")
        self._thread = threading.Thread(target=self._run, name=f"tessera-{self._role}-io", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._settings.start_timeout
        while not self._connected.wait(0.05):
            if self._fatal is not None or not self._thread.is_alive():
                cause = self._fatal
                self.close()
                raise TransportUnavailable(f"cannot connect: {cause and _describe(cause)}") from cause
            if time.monotonic() > deadline:
                self.close()
                raise TransportUnavailable(
                    f"no usable broker connection within {self._settings.start_timeout} s"
                )
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the I/O thread and close the connection. Unacked deliveries go back to their queue."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._fail_inflight()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _check_open(self) -> None:
        if self._thread is None and not self._stop.is_set():
            raise LocalUsageError("call start() (or use the endpoint as a context manager) first")
        if self._stop.is_set() or self._thread is None or not self._thread.is_alive():
            cause = self._fatal
            raise TransportClosed("the endpoint is closed" + (f": {_describe(cause)}" if cause else ""))

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
                    raise PublishFailed(_undelivered_reason(missing), undelivered=missing) from error
                bound.warning("publish_failed", reason="unroutable")
                keys = repr(routing_key) + (f" or its {BCC_HEADER} keys" if BCC_HEADER in extra else "")
                raise PublishFailed(f"unroutable: no queue is bound for routing key {keys}") from error
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

    # ------------------------------------------------------------------ I/O thread

    def _prepare(self, channel: BlockingChannel) -> None:
        """Declare (curator) or check (participant) the topology on a fresh connection."""
        raise NotImplementedError

    def _check_origin(self, sender: str, routing_key: str) -> str | None:
        """Return a rejection reason if this sender may not send here with this routing key."""
        raise NotImplementedError

    def _run(self) -> None:
        policy = self._settings.connection.reconnect
        failures = 0
        ever_connected = False
        try:
            while not self._stop.is_set():
                conn: pika.BlockingConnection | None = None
                try:
                    conn = pika.BlockingConnection(self._addresses_in_turn())
                    self._setup(conn)
                except Exception as exc:
                    self._close_quietly(conn)
                    if _refuses_global_qos(exc) and not self._per_consumer_qos:
                        self._per_consumer_qos = True
                        self._log.info("per_consumer_prefetch_selected", reason="inbox is a quorum queue")
                        continue
                    failures += 1
                    if not ever_connected and _is_fatal_at_start(exc):
                        self._fatal = exc
                        self._log.error("broker_connect_refused", error=_describe(exc))
                        return
                    if policy.max_attempts is not None and failures >= policy.max_attempts:
                        self._fatal = exc
                        self._log.error("broker_reconnect_gave_up", attempts=failures, error=_describe(exc))
                        return
                    delay = policy.delay(failures - 1, self._rng)
                    self._log.warning(
                        "broker_connect_failed",
                        attempt=failures,
                        retry_in=round(delay, 3),
                        error=_describe(exc),
                    )
                    self._stop.wait(delay)
                    continue

                failures = 0
                ever_connected = True
                with self._lock:
                    self._conn = conn
                    self._generation += 1
                self._connected.set()
                address = self._note_address(conn)
                self._log.info(
                    "broker_connected",
                    generation=self._generation,
                    prefetch=self._qos,
                    address=address,
                    per_consumer_prefetch=self._per_consumer_qos,
                )
                try:
                    self._loop(conn)
                except Exception as exc:
                    self._log.warning("broker_connection_lost", error=_describe(exc))
                finally:
                    self._disconnect(conn)
                if not self._stop.is_set():
                    delay = policy.delay(0, self._rng)
                    self._log.info("broker_reconnect_scheduled", retry_in=round(delay, 3))
                    self._stop.wait(delay)
        finally:
            self._connected.clear()
            self._fail_inflight()
            self._log.info("transport_stopped")

    def _addresses_in_turn(self) -> list[pika.ConnectionParameters]:
        first = self._first_address % len(self._params_list)
        return self._params_list[first:] + self._params_list[:first]

    def _note_address(self, conn: pika.BlockingConnection) -> str:
        """Which of the addresses answered; the next reconnect starts with the one after it."""
        used = getattr(getattr(conn, "_impl", None), "params", None)
        for index, params in enumerate(self._params_list):
            if used is not None and (params.host, params.port) == (used.host, used.port):
                self._first_address = index + 1
                return f"{params.host}:{params.port}"
        return "?"

    def _setup(self, conn: pika.BlockingConnection) -> None:
        consume = conn.channel()
        self._prepare(consume)
        publish = conn.channel()
        publish.confirm_delivery()
        self._qos = self._settings.prefetch
        self._unsettled.clear()
        self._consumer_tag = None
        if self._per_consumer_qos:
            consume.basic_qos(prefetch_count=self._qos, global_qos=False)
            self._consumer_window = self._qos
        else:
            consume.basic_qos(prefetch_count=self._qos, global_qos=True)
        self._consumer_tag = consume.basic_consume(self._inbox, self._on_message, auto_ack=False)
        self._consume_ch, self._publish_ch = consume, publish
        self._app_extra = 0
        self._reassembler.clear()

    def _loop(self, conn: pika.BlockingConnection) -> None:
        interval = self._settings.poll_interval
        while not self._stop.is_set():
            conn.process_data_events(time_limit=interval)
            if self._consume_ch is None or not self._consume_ch.is_open:
                raise _ConnectionLost("the consuming channel was closed")
            if self._publish_ch is None or not self._publish_ch.is_open:
                self._reopen_publish_channel()
            for rejected in self._reassembler.expire():
                self._reject_tags(rejected.tokens, rejected.reason, rejected.sender, rejected.message_id)
            self._update_qos(between_events=True)

    def _disconnect(self, conn: pika.BlockingConnection) -> None:
        if self._stop.is_set() and conn.is_open:
            # Clean shutdown: run the acks and publishes the application handed over just before close().
            with contextlib.suppress(Exception):
                conn.process_data_events(time_limit=0)
        with self._lock:
            self._conn = None
            self._connected.clear()
        self._consume_ch = self._publish_ch = self._probe_ch = None
        self._consumer_tag = None
        self._unsettled.clear()
        self._reassembler.clear()
        self._app_extra = 0
        self._fail_inflight()
        self._close_quietly(conn)

    def _close_quietly(self, conn: pika.BlockingConnection | None) -> None:
        if conn is not None and conn.is_open:
            with contextlib.suppress(Exception):
                conn.close()

    def _fail_inflight(self) -> None:
        with self._lock:
            pending = list(self._inflight)
        for request in pending:
            if not request.done.is_set():
                request.error = _ConnectionLost("connection closed")
                request.done.set()

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


class CuratorTransport(_Endpoint):
    """The curator's endpoint: declares the topology, sends to one organisation (``to.X``), to several
    (``to.selected`` with their ``to.X`` keys in ``BCC``) or to all (``to.all``), and receives from
    ``curator.inbox`` (only from the roster's organisations, each only with its own routing key
    ``from.X[.suffix]``)."""

    _role = "curator"

    def __init__(
        self,
        settings: TransportSettings,
        *,
        federation: str,
        organisations: tuple[str, ...] | list[str],
        curator_user: str = topo.CURATOR_USER,
    ) -> None:
        self.organisations = topo.validate_organisations(organisations)
        if curator_user in self.organisations:
            raise ConfigurationError("the curator's user name is also an organisation id")
        super().__init__(
            settings,
            federation=federation,
            expected_user=curator_user,
            inbox=topo.CURATOR_INBOX,
            exchange=topo.TO_PARTICIPANTS_EXCHANGE,
        )
        self._roster = frozenset(self.organisations)
        self.queue_type: topo.QueueType | None = None
        """The type the curator declared its queues with on the last connection (``auto`` resolved)."""

    def send(
        self,
        organisation: str,
        body: bytes,
        *,
        message_type: str,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Publish to one organisation's inbox and wait for the confirm; returns the message id."""
        if organisation not in self._roster:
            raise LocalUsageError(f"{organisation!r} is not in this federation's roster")
        return self._publish(
            topo.to_organisation_key(organisation),
            body,
            message_type=message_type,
            headers=headers,
            message_id=message_id,
        )

    def send_many(
        self,
        organisations: Iterable[str],
        body: bytes,
        *,
        message_type: str,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Publish ``body`` once to the inboxes of ``organisations`` (duplicates count once) and wait for the
        confirm; returns the message id, the same for every recipient. Each recipient receives it once,
        with routing key ``to.selected`` and without the list of recipients (see the module docstring).
        Every organisation must be in the roster and there must be at least one, or nothing is published
        (:class:`LocalUsageError`). A list too long for one message header (32 KiB of keys: several hundred
        organisations) is split over several publishes, each confirmed. Raises :class:`PublishFailed` with
        ``undelivered`` naming the organisations whose inbox is missing (the others received it)."""
        if isinstance(organisations, str | bytes):
            raise LocalUsageError("organisations must be a collection of organisation ids, not one string")
        recipients = list(dict.fromkeys(organisations))
        if not recipients:
            raise LocalUsageError("send_many needs at least one organisation")
        unknown = [o for o in recipients if o not in self._roster]
        if unknown:
            raise LocalUsageError(f"{unknown!r} are not in this federation's roster")
        message_id = message_id or uuid.uuid4().hex
        by_key = {topo.to_organisation_key(o): o for o in recipients}
        undelivered: list[str] = []
        for batch in _bcc_batches(list(by_key)):
            try:
                self._publish(
                    topo.SELECTED_KEY,
                    body,
                    message_type=message_type,
                    headers=headers,
                    message_id=message_id,
                    broker_headers={BCC_HEADER: batch},
                    recipients={topo.participant_inbox(by_key[k]): by_key[k] for k in batch},
                )
            except PublishFailed as exc:
                if not exc.undelivered:
                    raise
                undelivered += exc.undelivered  # the later batches' recipients still get theirs
        if undelivered:
            missing = tuple(undelivered)
            raise PublishFailed(_undelivered_reason(missing), undelivered=missing)
        return message_id

    def broadcast(
        self,
        body: bytes,
        *,
        message_type: str,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Publish to every organisation's inbox (routing key ``to.all``)."""
        return self._publish(
            topo.BROADCAST_KEY, body, message_type=message_type, headers=headers, message_id=message_id
        )

    def _prepare(self, channel: BlockingChannel) -> None:
        queue_type = topo.resolve_queue_type(channel.connection, self._settings.queue_type)
        self.queue_type = queue_type
        self._per_consumer_qos = queue_type is topo.QueueType.QUORUM
        topo.declare_topology(channel, self.federation, self.organisations, queue_type)

    def _check_origin(self, sender: str, routing_key: str) -> str | None:
        if sender not in self._roster:
            return "unknown_sender"
        own = f"from.{sender}"
        if routing_key != own and not routing_key.startswith(own + "."):
            return "routing_key_does_not_match_sender"
        return None


class ParticipantTransport(_Endpoint):
    """An organisation's endpoint: sends to the curator (``from.X`` or ``from.X.<suffix>``) and receives
    from its own inbox, only messages whose ``user_id`` is the curator's and whose routing key is ``to.X``,
    ``to.selected`` or ``to.all``."""

    _role = "participant"

    def __init__(
        self,
        settings: TransportSettings,
        *,
        federation: str,
        organisation: str,
        curator_user: str = topo.CURATOR_USER,
    ) -> None:
        self.organisation = topo.validate_organisation_id(organisation)
        self.curator_user = curator_user
        super().__init__(
            settings,
            federation=federation,
            expected_user=organisation,
            inbox=topo.participant_inbox(organisation),
            exchange=topo.TO_CURATOR_EXCHANGE,
        )
        self._accepted_keys = frozenset(
            {topo.to_organisation_key(organisation), topo.SELECTED_KEY, topo.BROADCAST_KEY}
        )

    def send(
        self,
        body: bytes,
        *,
        message_type: str,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        suffix: str | None = None,
    ) -> str:
        """Publish to the curator and wait for the confirm; returns the message id."""
        return self._publish(
            topo.from_organisation_key(self.organisation, suffix),
            body,
            message_type=message_type,
            headers=headers,
            message_id=message_id,
        )

    def _prepare(self, channel: BlockingChannel) -> None:
        # Organisations may not configure anything; the inbox must already exist (the curator declares
        # it). A 404 here means the curator has not run yet: the reconnect loop retries with backoff.
        channel.queue_declare(self._inbox, passive=True)

    def _check_origin(self, sender: str, routing_key: str) -> str | None:
        if sender != self.curator_user:
            return "sender_is_not_the_curator"
        if routing_key not in self._accepted_keys:
            return "unexpected_routing_key"
        return None


__all__ = ["BCC_HEADER", "CuratorTransport", "Delivery", "ParticipantTransport", "TransportSettings"]
