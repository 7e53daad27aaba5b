"""The two-layer envelope, opened and closed in one place for both services.

A federation message is one AMQP body (:mod:`tessera.protocol`): a typed, validated header and a binary
payload, which for :class:`~tessera.protocol.SecAgg` is a secure-aggregation message in its own wire format
(:mod:`tessera.secagg.wire`). Services never build or parse either layer by hand:

- :func:`seal` / :func:`seal_secagg` turn a header (and payload) or a protocol message into a
  :class:`Sealed` body with the AMQP message type that names its kind;
- :func:`admit` takes an authenticated delivery and either admits it (:class:`Admitted`: sender, header,
  payload) or refuses it with the reason to log and dead-letter (:class:`Refused`): unknown sender, bytes that
  do not decode, a payload over the limit, a message for another federation. :meth:`Admitted.secagg` opens
  the inner layer under the aggregation's limits.

Nothing here raises for untrusted input except :class:`~tessera.errors.ProtocolError` from
:meth:`Admitted.secagg`, and nothing touches a socket.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from tessera import protocol
from tessera.bus import Envelope, Received
from tessera.errors import ProtocolError
from tessera.secagg import wire
from tessera.secagg.curator import Outgoing
from tessera.secagg.messages import Message
from tessera.secagg.wire import WireLimits

MESSAGE_TYPES: dict[type[protocol.Header], str] = {
    protocol.RoundAnnouncement: "round",
    protocol.Ready: "ready",
    protocol.Leave: "leave",
    protocol.Finished: "finished",
    protocol.SecAgg: "secagg",
}
"""The AMQP ``type`` property of each kind of message (for the broker's and the operators' eyes only: the
receiver trusts the header, never this)."""


@dataclass(frozen=True)
class Sealed:
    """A message ready to publish: its body and its AMQP message type."""

    body: bytes
    message_type: str


def seal(header: protocol.Header, payload: bytes = b"") -> Sealed:
    """The body of a federation message and its message type."""
    return Sealed(protocol.encode(header, payload), MESSAGE_TYPES[type(header)])


def seal_secagg(federation: str, message: Message) -> Sealed:
    """A secure-aggregation message inside its federation envelope."""
    return seal(protocol.SecAgg(federation=federation), wire.encode(message))


def secagg_envelopes(
    federation: str, outgoing: Iterable[Outgoing], organisation_of: Callable[[int], str]
) -> list[Envelope]:
    """One protocol step's messages as bus envelopes, one per message (none for a message to nobody); the bus
    sends a message for several organisations as one publish to all of them."""
    envelopes = []
    for item in outgoing:
        if not item.recipients:
            continue
        sealed = seal_secagg(federation, item.message)
        recipients = tuple(organisation_of(index) for index in item.recipients)
        envelopes.append(Envelope(recipients, sealed.body, sealed.message_type))
    return envelopes


@dataclass(frozen=True)
class Admitted:
    """A delivery that passed the envelope checks. ``sender`` is the broker-authenticated user."""

    sender: str
    header: protocol.Header
    payload: bytes

    def secagg(self, limits: WireLimits) -> Message:
        """The secure-aggregation message this envelope carries; ProtocolError if it is none or malformed."""
        if not isinstance(self.header, protocol.SecAgg):
            raise ProtocolError(f"{type(self.header).__name__} carries no secure-aggregation message")
        return wire.decode(self.payload, limits)


@dataclass(frozen=True)
class Refused:
    """A delivery that must be dead-lettered, and why."""

    reason: str


def admit(
    delivery: Received,
    *,
    federation: str,
    max_payload: int,
    senders: Collection[str] | None = None,
) -> Admitted | Refused:
    """Open the outer envelope of ``delivery``: the sender must be one of ``senders`` (when given), the body
    must decode with a payload of at most ``max_payload`` bytes, and the header must name ``federation``."""
    if senders is not None and delivery.sender not in senders:
        return Refused("sender is not in the roster")
    try:
        header, payload = protocol.decode(delivery.body, max_payload=max_payload)
    except ProtocolError as exc:
        return Refused(exc.reason)
    if header.federation != federation:
        return Refused("message for another federation")
    return Admitted(delivery.sender, header, payload)


__all__ = [
    "MESSAGE_TYPES",
    "Admitted",
    "Refused",
    "Sealed",
    "admit",
    "seal",
    "seal_secagg",
    "secagg_envelopes",
]
