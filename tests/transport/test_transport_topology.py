"""Names and permission regexes of docs/topology.md (pure; no broker)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tessera.errors import ConfigurationError
from tessera.transport import topology as topo

DOC = Path(__file__).resolve().parents[2] / "docs" / "topology.md"


@pytest.mark.parametrize("good", ["a", "acme", "org-1", "0", "a" * 32, "a-b-c"])
def test_valid_ids(good):
    assert topo.validate_organisation_id(good) == good
    assert topo.validate_federation_id(good) == good


@pytest.mark.parametrize("bad", ["", "A", "-a", "a-", "a.b", "a_b", "a" * 33, "ä", "a b", "a\n"])
def test_invalid_ids(bad):
    with pytest.raises(ConfigurationError):
        topo.validate_organisation_id(bad)
    with pytest.raises(ConfigurationError):
        topo.vhost(bad)


@pytest.mark.parametrize("reserved", sorted(topo.RESERVED_ORGANISATION_IDS))
def test_reserved_organisation_ids(reserved):
    with pytest.raises(ConfigurationError):
        topo.participant_inbox(reserved)


@pytest.mark.parametrize("key", [topo.BROADCAST_KEY, topo.SELECTED_KEY])
def test_no_organisation_id_collides_with_a_multi_recipient_key(key):
    """``to.all`` and ``to.selected`` are nobody's ``to.X``: the id that would make them one is reserved."""
    name = key.removeprefix("to.")
    assert topo.ID_PATTERN.fullmatch(name) and name in topo.RESERVED_ORGANISATION_IDS
    with pytest.raises(ConfigurationError, match="reserved"):
        topo.to_organisation_key(name)
    with pytest.raises(ConfigurationError, match="reserved"):
        topo.validate_organisations(["a", name])
    assert topo.SELECTED_KEY != topo.BROADCAST_KEY


def test_duplicate_organisations_are_refused():
    with pytest.raises(ConfigurationError):
        topo.validate_organisations(["a", "b", "a"])


def test_names():
    assert topo.vhost("fed1") == "tessera-fed1"
    assert topo.participant_inbox("acme") == "participant.acme.inbox"
    assert topo.to_organisation_key("acme") == "to.acme"
    assert topo.from_organisation_key("acme") == "from.acme"
    assert topo.from_organisation_key("acme", "round.3") == "from.acme.round.3"
    with pytest.raises(ConfigurationError):
        topo.from_organisation_key("acme", "a..b")


def _matches(regex: str, name: str) -> bool:
    # RabbitMQ matches with re:run (unanchored); our regexes carry their own anchors.
    return re.search(regex, name) is not None


def test_organisation_regexes():
    p = topo.organisation_permissions("acme")
    assert _matches(p.read, "participant.acme.inbox")
    assert not _matches(p.read, "participant.acme2.inbox") and not _matches(p.read, "participantxacmexinbox")
    assert _matches(p.write, "tessera.to-curator")
    for name in ("amq.default", "", "tessera.to-participants", "participant.acme.inbox"):
        assert not _matches(p.write, name)
    assert not _matches(p.configure, "participant.acme.inbox")
    [topic] = topo.organisation_topic_permissions("acme")
    assert topic.exchange == topo.TO_CURATOR_EXCHANGE
    for key in ("from.acme", "from.acme.x", "from.acme.round.3"):
        assert _matches(topic.write, key)
    for key in ("from.acme2", "from.acm", "from.other", "from.acme.", "to.acme", "from.#"):
        assert not _matches(topic.write, key)
    assert not _matches(topic.read, "from.acme")


def test_curator_regexes():
    p = topo.curator_permissions()
    for name in ("tessera.to-participants", "tessera.dead-letter", "participant.x.inbox", "curator.inbox"):
        assert _matches(p.write, name)
    assert not _matches(p.write, "tessera.to-curator")  # the curator never writes as an organisation
    assert not _matches(p.write, "amq.default") and not _matches(p.write, "")
    # Declaring an inbox with x-dead-letter-exchange needs read on the queue; binding needs read on the
    # exchange and, with topic permissions, the binding key must match the topic read regex.
    assert _matches(p.read, "participant.x.inbox") and _matches(p.read, "tessera.to-curator")
    [topic] = topo.curator_topic_permissions()
    assert _matches(topic.write, "to.all") and _matches(topic.write, "to.acme")
    assert _matches(topic.read, "to.all") and _matches(topic.read, "to.acme")
    assert not _matches(topic.write, "from.acme")
    # send_many: routing key to.selected, BCC keys to.X (checked too by RabbitMQ releases that check BCC).
    assert topic.exchange == topo.TO_PARTICIPANTS_EXCHANGE
    assert _matches(topic.write, topo.SELECTED_KEY)
    assert _matches(topic.write, topo.to_organisation_key("a" * 32))


def test_organisations_may_not_use_the_multi_recipient_keys():
    # The organisations' permissions are exactly these (send_many changed nothing for them).
    assert topo.organisation_permissions("acme") == topo.Permissions(
        configure="^$", write=r"^tessera\.to-curator$", read=r"^participant\.acme\.inbox$"
    )
    assert topo.organisation_topic_permissions("acme") == (
        topo.TopicPermission(topo.TO_CURATOR_EXCHANGE, write=r"^from\.acme(\..+)?$", read="^$"),
    )
    p = topo.organisation_permissions("acme")
    [topic] = topo.organisation_topic_permissions("acme")
    for key in (topo.SELECTED_KEY, topo.BROADCAST_KEY, "to.acme"):
        assert not _matches(topic.write, key)
    assert not _matches(p.write, topo.TO_PARTICIPANTS_EXCHANGE)


def test_document_states_the_same_regexes():
    """docs/topology.md is the contract with the Helm chart: it must show exactly these regexes."""
    doc = DOC.read_text().replace(r"\|", "|")
    cur = topo.curator_permissions()
    org = topo.organisation_permissions("x")
    [cur_topic] = topo.curator_topic_permissions()
    [org_topic] = topo.organisation_topic_permissions("x")
    expected_rows = [
        f"| `curator` | `{cur.configure}` | `{cur.write}` | `{cur.read}` |",
        # The document writes the organisation id as X; the first "x" in these regexes is the id.
        f"| organisation X | `{org.configure}` | `{org.write}` | `{org.read.replace('x', 'X', 1)}` |",
        f"| organisation X | `{org_topic.exchange}` | `{org_topic.write.replace('x', 'X', 1)}` "
        f"| `{org_topic.read}` |",
        f"| `curator` | `{cur_topic.exchange}` | `{cur_topic.write}` | `{cur_topic.read}` |",
    ]
    for row in expected_rows:
        assert row in doc, row
    for name in topo.RESERVED_ORGANISATION_IDS:
        assert f"`{name}`" in doc, name
    assert f"`{topo.SELECTED_KEY}`" in doc and "`BCC`" in doc


def test_the_roster_reserves_every_id_the_transport_does():
    # A roster must refuse up front an id the transport would refuse only when a service starts.
    from tessera.roster import RESERVED_IDS

    assert topo.RESERVED_ORGANISATION_IDS <= RESERVED_IDS


def test_queue_arguments_name_the_type_and_auto_must_be_resolved_first():
    from tessera.transport.topology import QueueType, inbox_arguments, queue_arguments

    assert inbox_arguments() == {"x-dead-letter-exchange": "tessera.dead-letter", "x-queue-type": "classic"}
    assert inbox_arguments(QueueType.QUORUM)["x-queue-type"] == "quorum"
    assert queue_arguments(QueueType.QUORUM) == {"x-queue-type": "quorum"}
    with pytest.raises(ValueError, match="resolve"):
        queue_arguments(QueueType.AUTO)


class _OldBroker:
    """Only the connection's server properties, as pika exposes them; no queue is declared on it."""

    def __init__(self, version: bytes) -> None:
        self._impl = type("Impl", (), {"server_properties": {"version": version}})()

    def channel(self):  # resolve_queue_type must not need one for an old broker
        raise AssertionError("no declare expected")


def test_brokers_older_than_3_8_get_classic_queues_or_refuse_quorum():
    from tessera.errors import ConfigurationError
    from tessera.transport.topology import QueueType, resolve_queue_type

    old = _OldBroker(b"3.7.28")
    assert resolve_queue_type(old, QueueType.AUTO) is QueueType.CLASSIC
    assert resolve_queue_type(old, QueueType.CLASSIC) is QueueType.CLASSIC
    with pytest.raises(ConfigurationError, match=r"3\.8 or later"):
        resolve_queue_type(old, QueueType.QUORUM)
    assert resolve_queue_type(_OldBroker(b"3.12.1"), QueueType.QUORUM) is QueueType.QUORUM


def test_the_document_describes_every_queue_type():
    from pathlib import Path

    from tessera.transport.topology import QueueType

    text = (Path(__file__).parents[2] / "docs" / "topology.md").read_text()
    section = text.split("## Queue types", 1)[1].split("\n## ", 1)[0]
    for queue_type in QueueType:
        assert f"| `{queue_type.value}`" in section
    assert "TESSERA_BROKER__QUEUE_TYPE" in section and "TESSERA_BROKER__ADDRESSES" in section
