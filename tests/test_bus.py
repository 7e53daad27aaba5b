"""The in-process bus (tessera.bus): what the services rely on, without a broker."""

from __future__ import annotations

import pytest
from tessera.bus import LocalExchange
from tessera.errors import LocalUsageError


def _drain(endpoint) -> list:
    out = []
    while (delivery := endpoint.receive(timeout=0)) is not None:
        out.append(delivery)
    return out


def test_send_many_delivers_once_to_each_listed_organisation():
    exchange = LocalExchange(["a", "b", "c"])
    curator = exchange.curator_endpoint()
    a, b, c = (exchange.participant_endpoint(o) for o in "abc")
    message_id = curator.send_many(["b", "a", "b"], b"shared", message_type="secagg")
    for endpoint in (a, b):
        [delivery] = _drain(endpoint)  # the duplicate counted once
        assert (delivery.sender, delivery.body, delivery.message_type) == ("curator", b"shared", "secagg")
        assert delivery.message_id == message_id  # one message, as over the broker
    assert _drain(c) == []
    assert curator.send_many(["c"], b"one", message_type="secagg") != message_id
    assert [d.body for d in _drain(c)] == [b"one"]


@pytest.mark.parametrize(
    ("organisations", "match"),
    [(["a", "nobody"], "roster"), ([], "at least one"), ("a", "not one string"), (["curator"], "roster")],
)
def test_send_many_refuses_bad_recipients_and_sends_nothing(organisations, match):
    exchange = LocalExchange(["a", "b"])
    curator = exchange.curator_endpoint()
    with pytest.raises(LocalUsageError, match=match):
        curator.send_many(organisations, b"x", message_type="secagg")
    for organisation in ("a", "b"):
        assert _drain(exchange.participant_endpoint(organisation)) == []
    assert _drain(curator) == []


def test_send_and_broadcast_unchanged():
    exchange = LocalExchange(["a", "b"])
    curator = exchange.curator_endpoint()
    a, b = exchange.participant_endpoint("a"), exchange.participant_endpoint("b")
    curator.send("a", b"only-a", message_type="t")
    curator.broadcast(b"all", message_type="t")
    assert [d.body for d in _drain(a)] == [b"only-a", b"all"]
    assert [d.body for d in _drain(b)] == [b"all"]
    with pytest.raises(LocalUsageError):
        curator.send("nobody", b"x", message_type="t")
