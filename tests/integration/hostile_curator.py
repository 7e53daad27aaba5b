"""A hostile curator, run as its own process with the curator's broker credentials (and nothing else).

It holds what a real coordinator holds in the new key custody: the roster of public keys, the broker
password, the model. It holds no organisation's private key. It tries, one after the other:

- ``other_roster``: announce a round under a roster of its own making (one member's key swapped for its own);
- ``other_layout``: announce a round whose layout is not the roster's (another clipping bound);
- ``low_threshold``: a proper round, then an aggregation with a threshold below the roster's;
- ``sparse_graph``: a proper round, then a SecAgg+ graph the roster does not allow;
- ``forged_advertisement``: a proper round and aggregation, then a broadcast of advertisements in which one
  member's advertisement is replaced by one signed with the curator's own key.

After each attempt it waits and records every message the participants sent: the test expects Ready for
the proper announcements and nothing that carries a secret (shares, masked inputs, unmask shares).

    python hostile_curator.py PLAN.json OUT.json
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from tessera import protocol
from tessera.crypto import AgreementKey, SigningKey
from tessera.envelope import Refused, admit, seal, seal_secagg
from tessera.models import ModelSpec, build_model, flatten_parameters, model_fingerprint
from tessera.roster import RosterFile
from tessera.secagg.config import AggregationConfig, Graph, SessionIds
from tessera.secagg.messages import (
    AdvertisedKeys,
    AdvertiseKeys,
    StartAggregation,
    advertisement_signed_bytes,
)
from tessera.secagg.wire import WireLimits
from tessera.transport import ConnectionSettings, CuratorTransport, TransportSettings


def main(plan_path: str, out_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    roster = RosterFile.load(Path(plan["roster_file"]))
    spec = ModelSpec.model_validate(plan["model"])
    model = build_model(spec)
    layout = roster.update_layout(
        num_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        num_classes=plan["num_classes"],
    )
    limits = WireLimits(
        max_participants=len(roster.members), vector_length=layout.length, ring_bits=layout.ring_bits
    )
    weights = protocol.weights_to_bytes(flatten_parameters(model))
    password = Path(plan["broker"]["password_file"]).read_text().strip()
    settings = TransportSettings(
        connection=ConnectionSettings(
            url=SecretStr(plan["broker"]["url"]),
            username=plan["broker"]["username"],
            password=SecretStr(password),
        ),
        start_timeout=60,
    )
    federation = roster.federation
    observed: dict[str, dict[str, list[str]]] = {}
    own_key = SigningKey.generate()  # the only signing key this curator has

    with CuratorTransport(
        settings,
        federation=federation,
        organisations=list(roster.organisations),
        curator_user=roster.curator_user,
    ) as bus:

        def listen(seconds: float, until_all: type | None = None) -> dict[str, list[Any]]:
            """Everything the participants send for ``seconds`` (or until each sent an ``until_all``)."""
            got: dict[str, list[Any]] = {}
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                delivery = bus.receive(timeout=0.5)
                if delivery is None:
                    continue
                entry = admit(delivery, federation=federation, max_payload=limits.max_message_bytes)
                bus.ack(delivery)
                if isinstance(entry, Refused):
                    continue
                header = entry.header
                item: Any = entry.secagg(limits) if isinstance(header, protocol.SecAgg) else header
                got.setdefault(delivery.sender, []).append(item)
                if until_all is not None and all(
                    any(isinstance(i, until_all) for i in got.get(o, [])) for o in roster.organisations
                ):
                    break
            return got

        def announce(round_number: int, **changes: Any) -> str:
            aggregation = f"r{round_number}a0-{secrets.token_hex(4)}"
            header = protocol.RoundAnnouncement(
                federation=federation,
                round=round_number,
                attempt=0,
                aggregation=aggregation,
                model=spec,
                model_fingerprint=model_fingerprint(spec, model),
                layout=changes.get("layout", protocol.LayoutHeader.of(layout)),
                roster_fingerprint=changes.get("roster_fingerprint", roster.fingerprint()),
            )
            sealed = seal(header, weights)
            bus.broadcast(sealed.body, message_type=sealed.message_type)
            return aggregation

        def start(round_number: int, aggregation: str, **changes: Any) -> AggregationConfig:
            indices = sorted(roster.index_of(o) for o in roster.organisations)
            config = AggregationConfig.create(
                ids=SessionIds(federation=federation, round=round_number, aggregation=aggregation),
                participants=indices,
                vector_length=layout.length,
                ring_bits=layout.ring_bits,
                threshold=changes.get("threshold"),
                graph=changes.get("graph", Graph.FULL),
                neighbours=changes.get("neighbours"),
                neighbourhood_threshold=changes.get("neighbourhood_threshold"),
                graph_seed=secrets.token_bytes(32),
            )
            sealed = seal_secagg(federation, StartAggregation(config=config))
            bus.send_many(list(roster.organisations), sealed.body, message_type=sealed.message_type)
            return config

        def record(name: str, got: dict[str, list[Any]]) -> None:
            observed[name] = {o: [type(m).__name__ for m in got.get(o, [])] for o in roster.organisations}

        wait = float(plan.get("wait", 8.0))
        for round_number, attack in enumerate(plan["attacks"], start=1):
            if attack == "other_roster":
                swapped = roster.members[0].model_copy(update={"identity_key": own_key.public_bytes.hex()})
                theirs = roster.model_copy(update={"members": (swapped, *roster.members[1:])})
                announce(round_number, roster_fingerprint=theirs.fingerprint())
                record(attack, listen(wait))
            elif attack == "other_layout":
                other = protocol.LayoutHeader.of(layout).model_copy(update={"clip": layout.clip * 4})
                announce(round_number, layout=other)
                record(attack, listen(wait))
            elif attack in ("low_threshold", "sparse_graph", "forged_advertisement"):
                aggregation = announce(round_number)
                ready = listen(120.0, until_all=protocol.Ready)
                n = len(roster.members)
                if attack == "low_threshold":
                    start(round_number, aggregation, threshold=n // 2 + 1)
                    got = listen(wait)
                elif attack == "sparse_graph":
                    start(
                        round_number, aggregation, graph=Graph.SPARSE, neighbours=2, neighbourhood_threshold=2
                    )
                    got = listen(wait)
                else:
                    config = start(round_number, aggregation)
                    adverts = listen(30.0, until_all=AdvertiseKeys)
                    honest = {
                        item.sender: item
                        for items in adverts.values()
                        for item in items
                        if isinstance(item, AdvertiseKeys)
                    }
                    victim = min(honest)
                    fresh = [AgreementKey.generate().public_bytes for _ in range(2)]
                    commitment = secrets.token_bytes(32)
                    forged = AdvertiseKeys(
                        ids=config.ids,
                        sender=victim,
                        encryption_key=fresh[0],
                        masking_key=fresh[1],
                        commitment=commitment,
                        signature=own_key.sign(
                            advertisement_signed_bytes(config.ids, victim, fresh[0], fresh[1], commitment)
                        ),
                    )
                    broadcast = AdvertisedKeys(
                        ids=config.ids,
                        advertisements=tuple(forged if u == victim else honest[u] for u in sorted(honest)),
                    )
                    sealed = seal_secagg(federation, broadcast)
                    bus.send_many(list(roster.organisations), sealed.body, message_type=sealed.message_type)
                    got = listen(wait)
                    record(f"{attack}:advertise", adverts)
                record(f"{attack}:ready", ready)
                record(attack, got)
            else:
                raise SystemExit(f"unknown attack {attack!r}")
    Path(out_path).write_text(json.dumps({"observed": observed}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
