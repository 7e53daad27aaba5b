"""A whole federation inside one process: the real curator and participants, an in-process exchange.

The same :class:`~tessera.curator.rounds.Curator` and :class:`~tessera.participant.client.Participant` code
that runs over RabbitMQ runs here on threads, connected by a :class:`~tessera.bus.LocalExchange`. Used by
the demo when no broker is reachable, by the benchmarks, and by research at a scale the broker is not needed
for. Secure aggregation, DP training and FedAvg are exactly those of the services.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from tessera.bus import LocalExchange
from tessera.curator.checkpoint import CuratorState
from tessera.curator.rounds import Curator
from tessera.curator.settings import CuratorSettings
from tessera.data import ArrayDataset, load_dataset
from tessera.errors import TesseraError
from tessera.participant.client import Participant
from tessera.participant.settings import ParticipantSettings
from tessera.roster import RosterFile, load_identity_key

log = structlog.get_logger("tessera.local")


@dataclass
class LocalFederationResult:
    state: CuratorState
    participant_exits: dict[str, str] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)


def run_local_federation(
    curator_settings: CuratorSettings,
    participant_settings: dict[str, ParticipantSettings],
    datasets: dict[str, tuple[ArrayDataset, ArrayDataset]],
    *,
    curator_validation: ArrayDataset | None = None,
    key_dir: Path | None = None,
) -> LocalFederationResult:
    """Run the curator and one participant per entry of ``participant_settings`` to completion.

    ``datasets`` maps each organisation to its (train, validation) split. Identity keys are read from each
    participant's ``identity_key_file`` (or ``key_dir/<org>.key``).
    """
    roster = RosterFile.load(curator_settings.roster_file, fingerprint=curator_settings.roster_fingerprint)
    exchange = LocalExchange(roster.organisations, curator=roster.curator_user)
    participants = []
    for organisation, settings in participant_settings.items():
        key_file = settings.identity_key_file if key_dir is None else key_dir / f"{organisation}.key"
        train, validation = datasets[organisation]
        participants.append(
            Participant(
                settings,
                roster,
                load_identity_key(key_file),
                exchange.participant_endpoint(organisation),
                train=train,
                validation=validation,
            )
        )
    if curator_validation is None and curator_settings.validation is not None:
        v = curator_settings.validation
        curator_validation = load_dataset(v.path, label_column=v.label_column, labels_path=v.labels_path)
    curator = Curator(curator_settings, roster, exchange.curator_endpoint(), validation=curator_validation)
    exits: dict[str, str] = {}
    errors: dict[str, BaseException] = {}

    def participate(p: Participant) -> None:
        organisation = p.settings.organisation
        try:
            exits[organisation] = p.run().value
        except (TesseraError, OSError, TimeoutError) as exc:
            log.error("participant_failed", organisation=organisation, error=str(exc))
            errors[organisation] = exc

    threads = [
        threading.Thread(target=participate, args=(p,), daemon=True, name=p.settings.organisation)
        for p in participants
    ]
    for thread in threads:
        thread.start()
    state = curator.run()
    for thread in threads:
        thread.join(timeout=60)
    return LocalFederationResult(state=state, participant_exits=exits, errors=errors)


__all__ = ["LocalFederationResult", "run_local_federation"]
