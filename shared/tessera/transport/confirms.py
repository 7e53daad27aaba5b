"""Publisher confirms tracked per channel, so that several publishes are in flight at once.

Why not pika's confirm mode
---------------------------
``BlockingChannel.confirm_delivery`` makes every ``basic_publish`` wait for its own ``basic.ack``: one
broker round trip (for a persistent message, a disk write) per message, in sequence. A curator that sends
ten different messages in one secure-aggregation phase then waits for ten confirms one after the other.
RabbitMQ confirms asynchronously and batches its disk writes, so the waits can overlap: this module turns
confirm mode on at the level of pika's asynchronous channel under the blocking one (``channel._impl``, the
one private attribute used; pika is pinned below 2 for it) and tracks the confirms itself.

How a publish is settled
------------------------
After ``confirm.select`` the broker numbers the channel's publishes 1, 2, ... and answers each with an ack
or a nack, possibly one for several (``multiple``). A mandatory message that no queue takes is first
returned (``basic.return``), then acked. A :class:`ConfirmTracker` keeps the delivery tags it has not heard
about yet, each with the :class:`Flight` it belongs to (one message, possibly several chunks) and the
chunk's ``(message id, chunk index)``, which is how a return (which carries no delivery tag) finds its
publish: a returned chunk marks its flight unroutable. So that this is never ambiguous, a message id is in
flight at most once per channel: a second flight with the same id waits until the first is settled (and is published on the connection's
next turn) (only
retries and the batches of one multi-recipient send reuse an id). A flight settles when all its chunks
are published and confirmed (:meth:`Flight.on_settled` is then called on the I/O thread); a nack or a
return of any chunk makes it fail, and a channel the broker closes (a refused publish, e.g. a ``user_id``
that is not the sender's) fails every flight still open on it with that reason: the broker does not say
which publish it refused.

Everything here runs on the endpoint's I/O thread (pika's callbacks included), never concurrently.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from tessera.transport.chunking import HEADER_CHUNK

ChunkKey = tuple[str, int]


@dataclass(eq=False)
class Flight:
    """One message on its way: its chunks' publish arguments and what the broker said about them."""

    message_id: str
    exchange: str
    routing_key: str
    chunks: list[tuple[bytes, pika.BasicProperties]]
    on_settled: Callable[[Flight], None]
    """Called once, on the I/O thread, when every chunk is confirmed or the flight failed."""
    unconfirmed: int = 0
    published: bool = False
    returned: bool = False
    nacked: bool = False
    error: BaseException | None = None
    """Why the flight failed as a whole (the channel closed under it); ``None`` otherwise."""
    settled: bool = False
    context: Any = field(default=None)
    """The caller's own object (the publish request this flight carries)."""


def chunk_key(message_id: str, properties: pika.BasicProperties) -> ChunkKey:
    headers = properties.headers or {}
    index = headers.get(HEADER_CHUNK, 0)
    return (message_id, int(index) if isinstance(index, int) else 0)


class ConfirmTracker:
    """Confirm mode on one publishing channel, with any number of publishes awaiting their confirm."""

    def __init__(self, channel: BlockingChannel) -> None:
        self.channel = channel
        impl = channel._impl  # see the module docstring: pika's blocking confirm mode waits per publish
        # No completion callback: confirm.select with nowait, so no round trip before the first publish.
        impl.confirm_delivery(ack_nack_callback=self._on_confirm)
        impl.add_on_return_callback(self._on_return)
        impl.add_on_close_callback(self._on_close)
        self._next_tag = 1
        self._open: dict[int, tuple[Flight, ChunkKey]] = {}  # in ascending tag order
        self._open_keys: dict[ChunkKey, int] = {}
        self._flying_ids: dict[str, Flight] = {}
        self._waiting: deque[Flight] = deque()  # flights whose message id is already in flight
        self._closed: BaseException | None = None

    @property
    def in_flight(self) -> int:
        """Publishes sent and not yet confirmed."""
        return len(self._open)

    def send(self, flight: Flight) -> None:
        """Publish every chunk of ``flight`` now (or once an earlier flight with its id is settled)."""
        if self._closed is not None:
            self._fail(flight, self._closed)
            return
        if self._flying_ids.get(flight.message_id, flight) is not flight:
            self._waiting.append(flight)
            return
        self._flying_ids[flight.message_id] = flight
        try:
            for body, properties in flight.chunks:
                key = chunk_key(flight.message_id, properties)
                tag = self._next_tag
                # Registered before the publish: pika may read the ack while flushing this very publish.
                self._open[tag] = (flight, key)
                self._open_keys[key] = tag
                flight.unconfirmed += 1
                self._next_tag += 1
                self.channel.basic_publish(
                    flight.exchange, flight.routing_key, body, properties=properties, mandatory=True
                )
            flight.published = True
        except (pika.exceptions.AMQPError, OSError) as exc:
            # The channel or the connection went away mid-flight; _on_close fails the rest.
            self._fail(flight, exc)
            return
        self._settle_if_done(flight)

    def fail_all(self, error: BaseException) -> None:
        """Settle every open and waiting flight with ``error`` (the connection is gone)."""
        self._closed = self._closed or error
        flights = {id(f): f for f, _ in self._open.values()}
        flights.update((id(f), f) for f in self._waiting)
        self._open.clear()
        self._open_keys.clear()
        self._waiting.clear()
        for flight in flights.values():
            self._fail(flight, error)

    # ------------------------------------------------------------------ pika's callbacks

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        nack = isinstance(method, pika.spec.Basic.Nack)
        tags = (
            [t for t in self._open if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        )
        touched: dict[int, Flight] = {}
        for tag in tags:
            entry = self._open.pop(tag, None)
            if entry is None:
                continue
            flight, key = entry
            if self._open_keys.get(key) == tag:
                del self._open_keys[key]
            flight.unconfirmed -= 1
            flight.nacked = flight.nacked or nack
            touched[id(flight)] = flight
        for flight in touched.values():
            self._settle_if_done(flight)

    def _on_return(self, _channel: Any, _method: Any, properties: pika.BasicProperties, _body: bytes) -> None:
        key = chunk_key(properties.message_id or "", properties)
        tag = self._open_keys.get(key)
        if tag is not None:
            self._open[tag][0].returned = True

    def _on_close(self, _channel: Any, reason: BaseException) -> None:
        self.fail_all(reason)

    # ------------------------------------------------------------------ settling

    def _settle_if_done(self, flight: Flight) -> None:
        if flight.published and flight.unconfirmed == 0:
            self._settle(flight)

    def _fail(self, flight: Flight, error: BaseException) -> None:
        flight.error = flight.error or error
        self._settle(flight)

    def _settle(self, flight: Flight) -> None:
        if flight.settled:
            return
        flight.settled = True
        if self._flying_ids.get(flight.message_id) is flight:
            del self._flying_ids[flight.message_id]
        try:
            flight.on_settled(flight)
        finally:
            self._release_waiting(flight.message_id)

    def _release_waiting(self, message_id: str) -> None:
        for waiting in list(self._waiting):
            if waiting.message_id == message_id:
                self._waiting.remove(waiting)
                if self._closed is not None:
                    self._fail(waiting, self._closed)
                    return
                # Settling runs inside pika's frame handling, where publishing again would re-enter its
                # output flush: publish from the connection's next turn instead.
                self._flying_ids[message_id] = waiting  # its turn: no other flight of this id goes first
                try:
                    self.channel.connection.add_callback_threadsafe(functools.partial(self.send, waiting))
                except (pika.exceptions.AMQPError, RuntimeError) as exc:
                    self._fail(waiting, exc)
                return


__all__ = ["ConfirmTracker", "Flight"]
