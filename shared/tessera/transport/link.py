"""The I/O thread of an endpoint: its connection to the broker, the reconnect loop, and its lifecycle.

:class:`_Link` is the base of :class:`tessera.transport.endpoint._Endpoint`; publishing
(:mod:`tessera.transport.publisher`) and consuming (:mod:`tessera.transport.consumer`) build on it. It owns
the state the three parts share (the connection, its generation, the channels, set up on each new
connection and torn down when it drops), because the I/O thread resets all of it at once.

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
import queue
import random
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Self

import pika
import pika.exceptions
import structlog
from pika.adapters.blocking_connection import BlockingChannel
from pydantic import BaseModel, ConfigDict, Field

from tessera.errors import ConfigurationError, LocalUsageError
from tessera.transport import topology as topo
from tessera.transport.chunking import Reassembler, ReassemblyLimits
from tessera.transport.confirms import ConfirmTracker
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
    PRECONDITION_FAILED,
    TransportClosed,
    TransportUnavailable,
)
from tessera.transport.inbox_probe import InboxProbe

if TYPE_CHECKING:  # the parts built on _Link; only their types are named here
    from tessera.transport.consumer import Delivery
    from tessera.transport.publisher import _PublishRequest

log = structlog.get_logger("tessera.transport")

_HEADER_ROOM = 64 * 1024  # properties and headers travel in the same broker message as the chunk
NOT_IMPLEMENTED = 540


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


class _Link:
    """The connection and the I/O thread of one endpoint; see the module docstring."""

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
        self._confirms: ConfirmTracker | None = None  # the publishing channel's confirms
        self._probe: InboxProbe | None = None  # passive declares of inboxes, several at once
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

    # ------------------------------------------------------------------ hooks of the other parts

    def _prepare(self, channel: BlockingChannel) -> None:
        """Declare (curator) or check (participant) the topology on a fresh connection."""
        raise NotImplementedError

    def _check_origin(self, sender: str, routing_key: str) -> str | None:
        """Return a rejection reason if this sender may not send here with this routing key."""
        raise NotImplementedError

    def _on_message(
        self,
        channel: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        """A delivery on the consuming channel (:mod:`tessera.transport.consumer`)."""
        raise NotImplementedError

    def _update_qos(self, *, between_events: bool = False) -> None:
        """Fit the prefetch window to what is held (:mod:`tessera.transport.consumer`)."""
        raise NotImplementedError

    def _reject_tags(
        self, tags: tuple[int, ...], reason: str, sender: str | None, message_id: str | None
    ) -> None:
        """Reject deliveries without requeue (:mod:`tessera.transport.consumer`)."""
        raise NotImplementedError

    def _reopen_publish_channel(self) -> None:
        """Replace a publishing channel the broker closed (:mod:`tessera.transport.publisher`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ I/O thread

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
        self._confirms = ConfirmTracker(publish)
        self._probe = InboxProbe(conn)
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
        self._consume_ch = self._publish_ch = None
        self._probe = None
        if self._confirms is not None:
            self._confirms.fail_all(_ConnectionLost("connection closed"))
            self._confirms = None
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
