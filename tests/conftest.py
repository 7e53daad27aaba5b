"""Fixtures every broker-backed test shares."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

BROKER_URL = os.environ.get("TESSERA_TEST_AMQP_URL", "amqp://127.0.0.1:5672/")


def _broker_reachable() -> bool:
    parts = urlsplit(BROKER_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker() -> Iterator[list[threading.Thread]]:
    """Skips when there is no broker or no ``rabbitmqctl``; yields the list of background cleanups."""
    if shutil.which("rabbitmqctl") is None or not _broker_reachable():
        pytest.skip("needs a local RabbitMQ with rabbitmqctl (run `make broker` / scripts/ensure-broker.sh)")
    cleanups: list[threading.Thread] = []
    yield cleanups
    for thread in cleanups:
        thread.join(120)
