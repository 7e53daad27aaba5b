"""Names, permissions and declarations of one federation's RabbitMQ topology (``docs/topology.md``).

This module is the single source of the names and permission regexes in ``docs/topology.md``; the
transport, the provisioning helpers and the tests all take them from here. Change the document, this module
and the broker chart (``charts/tessera-broker``) together.

Why each permission is what it is (checked against RabbitMQ 3.10):

- Declaring a queue with ``x-dead-letter-exchange`` needs *read* on the queue and *write* on the
  dead-letter exchange; binding needs *write* on the queue and *read* on the exchange, and, on an exchange
  where the user has topic permissions, the binding key must match the user's topic *read* regex. Hence the
  curator reads ``participant.*`` and has topic read ``^to\\..+$`` on ``tessera.to-participants``.
- Organisations have no configure permission at all and only *passively* declare their inbox.
- Nobody has write on ``amq.default``: write there lets a user publish into any queue by name.
- The curator reaches several organisations with one publish by RabbitMQ's sender-selected distribution:
  routing key :data:`SELECTED_KEY` (no queue is bound to it) and a ``BCC`` header listing ``to.X`` of each
  recipient. The broker routes to every queue whose binding matches the routing key or any ``BCC`` key and
  removes ``BCC`` before delivery, so a recipient learns neither the other recipients nor their number; it
  sees the routing key :data:`SELECTED_KEY`. The curator's topic write regex ``^to\\..+$`` covers
  :data:`SELECTED_KEY` and every ``to.X``. RabbitMQ 3.10 checks only the routing key against topic
  permissions, not ``CC``/``BCC`` keys (later releases do: rabbitmq-server#12553, 4.0.x);
  organisations' isolation does not depend on that check: they may write only to ``tessera.to-curator``,
  where the one queue, ``curator.inbox``, is bound with ``from.#``, and a delivery always carries the
  routing key of the publish, which the topic permission did check.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from tessera.errors import ConfigurationError

log = structlog.get_logger("tessera.transport")

ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
"""Federation and organisation ids: DNS-label friendly, at most 32 characters."""

CURATOR_USER = "curator"
"""The curator's broker user name (the ``user_id`` of everything the curator publishes)."""

RESERVED_ORGANISATION_IDS = frozenset({"curator", "all", "selected", "guest"})
"""``curator`` is the curator's user, ``all`` would collide with the broadcast key ``to.all`` and
``selected`` with the multi-recipient key ``to.selected``, ``guest`` is RabbitMQ's built-in administrator
(provisioning it would change that account's password)."""

TO_PARTICIPANTS_EXCHANGE = "tessera.to-participants"
TO_CURATOR_EXCHANGE = "tessera.to-curator"
DEAD_LETTER_EXCHANGE = "tessera.dead-letter"
CURATOR_INBOX = "curator.inbox"
DEAD_LETTER_QUEUE = "curator.dead-letter"
BROADCAST_KEY = "to.all"
SELECTED_KEY = "to.selected"
"""Routing key of a publish to several organisations, which carries their ``to.X`` keys in its ``BCC``
header. No queue is bound with it: the message reaches exactly the inboxes its ``BCC`` keys select."""
CURATOR_INBOX_BINDING = "from.#"

_SUFFIX_PATTERN = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)*$")


def validate_federation_id(federation: str) -> str:
    """Return ``federation`` if it is a valid federation id; raise :class:`ConfigurationError` otherwise."""
    if not isinstance(federation, str) or not ID_PATTERN.fullmatch(federation):
        raise ConfigurationError(f"invalid federation id {federation!r}: must match {ID_PATTERN.pattern}")
    return federation


def validate_organisation_id(organisation: str) -> str:
    """Return ``organisation`` if it is a valid, unreserved organisation id; raise otherwise."""
    if not isinstance(organisation, str) or not ID_PATTERN.fullmatch(organisation):
        raise ConfigurationError(f"invalid organisation id {organisation!r}: must match {ID_PATTERN.pattern}")
    if organisation in RESERVED_ORGANISATION_IDS:
        raise ConfigurationError(
            f"organisation id {organisation!r} is reserved ({', '.join(sorted(RESERVED_ORGANISATION_IDS))})"
        )
    return organisation


def validate_organisations(organisations: Iterable[str]) -> tuple[str, ...]:
    """Validate every id and reject duplicates; returns them as a tuple in the given order."""
    result = tuple(validate_organisation_id(o) for o in organisations)
    if len(set(result)) != len(result):
        raise ConfigurationError("duplicate organisation ids")
    return result


def vhost(federation: str) -> str:
    """The federation's virtual host: ``tessera-<federation>``."""
    return f"tessera-{validate_federation_id(federation)}"


def participant_inbox(organisation: str) -> str:
    """The inbox queue of an organisation: ``participant.<X>.inbox``."""
    return f"participant.{validate_organisation_id(organisation)}.inbox"


def to_organisation_key(organisation: str) -> str:
    """Routing key on ``tessera.to-participants`` that reaches one organisation: ``to.<X>``."""
    return f"to.{validate_organisation_id(organisation)}"


def from_organisation_key(organisation: str, suffix: str | None = None) -> str:
    """Routing key an organisation publishes with: ``from.<X>`` or ``from.<X>.<suffix>``."""
    key = f"from.{validate_organisation_id(organisation)}"
    if suffix is None:
        return key
    if not _SUFFIX_PATTERN.fullmatch(suffix):
        raise ConfigurationError(f"invalid routing key suffix {suffix!r}")
    return f"{key}.{suffix}"


@dataclass(frozen=True)
class Permissions:
    """``rabbitmqctl set_permissions -p <vhost> <user> <configure> <write> <read>``."""

    configure: str
    write: str
    read: str


@dataclass(frozen=True)
class TopicPermission:
    """``rabbitmqctl set_topic_permissions -p <vhost> <user> <exchange> <write> <read>``."""

    exchange: str
    write: str
    read: str


def curator_permissions() -> Permissions:
    return Permissions(
        configure=r"^(tessera\..*|participant\..*|curator\..*)$",
        write=r"^(tessera\.to-participants|tessera\.dead-letter|participant\..*|curator\..*)$",
        read=r"^(tessera\..*|participant\..*|curator\..*)$",
    )


def organisation_permissions(organisation: str) -> Permissions:
    # Ids contain only [a-z0-9-], none of which is special in a regex outside a character class.
    inbox = participant_inbox(organisation).replace(".", r"\.")
    return Permissions(configure="^$", write=r"^tessera\.to-curator$", read=f"^{inbox}$")


def curator_topic_permissions() -> tuple[TopicPermission, ...]:
    return (TopicPermission(TO_PARTICIPANTS_EXCHANGE, write=r"^to\..+$", read=r"^to\..+$"),)


def organisation_topic_permissions(organisation: str) -> tuple[TopicPermission, ...]:
    org = validate_organisation_id(organisation)
    return (TopicPermission(TO_CURATOR_EXCHANGE, write=rf"^from\.{org}(\..+)?$", read="^$"),)


class QueueType(enum.StrEnum):
    """``x-queue-type`` of the federation's queues (``docs/topology.md``, "Queue types").

    ``quorum`` queues are replicated over a cluster's nodes (Raft) and survive the loss of a minority;
    ``classic`` queues live on one node. ``auto`` resolves once per connection (:func:`resolve_queue_type`):
    quorum where the broker supports them, unless the federation's queues already exist as classic ones
    (a queue's type cannot change in place)."""

    AUTO = "auto"
    QUORUM = "quorum"
    CLASSIC = "classic"


QUORUM_MIN_VERSION = (3, 8)
"""The first RabbitMQ release with quorum queues (behind the ``quorum_queue`` feature flag)."""


def queue_arguments(queue_type: QueueType = QueueType.CLASSIC) -> dict[str, Any]:
    """Arguments every queue of the federation is declared with (a resolved type, not ``auto``)."""
    if queue_type is QueueType.AUTO:
        raise ValueError("resolve the queue type (resolve_queue_type) before declaring")
    return {"x-queue-type": queue_type.value}


def inbox_arguments(queue_type: QueueType = QueueType.CLASSIC) -> dict[str, Any]:
    """Arguments of every inbox queue (the curator's and each organisation's). ``x-queue-type: classic``
    is what a queue declared without ``x-queue-type`` is, so older classic inboxes still match."""
    return {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE, **queue_arguments(queue_type)}


def _server_version(connection: Any) -> tuple[int, ...] | None:
    """The broker's version from the connection's ``server-properties`` (no management API needed)."""
    try:
        raw = connection._impl.server_properties.get("version")
    except AttributeError:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    match = re.match(r"^(\d+)\.(\d+)", str(raw or ""))
    return (int(match[1]), int(match[2])) if match else None


def resolve_queue_type(connection: Any, requested: QueueType) -> QueueType:
    """The queue type to declare with on ``connection`` (a pika ``BlockingConnection`` of the curator).

    ``quorum`` and ``classic`` are returned as they are (``quorum`` on a broker older than 3.8 is a
    :class:`ConfigurationError`: it would ignore ``x-queue-type`` and create classic queues). ``auto``:
    ``classic`` on a broker older than 3.8; otherwise the curator's inbox is declared as a quorum queue on a
    scratch channel: that succeeds if it is one or does not exist yet (it is then created as one); the
    broker refuses it (406) if the inbox exists as a classic queue or quorum queues are unavailable (feature
    flag off), and then ``classic`` keeps the federation as it is."""
    version = _server_version(connection)
    too_old = version is not None and version < QUORUM_MIN_VERSION
    if requested is QueueType.QUORUM and too_old:
        raise ConfigurationError(f"quorum queues need RabbitMQ 3.8 or later; the broker is {version}")
    if requested is not QueueType.AUTO:
        return requested
    if too_old:
        return QueueType.CLASSIC
    channel = connection.channel()
    try:
        channel.queue_declare(CURATOR_INBOX, durable=True, arguments=inbox_arguments(QueueType.QUORUM))
    except Exception as exc:  # pika's ChannelClosedByBroker; this module does not import pika
        if getattr(exc, "reply_code", None) != 406:
            raise
        log.info("queue_type_resolved", requested="auto", queue_type="classic", reason=str(exc)[:200])
        return QueueType.CLASSIC
    if channel.is_open:
        channel.close()
    log.info("queue_type_resolved", requested="auto", queue_type="quorum")
    return QueueType.QUORUM


def declare_topology(
    channel: Any,
    federation: str,
    organisations: Iterable[str],
    queue_type: QueueType = QueueType.CLASSIC,
) -> None:
    """Declare the whole topology on ``channel`` (a pika ``BlockingChannel`` of the curator's user, opened
    on the federation's vhost), every queue of type ``queue_type`` (resolved: not ``auto``). Idempotent; an
    organisation added later just gets its inbox on the next call. Raises
    ``pika.exceptions.ChannelClosedByBroker`` (403) if the user lacks the permissions above, or (406) if an
    object exists with different properties (such as another queue type)."""
    validate_federation_id(federation)
    orgs = validate_organisations(organisations)
    arguments = inbox_arguments(queue_type)
    channel.exchange_declare(TO_PARTICIPANTS_EXCHANGE, exchange_type="topic", durable=True)
    channel.exchange_declare(TO_CURATOR_EXCHANGE, exchange_type="topic", durable=True)
    channel.exchange_declare(DEAD_LETTER_EXCHANGE, exchange_type="fanout", durable=True)
    channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=queue_arguments(queue_type))
    channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, routing_key="")
    channel.queue_declare(CURATOR_INBOX, durable=True, arguments=arguments)
    channel.queue_bind(CURATOR_INBOX, TO_CURATOR_EXCHANGE, routing_key=CURATOR_INBOX_BINDING)
    for org in orgs:
        inbox = participant_inbox(org)
        channel.queue_declare(inbox, durable=True, arguments=arguments)
        channel.queue_bind(inbox, TO_PARTICIPANTS_EXCHANGE, routing_key=to_organisation_key(org))
        channel.queue_bind(inbox, TO_PARTICIPANTS_EXCHANGE, routing_key=BROADCAST_KEY)
    log.info("topology_declared", federation=federation, organisations=len(orgs), queue_type=queue_type.value)


__all__ = [
    "BROADCAST_KEY",
    "CURATOR_INBOX",
    "CURATOR_INBOX_BINDING",
    "CURATOR_USER",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "ID_PATTERN",
    "QUORUM_MIN_VERSION",
    "RESERVED_ORGANISATION_IDS",
    "SELECTED_KEY",
    "TO_CURATOR_EXCHANGE",
    "TO_PARTICIPANTS_EXCHANGE",
    "Permissions",
    "QueueType",
    "TopicPermission",
    "curator_permissions",
    "curator_topic_permissions",
    "declare_topology",
    "from_organisation_key",
    "inbox_arguments",
    "organisation_permissions",
    "organisation_topic_permissions",
    "participant_inbox",
    "queue_arguments",
    "resolve_queue_type",
    "to_organisation_key",
    "validate_federation_id",
    "validate_organisation_id",
    "validate_organisations",
    "vhost",
]
