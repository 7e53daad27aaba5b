"""What the services need from a message bus, and an in-process implementation of it.

The services are written against :class:`CuratorBus` and :class:`ParticipantBus`. Over RabbitMQ they are
:class:`tessera.transport.CuratorTransport` and :class:`tessera.transport.ParticipantTransport`; for a
federation inside one process (the demo's fallback when no broker is reachable, research at large n) they
are the endpoints of a :class:`LocalExchange`, which keeps the properties the services rely on: the sender
of every message is authenticated by the bus, not by the message, and each inbox is read by its owner only.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tessera.errors import LocalUsageError


class Received(Protocol):
    """One whole message taken from an inbox."""

    @property
    def sender(self) -> str: ...

    @property
    def body(self) -> bytes: ...

    @property
    def message_type(self) -> str | None: ...

    @property
    def redelivered(self) -> bool: ...


@dataclass(frozen=True)
class Envelope:
    """One message for :meth:`CuratorBus.send_each`: ``body`` to each of ``organisations``."""

    organisations: tuple[str, ...] | list[str]
    body: bytes
    message_type: str
    headers: Mapping[str, Any] | None = None
    message_id: str | None = None
    fan_out: bool = False
    """Send as :meth:`CuratorBus.send_many` does even to one organisation (routing key
    ``to.selected``), so that a recipient cannot tell whether others received the same message."""


@dataclass(frozen=True)
class Sent:
    """What became of one :class:`Envelope`: its message id, and the organisations it did not reach
    because their inbox does not exist (empty when all received it)."""

    message_id: str
    undelivered: tuple[str, ...] = ()


class CuratorBus(Protocol):
    def send(self, organisation: str, body: bytes, *, message_type: str) -> str: ...

    def send_many(self, organisations: Iterable[str], body: bytes, *, message_type: str) -> str:
        """Deliver ``body`` once to each of ``organisations`` (duplicates count once; every one must be in
        the roster and there must be at least one, else :class:`LocalUsageError` and nothing is sent);
        returns the message id, the same for every recipient. No recipient learns who else received it."""
        ...

    def send_each(self, envelopes: Sequence[Envelope]) -> list[Sent]:
        """Send several messages at once (their delivery overlaps) and wait until all are delivered. Every
        envelope is checked before anything is sent; returns one :class:`Sent` per envelope, naming the
        organisations it could not reach (their inbox is gone); any other failure is raised."""
        ...

    def broadcast(self, body: bytes, *, message_type: str) -> str: ...

    def receive(self, timeout: float | None = None) -> Received | None: ...

    # Each bus settles only the deliveries it handed out, hence Any rather than Received.
    def ack(self, delivery: Any) -> bool: ...

    def reject(self, delivery: Any, reason: str) -> bool: ...


class ParticipantBus(Protocol):
    def send(self, body: bytes, *, message_type: str) -> str: ...

    def receive(self, timeout: float | None = None) -> Received | None: ...

    # Each bus settles only the deliveries it handed out, hence Any rather than Received.
    def ack(self, delivery: Any) -> bool: ...

    def reject(self, delivery: Any, reason: str) -> bool: ...


@dataclass(frozen=True)
class LocalDelivery:
    sender: str
    body: bytes = field(repr=False)
    message_type: str | None
    message_id: str
    redelivered: bool = False


class LocalExchange:
    """In-process message routing between one curator and its organisations (thread-safe)."""

    def __init__(self, organisations: tuple[str, ...] | list[str], curator: str = "curator") -> None:
        self.curator = curator
        self.organisations = tuple(organisations)
        self._inboxes: dict[str, queue.Queue[LocalDelivery]] = {
            name: queue.Queue() for name in (curator, *self.organisations)
        }
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.dead_letters: list[tuple[LocalDelivery, str]] = []

    def _new_id(self) -> str:
        with self._lock:
            return f"local-{next(self._ids)}"

    def _post(
        self, sender: str, recipient: str, body: bytes, message_type: str, message_id: str | None = None
    ) -> str:
        message_id = message_id or self._new_id()
        self._inboxes[recipient].put(LocalDelivery(sender, bytes(body), message_type, message_id))
        return message_id

    def curator_endpoint(self) -> LocalCuratorEndpoint:
        return LocalCuratorEndpoint(self)

    def participant_endpoint(self, organisation: str) -> LocalParticipantEndpoint:
        if organisation not in self.organisations:
            raise LocalUsageError(f"{organisation!r} is not an organisation of this exchange")
        return LocalParticipantEndpoint(self, organisation)


class _LocalEndpoint:
    def __init__(self, exchange: LocalExchange, name: str) -> None:
        self._exchange = exchange
        self._name = name

    def receive(self, timeout: float | None = None) -> LocalDelivery | None:
        try:
            return self._exchange._inboxes[self._name].get(timeout=timeout)
        except queue.Empty:
            return None

    def ack(self, delivery: Received) -> bool:
        return True

    def reject(self, delivery: Received, reason: str) -> bool:
        assert isinstance(delivery, LocalDelivery)
        self._exchange.dead_letters.append((delivery, reason))
        return True


class LocalCuratorEndpoint(_LocalEndpoint):
    def __init__(self, exchange: LocalExchange) -> None:
        super().__init__(exchange, exchange.curator)

    def _recipients(self, organisations: Iterable[str]) -> list[str]:
        if isinstance(organisations, str | bytes):
            raise LocalUsageError("organisations must be a collection of organisation ids, not one string")
        recipients = list(dict.fromkeys(organisations))
        if not recipients:
            raise LocalUsageError("a message needs at least one organisation")
        unknown = [o for o in recipients if o not in self._exchange.organisations]
        if unknown:
            raise LocalUsageError(f"{unknown!r} are not in this federation's roster")
        return recipients

    def send(self, organisation: str, body: bytes, *, message_type: str) -> str:
        if organisation not in self._exchange.organisations:
            raise LocalUsageError(f"{organisation!r} is not in this federation's roster")
        return self._exchange._post(self._name, organisation, body, message_type)

    def send_many(self, organisations: Iterable[str], body: bytes, *, message_type: str) -> str:
        recipients = self._recipients(organisations)
        message_id = self._exchange._new_id()
        for organisation in recipients:
            self._exchange._post(self._name, organisation, body, message_type, message_id)
        return message_id

    def send_each(self, envelopes: Sequence[Envelope]) -> list[Sent]:
        for envelope in envelopes:  # all checked first: nothing is sent if one is wrong
            self._recipients(envelope.organisations)
        out = []
        for envelope in envelopes:
            recipients = self._recipients(envelope.organisations)
            message_id = envelope.message_id or self._exchange._new_id()
            for organisation in recipients:
                self._exchange._post(
                    self._name, organisation, envelope.body, envelope.message_type, message_id
                )
            out.append(Sent(message_id))
        return out

    def broadcast(self, body: bytes, *, message_type: str) -> str:
        ids = [
            self._exchange._post(self._name, org, body, message_type) for org in self._exchange.organisations
        ]
        return ids[0] if ids else ""


class LocalParticipantEndpoint(_LocalEndpoint):
    def send(self, body: bytes, *, message_type: str) -> str:
        return self._exchange._post(self._name, self._exchange.curator, body, message_type)


__all__ = [
    "CuratorBus",
    "Envelope",
    "LocalCuratorEndpoint",
    "LocalDelivery",
    "LocalExchange",
    "LocalParticipantEndpoint",
    "ParticipantBus",
    "Received",
    "Sent",
]
