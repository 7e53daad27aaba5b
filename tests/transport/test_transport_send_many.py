"""One publish to several organisations (``CuratorTransport.send_many``: routing key ``to.selected`` plus a
``BCC`` header), and what ``CC``/``BCC`` headers let an organisation do: against the real broker, no mocks."""

from __future__ import annotations

import itertools
import os

import pika
import pika.exceptions
import pytest
from tessera.errors import LocalUsageError
from tessera.transport import topology as topo
from tessera.transport.endpoint import BCC_HEADER
from tessera.transport.errors import ACCESS_REFUSED, PublishFailed

pytestmark = pytest.mark.integration


def test_send_many_reaches_exactly_the_listed_organisations_once(fed3):
    curator = fed3.curator()
    a, b, c = (fed3.participant(o) for o in fed3.organisations)
    message_id = curator.send_many(
        [fed3.a, fed3.b, fed3.a], b"shared", message_type="tessera.secagg", headers={"round": 2}
    )
    for endpoint in (a, b):
        delivery = endpoint.receive(timeout=5)
        assert delivery is not None
        assert (delivery.sender, delivery.body, delivery.message_type, delivery.message_id) == (
            fed3.curator_user,
            b"shared",
            "tessera.secagg",
            message_id,
        )
        # The broker removed BCC: a recipient learns nothing about the others (the endpoint passes every
        # header except its own chunk headers through to the application).
        assert delivery.headers == {"round": 2}
        assert delivery.routing_key == topo.SELECTED_KEY
        assert endpoint.ack(delivery)
    for endpoint in (a, b, c):  # once each (the duplicate counted once), and nothing for c
        assert endpoint.receive(timeout=0.5) is None


def test_send_many_of_a_chunked_message_is_reassembled_by_each_recipient(fed3):
    curator = fed3.curator(chunk_size=64 * 1024)
    a, b = fed3.participant(fed3.a, prefetch=1), fed3.participant(fed3.b, prefetch=1)
    c = fed3.participant(fed3.c)
    payload = os.urandom(300_000)  # 5 chunks, each carrying the BCC header
    message_id = curator.send_many([fed3.b, fed3.a], payload, message_type="tessera.model")
    for endpoint in (a, b):
        delivery = endpoint.receive(timeout=10)
        assert delivery is not None
        assert delivery.chunks == 5 and delivery.body == payload and delivery.message_id == message_id
        assert delivery.headers == {} and delivery.routing_key == topo.SELECTED_KEY
        assert endpoint.ack(delivery)
    for endpoint in (a, b, c):
        assert endpoint.receive(timeout=0.5) is None


def test_send_many_refuses_bad_recipients_and_routing_headers_and_publishes_nothing(fed):
    curator, a, b = fed.curator(), fed.participant(fed.a), fed.participant(fed.b)
    with pytest.raises(LocalUsageError, match="roster"):
        curator.send_many([fed.a, "nobody"], b"x", message_type="t")
    with pytest.raises(LocalUsageError, match="at least one"):
        curator.send_many([], b"x", message_type="t")
    with pytest.raises(LocalUsageError, match="not one string"):
        curator.send_many(fed.a, b"x", message_type="t")
    # CC and BCC route messages: only the transport sets them, on any publish.
    for name in ("BCC", "CC", "bcc"):
        with pytest.raises(LocalUsageError, match="reserved"):
            curator.send_many([fed.a, fed.b], b"x", message_type="t", headers={name: [f"to.{fed.b}"]})
        with pytest.raises(LocalUsageError, match="reserved"):
            curator.send(fed.a, b"x", message_type="t", headers={name: [f"to.{fed.b}"]})
        with pytest.raises(LocalUsageError, match="reserved"):
            a.send(b"x", message_type="t", headers={name: [f"from.{fed.b}"]})
    assert a.receive(timeout=0.5) is None and b.receive(timeout=0.1) is None
    assert curator.receive(timeout=0.1) is None
    # The endpoints still work (nothing was left half-published).
    curator.send_many([fed.b], b"only-b", message_type="t")
    delivery = b.receive(timeout=5)
    assert delivery is not None and delivery.body == b"only-b" and delivery.routing_key == topo.SELECTED_KEY
    b.ack(delivery)
    assert a.receive(timeout=0.5) is None


def test_cc_and_bcc_headers_do_not_let_an_organisation_reach_another(fed):
    """Organisation A adds CC/BCC keys of B (``to.B``, ``from.B``, ...) to a publish with its own routing key:
    nothing reaches B's inbox and the curator sees only A's own routing key. RabbitMQ 3.10 does not check
    CC/BCC keys against topic permissions, so it accepts these publishes; later releases refuse the ones
    whose keys do not match A's topic write regex (403). Either is safe; reaching B is not."""
    curator, b = fed.curator(), fed.participant(fed.b)
    own = topo.from_organisation_key(fed.a)
    keys = [
        topo.to_organisation_key(fed.b),
        topo.from_organisation_key(fed.b),
        topo.from_organisation_key(fed.b, "x"),
        topo.SELECTED_KEY,
        topo.BROADCAST_KEY,
        topo.CURATOR_INBOX_BINDING,
    ]
    connection = fed.raw(fed.a)
    accepted: dict[bytes, str] = {}
    try:

        def publish(exchange: str, routing_key: str, headers: dict, body: bytes) -> None:
            channel = connection.channel()
            channel.confirm_delivery()
            properties = pika.BasicProperties(delivery_mode=2, user_id=fed.a, headers=headers, type="t")
            channel.basic_publish(exchange, routing_key, body, properties=properties, mandatory=True)
            channel.close()

        for n, (header, key) in enumerate(itertools.product(("CC", "BCC"), keys)):
            body = f"{n}:{header}:{key}".encode()
            try:
                publish(topo.TO_CURATOR_EXCHANGE, own, {header: [key]}, body)
            except pika.exceptions.ChannelClosedByBroker as exc:  # a broker that checks CC/BCC keys
                assert exc.reply_code == ACCESS_REFUSED, exc
            else:
                accepted[body] = header
        # Neither can a CC/BCC key stand in for a routing key A may not use, nor open the other exchange.
        for exchange, routing_key, header, key in [
            (topo.TO_CURATOR_EXCHANGE, topo.from_organisation_key(fed.b), "BCC", own),
            (topo.TO_CURATOR_EXCHANGE, topo.from_organisation_key(fed.b), "CC", own),
            (topo.TO_PARTICIPANTS_EXCHANGE, topo.SELECTED_KEY, "BCC", topo.to_organisation_key(fed.b)),
            (topo.TO_PARTICIPANTS_EXCHANGE, own, "CC", topo.to_organisation_key(fed.b)),
        ]:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
                publish(exchange, routing_key, {header: [key]}, b"refused")
            assert caught.value.reply_code == ACCESS_REFUSED
    finally:
        connection.close()

    seen: dict[bytes, dict] = {}
    while (delivery := curator.receive(timeout=1)) is not None:
        assert delivery.sender == fed.a and delivery.routing_key == own, delivery
        assert delivery.body not in seen  # one copy per publish, whatever the extra keys matched
        seen[delivery.body] = dict(delivery.headers)
        curator.ack(delivery)
    assert set(seen) == set(accepted)
    for body, header in accepted.items():
        assert BCC_HEADER not in seen[body]
        if header == "CC":  # CC travels as an ordinary header; the curator routes on nothing in it
            assert "CC" in seen[body]
    assert b.receive(timeout=1) is None
    # The curator's transport rejected nothing (every delivery came with A's own key): no dead letters.
    check = fed.raw(fed.curator_user)
    try:
        declared = check.channel().queue_declare(topo.DEAD_LETTER_QUEUE, passive=True)
        assert declared.method.message_count == 0
        for organisation in (fed.a, fed.b):
            inbox = check.channel().queue_declare(topo.participant_inbox(organisation), passive=True)
            assert inbox.method.message_count == 0, organisation
    finally:
        check.close()


def test_send_many_fails_naming_a_recipient_whose_inbox_is_missing_and_still_reaches_the_others(fed3):
    """``mandatory`` on a BCC publish is satisfied by any one routed copy, so a deleted inbox used to miss
    the message while ``send_many`` reported success. Now the others receive it and the call raises."""
    curator = fed3.curator()
    a, c = fed3.participant(fed3.a), fed3.participant(fed3.c)
    fed3.delete_inbox(fed3.b)
    with pytest.raises(PublishFailed, match=f"'{fed3.b}'") as caught:
        curator.send_many([fed3.a, fed3.b, fed3.c], b"partly", message_type="t")
    assert caught.value.undelivered == (fed3.b,)
    assert fed3.a not in str(caught.value) and fed3.c not in str(caught.value)
    for endpoint in (a, c):  # the ones whose inbox exists got it, once
        delivery = endpoint.receive(timeout=5)
        assert delivery is not None and delivery.body == b"partly", endpoint
        assert delivery.routing_key == topo.SELECTED_KEY
        assert endpoint.ack(delivery)
        assert endpoint.receive(timeout=0.3) is None
    # The curator's endpoint keeps working after the failure.
    curator.send_many([fed3.a, fed3.c], b"after", message_type="t")
    for endpoint in (a, c):
        delivery = endpoint.receive(timeout=5)
        assert delivery is not None and delivery.body == b"after"
        endpoint.ack(delivery)


def test_send_many_names_every_recipient_when_no_inbox_exists_also_for_chunked_messages(fed3):
    curator = fed3.curator(chunk_size=64 * 1024)
    a = fed3.participant(fed3.a)
    fed3.delete_inbox(fed3.b)
    fed3.delete_inbox(fed3.c)
    with pytest.raises(PublishFailed) as caught:  # nothing routed at all: the broker returns it
        curator.send_many([fed3.c, fed3.b], b"nobody", message_type="t")
    assert set(caught.value.undelivered) == {fed3.b, fed3.c}
    payload = os.urandom(200_000)  # 4 chunks; the missing inbox is noticed once, after the last
    with pytest.raises(PublishFailed, match=f"'{fed3.c}'") as caught:
        curator.send_many([fed3.a, fed3.c], payload, message_type="t")
    assert caught.value.undelivered == (fed3.c,)
    delivery = a.receive(timeout=10)
    assert delivery is not None and delivery.body == payload and delivery.chunks == 4
    a.ack(delivery)


def test_send_to_one_organisation_whose_inbox_is_missing_names_it(fed3):
    curator = fed3.curator()
    fed3.delete_inbox(fed3.b)
    with pytest.raises(PublishFailed, match=f"'{fed3.b}'") as caught:
        curator.send(fed3.b, b"lost", message_type="t")
    assert caught.value.undelivered == (fed3.b,) and caught.value.unroutable
    a = fed3.participant(fed3.a)
    curator.send(fed3.a, b"after", message_type="t")  # the endpoint keeps working
    delivery = a.receive(timeout=5)
    assert delivery is not None and delivery.body == b"after"
    a.ack(delivery)
