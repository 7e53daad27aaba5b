"""Fixtures every broker-backed test shares."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from tessera.transport import local_broker_problem

BROKER_URL = os.environ.get("TESSERA_TEST_AMQP_URL", "amqp://127.0.0.1:5672/")


@pytest.fixture(scope="session")
def broker() -> Iterator[list[threading.Thread]]:
    """Skips when there is no broker or no ``rabbitmqctl``; yields the list of background cleanups."""
    problem = local_broker_problem(BROKER_URL)
    if problem is not None:
        pytest.skip(f"needs a local RabbitMQ with rabbitmqctl ({problem}; run `make broker`)")
    cleanups: list[threading.Thread] = []
    yield cleanups
    for thread in cleanups:
        thread.join(120)
