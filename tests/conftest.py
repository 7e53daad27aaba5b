"""Fixtures every broker-backed test shares."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from tessera.transport import local_broker_problem

BROKER_URL = os.environ.get("TESSERA_TEST_AMQP_URL", "amqp://127.0.0.1:5672/")


@pytest.fixture(autouse=True, scope="session")
def _loggers_never_cached() -> Iterator[None]:
    """``configure_logging`` makes structlog cache each logger on its first use (right for a service, one
    configuration for its life). In this one test process, tests that run a demo or a federation in process
    configure logging too, and a logger cached then would stay blind to every later test's
    ``structlog.testing.capture_logs`` (a clean CI run lost test_training's warning that way)."""
    configure = structlog.configure

    def uncached(*args: Any, **kwargs: Any) -> None:
        configure(*args, **{**kwargs, "cache_logger_on_first_use": False})

    structlog.configure = uncached  # callers look it up when they call it
    yield
    structlog.configure = configure


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
