"""``tessera participant``: the composition root -- settings, data, logging, health, transport, the loop."""

from __future__ import annotations

import threading

import structlog
from prometheus_client import CollectorRegistry
from tessera.data import ArrayDataset, FeatureEncoding, load_dataset, train_validation_split
from tessera.errors import ConfigurationError
from tessera.observability import ParticipantMetrics
from tessera.roster import RosterFile, load_identity_key
from tessera.settings import (
    configure_logging,
    install_stop_handlers,
    serve_until_stopped,
    start_health_server,
)
from tessera.transport import ParticipantTransport

from .client import Exit, Participant
from .settings import DataSettings, ParticipantSettings

log = structlog.get_logger("tessera.participant")


def load_local_data(data: DataSettings) -> tuple[ArrayDataset, ArrayDataset]:
    """The organisation's (train, validation) split, fixed by the split seed."""
    encoding = None
    if data.encoding_file is not None:
        try:
            encoding = FeatureEncoding.model_validate_json(data.encoding_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"data.encoding_file {data.encoding_file}: {exc}") from exc
    dataset = load_dataset(
        data.path,
        label_column=data.label_column,
        format=data.format,
        labels_path=data.labels_path,
        encoding=encoding,
        drop_columns=data.drop_columns,
        label_classes=data.label_classes,
    )
    return train_validation_split(dataset, data.validation_fraction, data.split_seed)


def run_participant(settings: ParticipantSettings) -> int:
    """Take part in the federation over RabbitMQ; returns a process exit code (0: finished normally)."""
    configure_logging(settings.logging)
    stop = threading.Event()
    install_stop_handlers(stop)
    roster = RosterFile.load(settings.roster_file, fingerprint=settings.roster_fingerprint)
    identity = load_identity_key(settings.identity_key_file)
    train, validation = load_local_data(settings.data)
    log.info("data_loaded", train=len(train), validation=len(validation))
    registry = CollectorRegistry()
    metrics = ParticipantMetrics(registry)
    health = start_health_server(settings.health, registry)
    try:
        transport = ParticipantTransport(
            settings.broker.transport(),
            federation=settings.federation,
            organisation=settings.organisation,
            curator_user=roster.curator_user,
        )
        participant = Participant(
            settings,
            roster,
            identity,
            transport,
            train=train,
            validation=validation,
            metrics=metrics,
            heartbeat=health.beat if health is not None else (lambda: None),
        )
        with transport:
            if health is not None:
                health.set_ready(True)
            outcome = participant.run()
        log.info("participant_exit", outcome=outcome.value)
        code = 0 if outcome in (Exit.FINISHED, Exit.BUDGET_EXHAUSTED) else 3
        if health is not None and settings.health.linger_after_finish and not stop.is_set():
            log.info(
                "serving_until_stopped",
                detail="no more rounds for this participant; health and metrics stay up",
            )
            serve_until_stopped(stop, health.beat)
        return code
    finally:
        if health is not None:
            health.close()
