"""How the curator hands secure-aggregation messages to the bus: one envelope per message, not per recipient,
all of a step's messages in one call, and what an undelivered one means."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tessera import protocol
from tessera.bus import LocalExchange, Sent
from tessera.curator.rounds import Curator
from tessera.curator.settings import CuratorSettings
from tessera.models import ModelSpec
from tessera.observability import CuratorMetricsSink
from tessera.roster import RosterFile, create_demo_federation
from tessera.secagg.config import SessionIds
from tessera.secagg.curator import Outgoing
from tessera.secagg.messages import Abort, SurvivorList
from tessera.secagg.wire import decode as decode_secagg

ORGS = ["a", "b", "c"]


class RecordingBus:
    """The in-process curator endpoint, recording every call."""

    def __init__(self, exchange: LocalExchange) -> None:
        self.inner = exchange.curator_endpoint()
        self.calls: list[tuple[str, Any]] = []

    def send(self, organisation: str, body: bytes, *, message_type: str) -> str:
        self.calls.append(("send", organisation))
        return self.inner.send(organisation, body, message_type=message_type)

    def send_many(self, organisations: Any, body: bytes, *, message_type: str) -> str:
        self.calls.append(("send_many", tuple(organisations)))
        return self.inner.send_many(organisations, body, message_type=message_type)

    def send_each(self, envelopes: Any) -> list[Sent]:
        self.calls.append(("send_each", [tuple(e.organisations) for e in envelopes]))
        return self.inner.send_each(envelopes)

    def broadcast(self, body: bytes, *, message_type: str) -> str:
        self.calls.append(("broadcast", None))
        return self.inner.broadcast(body, message_type=message_type)

    def receive(self, timeout: float | None = None) -> Any:
        return self.inner.receive(timeout)

    def ack(self, delivery: Any) -> bool:
        return self.inner.ack(delivery)

    def reject(self, delivery: Any, reason: str) -> bool:
        return self.inner.reject(delivery, reason)


class Metrics(CuratorMetricsSink):
    def __init__(self) -> None:
        self.sent = 0

    def bytes_sent(self, count: int) -> None:
        self.sent += count


def _federation(tmp_path: Path) -> tuple[RosterFile, CuratorSettings, LocalExchange]:
    """A three-organisation demo roster, the curator's settings for it and an in-process exchange."""
    create_demo_federation("local", ORGS, tmp_path / "fed")
    roster = RosterFile.load(tmp_path / "fed" / "roster.json")
    settings = CuratorSettings(
        federation="local",
        roster_file=tmp_path / "fed" / "roster.json",
        state_dir=tmp_path / "curator",
        model=ModelSpec(name="mlp", kwargs={"input_dim": 4, "hidden": [4], "num_classes": 2}),
        num_classes=2,
        health={"enabled": False},
    )
    return roster, settings, LocalExchange(roster.organisations, curator=roster.curator_user)


def test_one_bus_call_per_message_and_bytes_counted_per_recipient(tmp_path: Path):
    roster, settings, exchange = _federation(tmp_path)
    bus, metrics = RecordingBus(exchange), Metrics()
    curator = Curator(settings, roster, bus, metrics=metrics)
    ids = SessionIds(federation="local", round=1, aggregation="r1a0-00000000")
    index = {o: roster.index_of(o) for o in ORGS}
    everyone = tuple(sorted(index.values()))
    curator.aggregation._send(
        [
            Outgoing(everyone, SurvivorList(ids=ids, survivors=everyone)),
            Outgoing((index["b"],), Abort(ids=ids, reason="only b")),
            Outgoing((), Abort(ids=ids, reason="nobody")),
        ]
    )
    # One bus call for the whole step (its publishes overlap), one envelope per message, none for nobody.
    assert bus.calls == [("send_each", [tuple(roster.organisation_of(i) for i in everyone), ("b",)])]
    received: dict[str, list[Any]] = {}
    sizes = 0
    for organisation in ORGS:
        endpoint = exchange.participant_endpoint(organisation)
        while (delivery := endpoint.receive(timeout=0)) is not None:
            _, payload = protocol.decode(delivery.body, max_payload=1 << 20)
            received.setdefault(organisation, []).append(decode_secagg(payload, curator.limits))
            sizes += len(delivery.body)
    assert {o: [type(m).__name__ for m in ms] for o, ms in received.items()} == {
        "a": ["SurvivorList"],
        "b": ["SurvivorList", "Abort"],
        "c": ["SurvivorList"],
    }
    assert metrics.sent == sizes  # bytes delivered, counted once per recipient


class LosingBus(RecordingBus):
    """A broker bus whose inbox of ``gone`` was deleted: it delivers to the others and says so."""

    def __init__(self, exchange: LocalExchange, gone: tuple[str, ...]) -> None:
        super().__init__(exchange)
        self.gone = gone

    def send_each(self, envelopes: Any) -> list[Sent]:
        from tessera.transport.errors import PublishFailed

        if not self.gone:
            raise PublishFailed("no confirm within 30 s")
        out = []
        for envelope in envelopes:
            for organisation in envelope.organisations:
                if organisation not in self.gone:
                    self.inner.send(organisation, envelope.body, message_type=envelope.message_type)
            out.append(Sent("m", tuple(o for o in envelope.organisations if o in self.gone)))
        return out


def test_an_undelivered_recipient_drops_out_and_an_unconfirmed_send_raises(tmp_path: Path):
    from tessera.transport.errors import PublishFailed

    roster, settings, exchange = _federation(tmp_path)
    bus, metrics = LosingBus(exchange, gone=("c",)), Metrics()
    curator = Curator(settings, roster, bus, metrics=metrics)
    ids = SessionIds(federation="local", round=1, aggregation="r1a0-00000000")
    everyone = tuple(sorted(roster.index_of(o) for o in ORGS))
    curator.aggregation._send([Outgoing(everyone, SurvivorList(ids=ids, survivors=everyone))])
    assert curator.attendance.unresponsive == {"c"}  # it cannot answer: a dropout, not a crash
    delivered = [o for o in ORGS if exchange.participant_endpoint(o).receive(timeout=0) is not None]
    assert delivered == ["a", "b"]
    assert metrics.sent > 0 and metrics.sent % 2 == 0  # counted for the two who have it
    bus.gone = ()
    with pytest.raises(PublishFailed, match="no confirm"):
        curator.aggregation._send([Outgoing(everyone, SurvivorList(ids=ids, survivors=everyone))])
