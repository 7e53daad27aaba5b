"""Settings pieces both services share: broker, logging, health endpoint.

Each service has one ``BaseSettings`` class (``tessera.curator.settings``, ``tessera.participant.settings``)
read from environment variables with the prefix ``TESSERA_`` and ``__`` between nested names
(``TESSERA_BROKER__URL``), optionally from a file (``--env-file``). Unknown ``TESSERA_`` variables are
rejected at start-up, so a typo in a chart value cannot be silently ignored.
"""

from __future__ import annotations

import enum
import logging
import sys
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from tessera.errors import ConfigurationError
from tessera.transport import ConnectionSettings, TlsSettings, TransportSettings
from tessera.transport.connection import ReconnectPolicy


class BrokerSettings(BaseModel):
    """How to reach RabbitMQ. The vhost is ``tessera-<federation>`` unless the URL names it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: SecretStr = Field(
        default=SecretStr("amqp://127.0.0.1:5672/"),
        description="amqp://host:5672/ or amqps://host:5671/ (credentials may be in the URL or below)",
    )
    username: str | None = Field(
        default=None, description="broker user (the organisation id, or the curator's)"
    )
    password: SecretStr | None = Field(default=None, description="broker password")
    password_file: Path | None = Field(
        default=None, description="file holding the broker password (e.g. a mounted Kubernetes Secret)"
    )
    tls: TlsSettings = Field(default_factory=TlsSettings, description="CA / client certificate for amqps")
    heartbeat: int = Field(default=30, ge=1, description="AMQP heartbeat interval, seconds")
    prefetch: int = Field(default=8, ge=1, le=10_000, description="unacknowledged messages delivered at once")
    chunk_size: int = Field(default=8 * 1024 * 1024, ge=4096, description="largest broker message, bytes")
    max_reconnect_delay: float = Field(default=30.0, gt=0, description="longest wait between reconnects, s")
    start_timeout: float = Field(
        default=600.0,
        gt=0,
        description="how long to wait for the broker (and, for a participant, the curator's topology) at start-up, s",
    )

    def transport(self) -> TransportSettings:
        password = self.password
        if self.password_file is not None:
            try:
                password = SecretStr(self.password_file.read_text().strip())
            except OSError as exc:
                raise ConfigurationError(
                    f"broker.password_file: cannot read {self.password_file}: {exc}"
                ) from exc
        connection = ConnectionSettings(
            url=self.url,
            username=self.username,
            password=password,
            tls=self.tls,
            heartbeat=self.heartbeat,
            reconnect=ReconnectPolicy(max_delay=self.max_reconnect_delay),
        )
        return TransportSettings(
            connection=connection,
            prefetch=self.prefetch,
            chunk_size=self.chunk_size,
            start_timeout=self.start_timeout,
        )


class LogFormat(enum.Enum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class LoggingSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    level: str = Field(default="info", pattern="^(debug|info|warning|error)$", description="log level")
    format: LogFormat = Field(default=LogFormat.AUTO, description="auto: JSON unless stderr is a terminal")


class HealthSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(default=True, description="serve /healthz, /readyz and /metrics")
    host: str = Field(default="0.0.0.0", description="address the health and metrics server binds to")
    port: int = Field(
        default=9100, ge=0, le=65535, description="port of the health and metrics server (0: any)"
    )


def configure_logging(settings: LoggingSettings) -> None:
    """structlog once per process: ISO UTC timestamps, context variables, JSON or console rendering.

    pika's and other libraries' stdlib logging goes through the same renderer.
    """
    json_output = settings.format is LogFormat.JSON or (
        settings.format is LogFormat.AUTO and not sys.stderr.isatty()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.dict_tracebacks if json_output else structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # pika is chatty at info level about every connection step.
    logging.getLogger("pika").setLevel(logging.WARNING)


def settings_error(exc: ValidationError, prefix: str = "TESSERA_") -> ConfigurationError:
    """Turn pydantic's validation error into one message naming each bad variable."""
    lines = []
    for error in exc.errors():
        path = "__".join(str(p) for p in error["loc"]).upper()
        lines.append(f"{prefix}{path}: {error['msg']}")
    return ConfigurationError("invalid configuration:\n  " + "\n  ".join(lines))


__all__ = [
    "BrokerSettings",
    "HealthSettings",
    "LogFormat",
    "LoggingSettings",
    "configure_logging",
    "settings_error",
]
