"""Integration tests of the curator and participant endpoints against the real broker (no mocks)."""

from __future__ import annotations

import os
import time

import pika
import pika.exceptions
import pytest
from structlog.testing import capture_logs
from tessera.errors import ConfigurationError
from tessera.transport import (
    ParticipantTransport,
    PublishFailed,
    PublishRefused,
    ReassemblyLimits,
    TransportUnavailable,
)
from tessera.transport import topology as topo
from tessera.transport.chunking import HEADER_CHUNK, HEADER_CHUNKS, HEADER_MESSAGE_ID
from tessera.transport.errors import ACCESS_REFUSED, PRECONDITION_FAILED

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def _dead_letters(fed, expected: int, timeout: float = 5.0) -> list[tuple[pika.BasicProperties, bytes]]:
    """Read (and ack) ``expected`` messages from the dead-letter queue as the curator's user."""
    connection = fed.raw(fed.curator_user)
    try:
        channel = connection.channel()
        found: list[tuple[pika.BasicProperties, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(found) < expected and time.monotonic() < deadline:
            method, properties, body = channel.basic_get(topo.DEAD_LETTER_QUEUE, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            found.append((properties, body))
        return found
    finally:
        connection.close()


def test_curator_to_one_organisation(fed):
    curator, a, b = fed.curator(), fed.participant(fed.a), fed.participant(fed.b)
    message_id = curator.send(fed.a, b"model-a", message_type="tessera.test", headers={"round": 3})
    delivery = a.receive(timeout=5)
    assert delivery is not None
    assert (delivery.sender, delivery.body, delivery.message_type) == (
        fed.curator_user,
        b"model-a",
        "tessera.test",
    )
    assert delivery.headers == {"round": 3}
    assert delivery.message_id == message_id
    assert delivery.routing_key == topo.to_organisation_key(fed.a)
    assert not delivery.redelivered
    assert a.ack(delivery)
    assert b.receive(timeout=0.5) is None
    a.close()  # a clean shutdown still delivers the ack handed over just before it
    assert fed.participant(fed.a).receive(timeout=0.5) is None


def test_curator_broadcast_reaches_every_organisation(fed):
    curator, a, b = fed.curator(), fed.participant(fed.a), fed.participant(fed.b)
    curator.broadcast(b"global-model", message_type="tessera.model")
    for endpoint in (a, b):
        delivery = endpoint.receive(timeout=5)
        assert delivery is not None and delivery.body == b"global-model"
        assert delivery.routing_key == topo.BROADCAST_KEY and delivery.sender == fed.curator_user
        endpoint.ack(delivery)


def test_organisation_to_curator_sender_from_user_id(fed):
    curator, a, b = fed.curator(), fed.participant(fed.a), fed.participant(fed.b)
    a.send(b"from-a", message_type="tessera.update")
    b.send(b"from-b", message_type="tessera.update", suffix="phase.1")
    got = {}
    for _ in range(2):
        delivery = curator.receive(timeout=5)
        assert delivery is not None
        got[delivery.sender] = (delivery.body, delivery.routing_key)
        curator.ack(delivery)
    assert got == {fed.a: (b"from-a", f"from.{fed.a}"), fed.b: (b"from-b", f"from.{fed.b}.phase.1")}


def test_20_mib_payload_is_chunked_and_reassembled(fed):
    # prefetch=1 also proves that incomplete messages do not starve the prefetch window.
    curator = fed.curator(prefetch=1)
    a = fed.participant(fed.a, prefetch=1)
    payload = os.urandom(20 * MIB)
    a.send(payload, message_type="tessera.update", headers={"round": 1})
    delivery = curator.receive(timeout=20)
    assert delivery is not None
    assert delivery.chunks == 3 and delivery.body == payload and delivery.headers == {"round": 1}
    curator.ack(delivery)
    curator.broadcast(payload[: 9 * MIB], message_type="tessera.model")
    delivery = a.receive(timeout=20)
    assert delivery is not None and delivery.chunks == 2 and delivery.body == payload[: 9 * MIB]
    a.ack(delivery)


def _expect_channel_close(action, code: int, text: str) -> None:
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
        action()
    assert caught.value.reply_code == code, caught.value
    assert text in caught.value.reply_text


def test_organisation_credentials_cannot_cross_tenants(fed):
    fed.curator()  # declares the topology
    connection = fed.raw(fed.a)
    try:
        # Reading organisation B's inbox.
        channel = connection.channel()
        _expect_channel_close(
            lambda: channel.basic_consume(topo.participant_inbox(fed.b), lambda *args: None),
            ACCESS_REFUSED,
            "ACCESS_REFUSED",
        )
        channel = connection.channel()
        _expect_channel_close(
            lambda: channel.basic_get(topo.participant_inbox(fed.b)), ACCESS_REFUSED, "ACCESS_REFUSED"
        )

        def publish(exchange: str, routing_key: str, user_id: str | None) -> None:
            channel = connection.channel()
            channel.confirm_delivery()
            properties = pika.BasicProperties(delivery_mode=2, user_id=user_id)
            channel.basic_publish(exchange, routing_key, b"forged", properties=properties, mandatory=True)

        # Routing key of another organisation: the topic permission refuses it.
        _expect_channel_close(
            lambda: publish(topo.TO_CURATOR_EXCHANGE, f"from.{fed.b}", fed.a), ACCESS_REFUSED, "topic"
        )
        # The default exchange (would reach any queue by name).
        _expect_channel_close(
            lambda: publish("", topo.participant_inbox(fed.b), fed.a), ACCESS_REFUSED, "amq.default"
        )
        _expect_channel_close(lambda: publish("", topo.CURATOR_INBOX, fed.a), ACCESS_REFUSED, "amq.default")
        # Writing to the curator → participants exchange.
        _expect_channel_close(
            lambda: publish(topo.TO_PARTICIPANTS_EXCHANGE, f"to.{fed.b}", fed.a),
            ACCESS_REFUSED,
            "ACCESS_REFUSED",
        )
        # Another organisation's user_id.
        _expect_channel_close(
            lambda: publish(topo.TO_CURATOR_EXCHANGE, f"from.{fed.a}", fed.b), PRECONDITION_FAILED, "user_id"
        )
        # Declaring anything (configure is ^$).
        channel = connection.channel()
        _expect_channel_close(lambda: channel.queue_declare("participant.x.inbox"), ACCESS_REFUSED, "ACCESS")
        # The legitimate publish still works on a fresh channel (positive control).
        publish(topo.TO_CURATOR_EXCHANGE, f"from.{fed.a}.x", fed.a)
    finally:
        connection.close()
    # The endpoint refuses to act as an organisation other than its broker user ...
    with pytest.raises(ConfigurationError):
        ParticipantTransport(fed.settings(fed.a), federation=fed.federation, organisation=fed.b)
    # ... and wrong credentials are fatal at start, not retried forever.
    fed.passwords[fed.b] = "wrong-password"
    started = time.monotonic()
    with pytest.raises(TransportUnavailable):
        fed.participant(fed.b)
    assert time.monotonic() - started < 5


def test_refused_and_unroutable_publishes_are_typed_errors(fed):
    curator = fed.curator()
    fed.rabbitmqctl("set_topic_permissions", "-p", fed.vhost, fed.a, topo.TO_CURATOR_EXCHANGE, "^$", "^$")
    a = fed.participant(fed.a)
    with pytest.raises(PublishRefused) as caught:
        a.send(b"x", message_type="tessera.update")
    assert caught.value.reply_code == ACCESS_REFUSED
    [granted] = topo.organisation_topic_permissions(fed.a)
    fed.rabbitmqctl(
        "set_topic_permissions", "-p", fed.vhost, fed.a, granted.exchange, granted.write, granted.read
    )
    a.send(b"after", message_type="tessera.update")  # the publishing channel was reopened
    delivery = curator.receive(timeout=5)
    assert delivery is not None and delivery.body == b"after"
    curator.ack(delivery)

    fed.rabbitmqctl("delete_queue", "-p", fed.vhost, topo.participant_inbox(fed.b))
    with pytest.raises(PublishFailed, match="unroutable"):
        curator.send(fed.b, b"nobody-home", message_type="tessera.model")


def test_unacked_message_is_redelivered_after_reconnect(fed):
    curator, a = fed.curator(), fed.participant(fed.a)
    message_id = curator.send(fed.a, b"work", message_type="tessera.model")
    first = a.receive(timeout=5)
    assert first is not None and not first.redelivered
    fed.rabbitmqctl("close_all_connections", "--vhost", fed.vhost, "test")
    second = a.receive(timeout=15)
    assert second is not None
    assert second.message_id == message_id and second.redelivered and second.body == b"work"
    assert not a.ack(first)  # stale: its channel died with the old connection
    assert a.ack(second)
    # Both endpoints keep working on their new connections.
    a.send(b"update", message_type="tessera.update")
    delivery = curator.receive(timeout=10)
    assert delivery is not None and delivery.body == b"update"
    curator.ack(delivery)
    assert a.receive(timeout=1) is None  # the ack held: no third delivery


def test_rejected_message_lands_in_dead_letter_queue(fed):
    curator, a = fed.curator(), fed.participant(fed.a)
    a.send(b"bad-update", message_type="tessera.update")
    delivery = curator.receive(timeout=5)
    assert delivery is not None
    assert curator.reject(delivery, "schema_invalid")
    [(properties, body)] = _dead_letters(fed, 1)
    assert body == b"bad-update" and properties.user_id == fed.a
    assert properties.headers["x-death"][0]["reason"] == "rejected"
    assert properties.headers["x-death"][0]["queue"] == topo.CURATOR_INBOX


def test_transport_rejects_unauthenticated_and_contradictory_messages(fed):
    with capture_logs() as logs:
        curator = fed.curator(reassembly=ReassemblyLimits(partial_timeout=0.5))
        connection = fed.raw(fed.a)
        try:
            channel = connection.channel()
            channel.confirm_delivery()

            def publish(body: bytes, user_id: str | None, chunk: tuple[str, int, int] | None = None) -> None:
                headers = (
                    dict(zip((HEADER_MESSAGE_ID, HEADER_CHUNK, HEADER_CHUNKS), chunk, strict=True))
                    if chunk
                    else None
                )
                properties = pika.BasicProperties(delivery_mode=2, user_id=user_id, headers=headers, type="t")
                channel.basic_publish(
                    topo.TO_CURATOR_EXCHANGE, f"from.{fed.a}", body, properties, mandatory=True
                )

            publish(b"anonymous", None)  # the broker accepts a missing user_id; the endpoint must not
            publish(b"c0", fed.a, ("m1", 0, 3))
            publish(b"c1", fed.a, ("m1", 1, 4))  # contradicts its sibling: the whole message goes
            publish(b"c2", fed.a, ("m1", 2, 3))  # its message was already rejected
            publish(b"lonely", fed.a, ("m2", 0, 2))  # never completed: times out
            publish(b"ok", fed.a)
        finally:
            connection.close()
        delivery = curator.receive(timeout=5)
        assert delivery is not None and delivery.body == b"ok"  # the application saw only the good one
        curator.ack(delivery)
        assert curator.receive(timeout=0.3) is None
        dead = _dead_letters(fed, 5)
    assert sorted(body for _, body in dead) == [b"anonymous", b"c0", b"c1", b"c2", b"lonely"]
    reasons = {entry["reason"] for entry in logs if entry["event"] == "message_rejected"}
    assert reasons == {
        "missing_user_id",
        "chunk_count_contradicts_siblings",
        "message_already_rejected",
        "partial_message_timed_out",
    }
    assert all("body" not in entry for entry in logs)


def test_heartbeat_survives_long_application_work(fed):
    curator = fed.curator(heartbeat=2)
    a = fed.participant(fed.a, heartbeat=2)
    curator.send(fed.a, b"train-me", message_type="tessera.model")
    delivery = a.receive(timeout=5)
    assert delivery is not None
    generation = a._generation
    end = time.monotonic() + 6  # three heartbeat intervals of CPU-bound work holding the GIL
    while time.monotonic() < end:
        sum(i * i for i in range(10_000))
    assert a._generation == generation and a.connected  # no reconnect happened
    assert a.ack(delivery)
    a.send(b"trained", message_type="tessera.update")
    reply = curator.receive(timeout=5)
    assert reply is not None and reply.body == b"trained"
    curator.ack(reply)
    assert a.receive(timeout=1) is None  # the ack reached the broker on the original connection
