"""Settings pieces both services share: broker, logging, health endpoint.

Each service has one ``BaseSettings`` class (``tessera.curator.settings``, ``tessera.participant.settings``)
read from environment variables with the prefix ``TESSERA_`` and ``__`` between nested names
(``TESSERA_BROKER__URL``), optionally from a file (``--env-file``). Unknown ``TESSERA_`` variables are
rejected at start-up, so a typo in a chart value cannot be silently ignored.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings

from tessera.errors import ConfigurationError
from tessera.transport import ConnectionSettings, TlsSettings, TransportSettings
from tessera.transport.connection import ReconnectPolicy, parse_address
from tessera.transport.topology import QueueType


def _split_addresses(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


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
    # A string, not a list: one environment variable / chart value, "node-1:5672,node-2:5672".
    addresses: str = Field(
        default="",
        description="more brokers (host:port, comma-separated: a cluster's other nodes) tried in turn after the URL's",
    )
    queue_type: QueueType = Field(
        default=QueueType.AUTO,
        description="x-queue-type the curator declares the queues with: auto (quorum where the broker "
        "supports it, unless they exist as classic), quorum or classic (docs/topology.md)",
    )

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, value: str) -> str:
        for address in _split_addresses(value):
            parse_address(address)
        return value

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
            addresses=_split_addresses(self.addresses),
        )
        return TransportSettings(
            connection=connection,
            prefetch=self.prefetch,
            chunk_size=self.chunk_size,
            start_timeout=self.start_timeout,
            queue_type=self.queue_type,
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
    linger_after_finish: bool = Field(
        default=False,
        description="after the federation finishes, keep serving /healthz and /metrics until stopped "
        "(for Kubernetes Deployments, which would otherwise restart the exited container)",
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


# TESSERA_ variables that are not settings: read directly by tessera.roster, or by the tests and the demo.
NON_SETTINGS_VARIABLES = frozenset({"TESSERA_ALLOW_SHARED_KEY_FILE", "TESSERA_DATA_DIR"})
NON_SETTINGS_PREFIXES = ("TESSERA_TEST_", "TESSERA_DEMO_", "TESSERA_BENCH_")


def _is_nested(annotation: Any) -> bool:
    return any(
        isinstance(a, type) and issubclass(a, BaseModel)
        for a in getattr(annotation, "__args__", (annotation,))
    )


def unknown_variables(
    model: type[BaseModel], environ: Mapping[str, str] | None = None, prefix: str = "TESSERA_"
) -> list[str]:
    """The ``prefix`` variables in ``environ`` (default: the process environment) that name no setting.

    pydantic-settings silently ignores an environment variable that matches no top-level field (its
    ``extra="forbid"`` covers only nested models and env files), so a typo such as ``TESSERA_STATE_DIRS``
    would leave the default in force. Only the top-level name is checked here; nested names
    (``TESSERA_ROUNDS__MAX_ROUNDZ``) are rejected by the nested models themselves.
    """
    fields = model.model_fields
    unknown = []
    for name in os.environ if environ is None else environ:
        upper = name.upper()  # pydantic-settings matches names case-insensitively
        if (
            not upper.startswith(prefix)
            or upper in NON_SETTINGS_VARIABLES
            or upper.startswith(NON_SETTINGS_PREFIXES)
        ):
            continue
        head, nested, _ = upper[len(prefix) :].partition("__")
        field = fields.get(head.lower())
        if field is None or (nested and not _is_nested(field.annotation)):
            unknown.append(name)
    return sorted(unknown)


def reject_unknown_variables(
    model: type[BaseModel], environ: Mapping[str, str] | None = None, prefix: str = "TESSERA_"
) -> None:
    """Raise ConfigurationError naming every ``prefix`` variable that is not a setting of ``model``.

    Fix: correct the variable's name (``tessera settings curator|participant`` lists them all), or remove
    it if it belongs to the other service.
    """
    unknown = unknown_variables(model, environ, prefix)
    if unknown:
        raise ConfigurationError(
            "invalid configuration:\n  "
            + "\n  ".join(
                f"{name}: not a setting of this service (see `tessera settings`)" for name in unknown
            )
        )


def serve_until_stopped(stop: threading.Event, beat: Callable[[], None]) -> None:
    """Block until ``stop`` is set (by SIGTERM/SIGINT through :func:`install_stop_handlers`), still beating
    so the liveness probe keeps passing."""
    beat()
    while not stop.wait(10):
        beat()


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT end the service cleanly: set ``stop`` and raise SystemExit in the main thread.

    As PID 1 in a container the process would otherwise ignore SIGTERM and be killed after the grace period.
    The curator's state is saved after every round and a participant's accountant before every training,
    so leaving mid-round loses nothing: the round in flight is restarted with fresh keys.
    """

    def handler(signum: int, _frame: object) -> None:
        first = not stop.is_set()
        stop.set()
        if first:
            structlog.get_logger("tessera").info("stop_requested", signal=signal.Signals(signum).name)
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(cls: type[SettingsT], env_file: Path | None = None, **overrides: Any) -> SettingsT:
    """A service's settings from the environment (and ``env_file``); ConfigurationError names every bad
    variable, including ``TESSERA_*`` variables that are no setting of this service."""
    if env_file is not None and not env_file.is_file():
        raise ConfigurationError(f"env file {env_file} does not exist")
    reject_unknown_variables(cls)
    try:
        return cls(_env_file=env_file, **overrides)
    except ValidationError as exc:
        raise settings_error(exc) from exc


def start_health_server(settings: HealthSettings, registry: Any) -> Any:
    """The service's health and metrics server, started; None when disabled."""
    if not settings.enabled:
        return None
    from tessera.observability import HealthServer

    server = HealthServer(settings.host, settings.port, registry)
    server.start()
    structlog.get_logger("tessera").info("health_server_started", port=server.port)
    return server


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
    "install_stop_handlers",
    "load_settings",
    "reject_unknown_variables",
    "serve_until_stopped",
    "settings_error",
    "start_health_server",
    "unknown_variables",
]
