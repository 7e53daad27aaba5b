"""Several messages at once (``CuratorTransport.send_each``): the publishes' confirms overlap, each message
still reaches exactly its recipients, a missing inbox is reported per message, and a bad envelope publishes
nothing. Against the real broker, no mocks."""

from __future__ import annotations

import os

import pytest
from tessera.bus import Envelope
from tessera.errors import LocalUsageError
from tessera.transport import topology as topo

pytestmark = pytest.mark.integration


def _take(endpoint, timeout: float = 5.0):
    delivery = endpoint.receive(timeout=timeout)
    assert delivery is not None
    assert endpoint.ack(delivery)
    return delivery


def test_send_each_delivers_every_message_to_exactly_its_recipients(fed3):
    curator = fed3.curator(chunk_size=64 * 1024)
    a, b, c = (fed3.participant(o) for o in fed3.organisations)
    big = os.urandom(200_000)  # 4 chunks, in flight together with the others
    envelopes = [
        Envelope((fed3.a,), b"for-a", "t"),
        Envelope((fed3.b,), big, "t"),
        Envelope((fed3.a, fed3.c), b"for-a-and-c", "t", headers={"k": 1}),
        Envelope((fed3.c,), b"for-c", "t", fan_out=True),
    ]
    sent = curator.send_each(envelopes)
    assert [s.undelivered for s in sent] == [(), (), (), ()]
    assert len({s.message_id for s in sent}) == 4
    got = {name: [] for name in fed3.organisations}
    for name, endpoint, count in ((fed3.a, a, 2), (fed3.b, b, 1), (fed3.c, c, 2)):
        for _ in range(count):
            delivery = _take(endpoint)
            got[name].append((delivery.body, delivery.routing_key, delivery.message_id))
        assert endpoint.receive(timeout=0.3) is None, name
    assert sorted(got[fed3.a]) == sorted(
        [
            (b"for-a", topo.to_organisation_key(fed3.a), sent[0].message_id),
            (b"for-a-and-c", topo.SELECTED_KEY, sent[2].message_id),
        ]
    )
    assert got[fed3.b] == [(big, topo.to_organisation_key(fed3.b), sent[1].message_id)]
    assert sorted(got[fed3.c]) == sorted(
        [
            (b"for-a-and-c", topo.SELECTED_KEY, sent[2].message_id),
            (b"for-c", topo.SELECTED_KEY, sent[3].message_id),  # fan_out: no sign it was for c alone
        ]
    )


def test_send_each_reports_a_missing_inbox_per_message_and_delivers_the_rest(fed3):
    curator = fed3.curator()
    a, c = fed3.participant(fed3.a), fed3.participant(fed3.c)
    fed3.delete_inbox(fed3.b)
    sent = curator.send_each(
        [
            Envelope((fed3.b,), b"lost", "t"),  # returned by the broker: no queue for to.b
            Envelope((fed3.a,), b"for-a", "t"),
            Envelope((fed3.a, fed3.b, fed3.c), b"shared", "t"),  # routed to a and c, b's inbox missing
            Envelope((fed3.c,), b"for-c", "t"),
        ]
    )
    assert [s.undelivered for s in sent] == [(fed3.b,), (), (fed3.b,), ()]
    assert sorted(_take(a).body for _ in range(2)) == [b"for-a", b"shared"]
    assert sorted(_take(c).body for _ in range(2)) == [b"for-c", b"shared"]
    assert a.receive(timeout=0.3) is None and c.receive(timeout=0.1) is None


def test_send_each_checks_every_envelope_before_publishing_anything(fed):
    curator, a, b = fed.curator(), fed.participant(fed.a), fed.participant(fed.b)
    bad = [
        [Envelope((fed.a,), b"x", "t"), Envelope((fed.a, "nobody"), b"x", "t")],
        [Envelope((fed.a,), b"x", "t"), Envelope((), b"x", "t")],
        [Envelope((fed.a,), b"x", "t"), Envelope((fed.b,), b"x", "")],
        [Envelope((fed.a,), b"x", "t"), Envelope((fed.b,), b"x", "t", headers={"BCC": ["to.x"]})],
        [Envelope((fed.a,), b"x", "t"), Envelope(fed.b, b"x", "t")],  # type: ignore[arg-type]
    ]
    for envelopes in bad:
        with pytest.raises(LocalUsageError):
            curator.send_each(envelopes)
    assert a.receive(timeout=0.5) is None and b.receive(timeout=0.1) is None
    assert curator.send_each([]) == []
    (sent,) = curator.send_each([Envelope((fed.b,), b"after", "t")])  # the endpoint still works
    assert _take(b).body == b"after" and sent.undelivered == ()
