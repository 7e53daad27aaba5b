"""The curator's and a participant's endpoints: publish with confirms, receive with manual acks, reconnect.

An endpoint is three parts, one module each: the I/O thread with its connection and reconnect loop
(:mod:`tessera.transport.link`), publishing with confirms (:mod:`tessera.transport.publisher`), and consuming
with manual acks and reassembly (:mod:`tessera.transport.consumer`). This module puts them together and adds
what differs between the curator and an organisation: the topology each declares or checks, whom each
sends to, and whom each accepts messages from.

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
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pika.adapters.blocking_connection import BlockingChannel

from tessera.bus import Envelope, Sent
from tessera.errors import ConfigurationError, LocalUsageError, TransportError
from tessera.transport import topology as topo
from tessera.transport.consumer import Delivery, _Consumer
from tessera.transport.errors import PublishFailed
from tessera.transport.link import TransportSettings
from tessera.transport.publisher import BCC_HEADER, _bcc_batches, _Outbound, _Publisher, _undelivered_reason


class _Endpoint(_Publisher, _Consumer):
    """Common machinery of both endpoints (see the part modules). Use as a context manager or call
    :meth:`start` and :meth:`close`."""


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
        """Publish to one organisation's inbox and wait for the confirm; returns the message id.

        A returned message means that inbox is gone (the curator declares every inbox on each connection,
        binding it with ``to.X``): :class:`PublishFailed` with ``undelivered`` naming the organisation."""
        (sent,) = self.send_each(
            [Envelope((organisation,), body, message_type, headers=headers, message_id=message_id)]
        )
        if sent.undelivered:
            raise PublishFailed(
                f"unroutable: not delivered to {organisation!r}, whose inbox does not exist",
                undelivered=sent.undelivered,
                unroutable=True,
            )
        return sent.message_id

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
        recipients = tuple(dict.fromkeys(organisations))
        if not recipients:
            raise LocalUsageError("send_many needs at least one organisation")
        (sent,) = self.send_each(
            [Envelope(recipients, body, message_type, headers=headers, message_id=message_id, fan_out=True)]
        )
        if sent.undelivered:
            raise PublishFailed(_undelivered_reason(sent.undelivered), undelivered=sent.undelivered)
        return sent.message_id

    def send_each(self, envelopes: Sequence[Envelope]) -> list[Sent]:
        """Publish several messages at once and wait until the broker has confirmed them all: their
        confirms overlap (:mod:`tessera.transport.confirms`), so ten messages cost about one round trip, not
        ten. An envelope for one organisation is published as :meth:`send` does, one for several as
        :meth:`send_many` does.

        Every envelope is checked before anything is published (:class:`LocalUsageError`: an organisation
        not in the roster, none at all, a bad body or header). Returns one :class:`Sent` per envelope, in
        order, naming the organisations whose inbox was missing (the others have their copy). Any other
        failure (:class:`PublishFailed`, :class:`PublishRefused`) is raised once every envelope has been
        tried, the first one's; the envelopes that succeeded stay published."""
        prepared: list[tuple[str, list[int], str | None]] = []
        outbounds: list[_Outbound] = []
        for envelope in envelopes:
            if isinstance(envelope.organisations, str | bytes):
                raise LocalUsageError("an envelope's organisations must be a collection of organisation ids")
            recipients = list(dict.fromkeys(envelope.organisations))
            if not recipients:
                raise LocalUsageError("an envelope needs at least one organisation")
            unknown = [o for o in recipients if o not in self._roster]
            if unknown:
                raise LocalUsageError(f"{unknown!r} are not in this federation's roster")
            message_id = envelope.message_id or uuid.uuid4().hex
            parts: list[int] = []
            single = recipients[0] if len(recipients) == 1 and not envelope.fan_out else None
            if single is not None:
                parts.append(len(outbounds))
                outbounds.append(
                    self._outbound(
                        topo.to_organisation_key(recipients[0]),
                        envelope.body,
                        message_type=envelope.message_type,
                        headers=envelope.headers,
                        message_id=message_id,
                    )
                )
            else:
                by_key = {topo.to_organisation_key(o): o for o in recipients}
                for batch in _bcc_batches(list(by_key)):
                    parts.append(len(outbounds))
                    outbounds.append(
                        self._outbound(
                            topo.SELECTED_KEY,
                            envelope.body,
                            message_type=envelope.message_type,
                            headers=envelope.headers,
                            message_id=message_id,
                            broker_headers={BCC_HEADER: batch},
                            recipients={topo.participant_inbox(by_key[k]): by_key[k] for k in batch},
                        )
                    )
            prepared.append((message_id, parts, single))
        results = self._publish_all(outbounds)
        report: list[Sent] = []
        failure: TransportError | None = None
        for message_id, parts, single in prepared:
            undelivered: list[str] = []
            for part in parts:
                result = results[part]
                if isinstance(result, PublishFailed) and result.undelivered:
                    undelivered += result.undelivered  # a later batch's recipients still get theirs
                elif isinstance(result, PublishFailed) and result.unroutable and single:
                    # Returned: the curator binds every inbox with its to.X key, so that inbox is gone.
                    undelivered.append(single)
                elif isinstance(result, TransportError):
                    failure = failure or result
            report.append(Sent(message_id, tuple(undelivered)))
        if failure is not None:
            raise failure
        return report

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


__all__ = [
    "BCC_HEADER",
    "CuratorTransport",
    "Delivery",
    "Envelope",
    "ParticipantTransport",
    "Sent",
    "TransportSettings",
]
