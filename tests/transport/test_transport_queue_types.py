"""Queue types (``docs/topology.md``, "Queue types") and several broker addresses, against the real broker."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import SecretStr
from tessera.transport import ConnectionSettings, CuratorTransport, TransportUnavailable
from tessera.transport import topology as topo
from tessera.transport.connection import MIB, ReconnectPolicy

pytestmark = pytest.mark.integration


def queue_types(fed) -> dict[str, str]:
    listing = fed.rabbitmqctl("list_queues", "-p", fed.vhost, "name", "type", "--formatter", "json")
    return {q["name"]: q["type"] for q in json.loads(listing or "[]")}


def everything(fed) -> set[str]:
    return {
        topo.CURATOR_INBOX,
        topo.DEAD_LETTER_QUEUE,
        *(topo.participant_inbox(o) for o in fed.organisations),
    }


def exchange_both_ways(fed, curator, participant, organisation: str) -> None:
    """A chunked message each way with prefetch 1, which needs the window to grow while chunks are held."""
    payload = os.urandom(3 * MIB + 17)
    curator.send(organisation, payload, message_type="tessera.model", headers={"round": 3})
    delivery = participant.receive(timeout=20)
    assert delivery is not None and delivery.body == payload and delivery.chunks == 4
    assert delivery.headers == {"round": 3}  # no x-delivery-count leaks through
    assert participant.ack(delivery)
    participant.send(payload[: MIB + 1], message_type="tessera.update")
    delivery = curator.receive(timeout=20)
    assert delivery is not None and delivery.body == payload[: MIB + 1] and delivery.sender == organisation
    assert curator.ack(delivery)


def test_auto_declares_quorum_queues_and_both_endpoints_consume_from_them(fed):
    curator = fed.curator(prefetch=1, chunk_size=MIB)
    assert curator.queue_type is topo.QueueType.QUORUM
    assert queue_types(fed) == dict.fromkeys(everything(fed), "quorum")
    # The participant is left at auto: the broker refuses its channel-wide prefetch once, and it reconnects
    # with per-consumer prefetch.
    a = fed.participant(fed.a, prefetch=1, chunk_size=MIB)
    assert a._per_consumer_qos
    exchange_both_ways(fed, curator, a, fed.a)
    # Rejected messages still reach the (quorum) dead-letter queue.
    a.send(b"bad", message_type="t")
    delivery = curator.receive(timeout=5)
    assert delivery is not None and curator.reject(delivery, "test")
    check = fed.raw(fed.curator_user)
    try:
        channel = check.channel()
        for _ in range(50):
            if channel.queue_declare(topo.DEAD_LETTER_QUEUE, passive=True).method.message_count == 1:
                break
            check.sleep(0.1)
        assert channel.queue_declare(topo.DEAD_LETTER_QUEUE, passive=True).method.message_count == 1
    finally:
        check.close()


def test_classic_stays_classic_under_auto_and_an_explicit_contradiction_fails_at_start(fed):
    curator = fed.curator(queue_type="classic", chunk_size=MIB)
    assert curator.queue_type is topo.QueueType.CLASSIC
    assert queue_types(fed) == dict.fromkeys(everything(fed), "classic")
    a = fed.participant(fed.a, prefetch=1, chunk_size=MIB, queue_type="classic")
    assert not a._per_consumer_qos
    exchange_both_ways(fed, curator, a, fed.a)
    curator.close()
    again = fed.curator(chunk_size=MIB)  # auto: the existing classic queues are kept as they are
    assert again.queue_type is topo.QueueType.CLASSIC
    assert queue_types(fed) == dict.fromkeys(everything(fed), "classic")
    again.close()
    with pytest.raises(TransportUnavailable, match="x-queue-type"):  # not retried forever: it cannot heal
        fed.curator(queue_type="quorum")


def test_addresses_are_tried_in_turn_when_the_url_broker_does_not_answer(fed):
    host_port = fed.url(fed.curator_user).rsplit("@", 1)[1].rstrip("/")
    dead = fed.url(fed.curator_user).replace(host_port, "127.0.0.1:1")  # nothing listens on port 1
    connection = ConnectionSettings(
        url=SecretStr(dead),
        addresses=("127.0.0.1:2", host_port),
        reconnect=ReconnectPolicy(initial_delay=0.1, max_delay=0.5),
    )
    settings = fed.settings(fed.curator_user).model_copy(update={"connection": connection})
    curator = CuratorTransport(
        settings, federation=fed.federation, organisations=fed.organisations, curator_user=fed.curator_user
    )
    fed.endpoints.append(curator)
    curator.start()
    a = fed.participant(fed.a)
    curator.send(fed.a, b"via the third address", message_type="t")
    delivery = a.receive(timeout=5)
    assert delivery is not None and delivery.body == b"via the third address"
    a.ack(delivery)
