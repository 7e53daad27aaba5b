"""How the curator hands secure-aggregation messages to the bus: one send per message, not per recipient."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tessera import protocol
from tessera.bus import LocalExchange
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


def test_one_bus_call_per_message_and_bytes_counted_per_recipient(tmp_path: Path):
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
    exchange = LocalExchange(roster.organisations, curator=roster.curator_user)
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
    assert bus.calls == [
        ("send_many", tuple(roster.organisation_of(i) for i in everyone)),
        ("send", "b"),
    ]
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
