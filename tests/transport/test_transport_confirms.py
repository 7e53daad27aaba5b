"""The confirm tracker (``tessera.transport.confirms``) on a real broker channel: many publishes in flight at
once, each settled by its own confirm; a returned message marks only its own flight; a channel the broker
closes fails every open flight with the broker's reason; one message id is in flight once at a time."""

from __future__ import annotations

import pika
import pika.exceptions
import pytest
from tessera.transport import topology as topo
from tessera.transport.confirms import ConfirmTracker, Flight
from tessera.transport.errors import PRECONDITION_FAILED

pytestmark = pytest.mark.integration


def _properties(fed, message_id: str) -> pika.BasicProperties:
    return pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent, user_id=fed.curator_user, message_id=message_id
    )


def _flight(fed, message_id: str, routing_key: str, settled: list[Flight], body: bytes = b"x") -> Flight:
    return Flight(
        message_id,
        topo.TO_PARTICIPANTS_EXCHANGE,
        routing_key,
        [(body, _properties(fed, message_id))],
        on_settled=settled.append,
    )


@pytest.fixture
def tracked(fed):
    """A raw curator connection to a declared federation and a confirm tracker on a channel of it."""
    fed.curator().close()  # declares the topology
    connection = fed.raw(fed.curator_user)
    try:
        yield connection, ConfirmTracker(connection.channel())
    finally:
        connection.close()


def _run_until(connection: pika.BlockingConnection, done, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if done():
            return
        connection.process_data_events(time_limit=0.05)
    raise AssertionError("not settled in time")


def test_many_publishes_are_in_flight_at_once_and_each_is_confirmed(fed, tracked):
    connection, tracker = tracked
    settled: list[Flight] = []
    flights = [
        _flight(fed, f"m{i}", topo.to_organisation_key(fed.a if i % 2 else fed.b), settled) for i in range(40)
    ]
    most = 0
    for flight in flights:
        tracker.send(flight)
        most = max(most, tracker.in_flight)
    # Without waiting for confirms, more than one publish was unconfirmed at some point (a blocking
    # confirm channel never has more than one).
    assert most > 1
    _run_until(connection, lambda: len(settled) == 40)
    assert tracker.in_flight == 0
    assert {f.message_id for f in settled} == {f.message_id for f in flights}
    assert all(f.error is None and not f.returned and not f.nacked for f in settled)
    check = connection.channel()
    for organisation in (fed.a, fed.b):
        inbox = check.queue_declare(topo.participant_inbox(organisation), passive=True)
        assert inbox.method.message_count == 20, organisation


def test_a_returned_message_marks_only_its_own_flight(fed, tracked):
    connection, tracker = tracked
    settled: list[Flight] = []
    good = [_flight(fed, f"ok{i}", topo.to_organisation_key(fed.a), settled) for i in range(5)]
    lost = _flight(fed, "lost", "to.nobody-here", settled)
    for flight in (*good[:2], lost, *good[2:]):
        tracker.send(flight)
    _run_until(connection, lambda: len(settled) == 6)
    assert [f.message_id for f in settled if f.returned] == ["lost"]


def test_a_channel_the_broker_closes_fails_every_open_flight_with_its_reason(fed, tracked):
    connection, tracker = tracked
    settled: list[Flight] = []
    forged = pika.BasicProperties(user_id=fed.a, message_id="refused")  # not the sender's user
    refused = Flight(
        "refused",
        topo.TO_PARTICIPANTS_EXCHANGE,
        topo.to_organisation_key(fed.a),
        [(b"x", forged)],
        on_settled=settled.append,
    )
    tracker.send(refused)
    _run_until(connection, lambda: len(settled) == 1)
    assert isinstance(refused.error, pika.exceptions.ChannelClosedByBroker)
    assert refused.error.reply_code == PRECONDITION_FAILED
    late: list[Flight] = []
    tracker.send(_flight(fed, "late", topo.to_organisation_key(fed.a), late))
    assert late and late[0].error is refused.error  # refused at once: the channel is gone


def test_one_message_id_is_in_flight_once_at_a_time(fed, tracked):
    connection, tracker = tracked
    settled: list[Flight] = []
    first = _flight(fed, "same", topo.to_organisation_key(fed.a), settled, b"1")
    second = _flight(fed, "same", "to.nobody-here", settled, b"2")
    tracker.send(first)
    tracker.send(second)
    assert tracker.in_flight == 1  # the second waits: a return of it must not be taken for the first's
    _run_until(connection, lambda: len(settled) == 2)
    assert settled == [first, second]
    assert not first.returned and second.returned
