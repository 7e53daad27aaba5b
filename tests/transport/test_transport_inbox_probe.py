"""The inbox probe (``tessera.transport.inbox_probe``) on a real broker: several passive declares at once,
missing queues found however many there are (each 404 closes a channel), the result in the order asked."""

from __future__ import annotations

import pytest
from tessera.transport import topology as topo
from tessera.transport.inbox_probe import InboxProbe

pytestmark = pytest.mark.integration


def _wait(connection, results: list, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if results:
            return
        connection.process_data_events(time_limit=0.05)
    raise AssertionError("the check did not finish")


@pytest.mark.parametrize("width", [1, 2, 16])
def test_the_probe_names_exactly_the_missing_queues_in_the_order_asked(fed3, width):
    fed3.curator().close()  # declares every inbox
    fed3.delete_inbox(fed3.b)
    inboxes = [topo.participant_inbox(o) for o in fed3.organisations]
    names = [inboxes[1], "no-such-queue-1", inboxes[0], "no-such-queue-2", inboxes[2], inboxes[1]]
    connection = fed3.raw(fed3.curator_user)
    try:
        probe = InboxProbe(connection, width=width)
        for _ in range(2):  # the channels left after the 404s are reused; closed ones replaced
            results: list = []
            connection.add_callback_threadsafe(lambda results=results: probe.check(names, results.append))
            _wait(connection, results)
            assert results == [[inboxes[1], "no-such-queue-1", "no-such-queue-2"]]
        results = []
        probe.check([inboxes[0], inboxes[2]], results.append)
        _wait(connection, results)
        assert results == [[]]
        results = []
        probe.check([], results.append)
        assert results == [[]]
    finally:
        connection.close()
