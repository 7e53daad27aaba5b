"""Fixtures for the transport's integration tests: a freshly provisioned federation per test.

Every test gets its own vhost and its own broker users (unique names, since broker users are global and
other suites may share this broker), provisioned exactly as ``docs/topology.md`` says, and deleted after
the test. Deleting runs in the background (each ``rabbitmqctl`` call costs about a second) and is awaited
at the end of the session.
"""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import pika
import pytest
from pydantic import SecretStr
from tessera.transport import (
    ConnectionSettings,
    CuratorTransport,
    ParticipantTransport,
    ReconnectPolicy,
    TransportSettings,
    connection_parameters,
    deprovision,
    generate_password,
    provision,
)
from tessera.transport import topology as topo

BROKER_URL = os.environ.get("TESSERA_TEST_AMQP_URL", "amqp://127.0.0.1:5672/")


@dataclass
class Federation:
    """One provisioned test federation and helpers to connect to it as any of its users."""

    federation: str
    curator_user: str
    organisations: tuple[str, ...]
    passwords: dict[str, str]
    endpoints: list[Any] = field(default_factory=list)

    @property
    def vhost(self) -> str:
        return topo.vhost(self.federation)

    @property
    def a(self) -> str:
        return self.organisations[0]

    @property
    def b(self) -> str:
        return self.organisations[1]

    @property
    def c(self) -> str:
        """The third organisation (only of :func:`fed3`)."""
        return self.organisations[2]

    def url(self, user: str) -> str:
        parts = urlsplit(BROKER_URL)
        netloc = f"{quote(user, safe='')}:{quote(self.passwords[user], safe='')}@{parts.hostname}"
        return f"amqp://{netloc}:{parts.port or 5672}/"

    def settings(self, user: str, *, heartbeat: int = 10, **overrides: Any) -> TransportSettings:
        connection = ConnectionSettings(
            url=SecretStr(self.url(user)),
            heartbeat=heartbeat,
            reconnect=ReconnectPolicy(initial_delay=0.1, max_delay=1.0),
        )
        values: dict[str, Any] = {"connection": connection, "start_timeout": 15.0, "publish_timeout": 15.0}
        values.update(overrides)
        return TransportSettings(**values)

    def curator(self, **overrides: Any) -> CuratorTransport:
        endpoint = CuratorTransport(
            self.settings(self.curator_user, **overrides),
            federation=self.federation,
            organisations=self.organisations,
            curator_user=self.curator_user,
        )
        self.endpoints.append(endpoint)
        return endpoint.start()

    def participant(self, organisation: str, **overrides: Any) -> ParticipantTransport:
        endpoint = ParticipantTransport(
            self.settings(organisation, **overrides),
            federation=self.federation,
            organisation=organisation,
            curator_user=self.curator_user,
        )
        self.endpoints.append(endpoint)
        return endpoint.start()

    def raw(self, user: str) -> pika.BlockingConnection:
        """A plain pika connection as ``user``, for acting as a hostile or out-of-band client."""
        settings = ConnectionSettings(url=SecretStr(self.url(user)))
        return pika.BlockingConnection(connection_parameters(settings, virtual_host=self.vhost))

    def delete_inbox(self, organisation: str) -> None:
        """What an operator (or a lost queue) does behind the running curator's back: the inbox is gone."""
        connection = self.raw(self.curator_user)
        try:
            connection.channel().queue_delete(topo.participant_inbox(organisation))
        finally:
            connection.close()

    def rabbitmqctl(self, *args: str) -> str:
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True)
        return done.stdout


def _provisioned(broker: list[threading.Thread], count: int) -> Iterator[Federation]:
    tag = uuid.uuid4().hex[:8]
    organisations = tuple(f"{name}-{tag}" for name in "abc"[:count])
    curator_user = f"cur-{tag}"
    passwords = {user: generate_password() for user in (curator_user, *organisations)}
    federation = Federation(f"t-{tag}", curator_user, organisations, passwords)
    provision(
        federation.federation,
        curator_password=passwords[curator_user],
        organisation_passwords={o: passwords[o] for o in organisations},
        curator_user=curator_user,
    )
    try:
        yield federation
    finally:
        for endpoint in federation.endpoints:
            endpoint.close()
        cleanup = threading.Thread(
            # No retry: the Errno 14 these spawns once hit is fixed (provision.child_environment).
            target=deprovision,
            args=(federation.federation,),
            kwargs={"organisations": organisations, "curator_user": curator_user},
            daemon=True,
        )
        cleanup.start()
        broker.append(cleanup)


@pytest.fixture
def fed(broker: list[threading.Thread]) -> Iterator[Federation]:
    """A federation of two organisations, ``fed.a`` and ``fed.b``."""
    yield from _provisioned(broker, 2)


@pytest.fixture
def fed3(broker: list[threading.Thread]) -> Iterator[Federation]:
    """A federation of three organisations, ``fed.a``, ``fed.b`` and ``fed.c``."""
    yield from _provisioned(broker, 3)
