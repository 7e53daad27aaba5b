"""``tessera curator``: the composition root -- settings, logging, health, transport, then the round loop."""

from __future__ import annotations

import threading

import structlog
from prometheus_client import CollectorRegistry
from tessera.data import load_dataset
from tessera.observability import CuratorMetrics
from tessera.roster import RosterFile
from tessera.settings import (
    configure_logging,
    install_stop_handlers,
    serve_until_stopped,
    start_health_server,
)
from tessera.transport import CuratorTransport

from .rounds import Curator
from .settings import CuratorSettings

log = structlog.get_logger("tessera.curator")


def run_curator(settings: CuratorSettings) -> int:
    """Run the curator over RabbitMQ until the federation finishes; returns a process exit code."""
    configure_logging(settings.logging)
    stop = threading.Event()
    install_stop_handlers(stop)
    roster = RosterFile.load(settings.roster_file, fingerprint=settings.roster_fingerprint)
    validation = None
    if settings.validation is not None:
        v = settings.validation
        validation = load_dataset(v.path, label_column=v.label_column, labels_path=v.labels_path)
    registry = CollectorRegistry()
    metrics = CuratorMetrics(registry)
    health = start_health_server(settings.health, registry)
    try:
        transport = CuratorTransport(
            settings.broker.transport(),
            federation=settings.federation,
            organisations=list(roster.organisations),
            curator_user=roster.curator_user,
        )
        with transport:
            curator = Curator(
                settings,
                roster,
                transport,
                validation=validation,
                metrics=metrics,
                heartbeat=health.beat if health is not None else (lambda: None),
            )
            if health is not None:
                health.set_ready(True)
            state = curator.run()
        log.info("curator_exit", status=state.status, reason=state.stop_reason, rounds=state.rounds_completed)
        if health is not None and settings.health.linger_after_finish and not stop.is_set():
            log.info("serving_until_stopped", detail="federation finished; health and metrics stay up")
            serve_until_stopped(stop, health.beat)
        return 0
    finally:
        if health is not None:
            health.close()
