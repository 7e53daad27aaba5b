"""Connection settings, pika connection parameters from a URL, and the reconnect backoff.

- ``amqp://user:password@host:5672/vhost`` or ``amqps://…:5671/…``. The URL is parsed here rather than by
  ``pika.URLParameters`` so that no query option (``ssl_options``…) can switch certificate checks off:
  ``amqps`` always verifies the broker's certificate and host name, against ``tls.ca_file`` or the system
  trust store, and presents a client certificate when ``tls.cert_file`` is set.
- Credentials may also be given apart from the URL (``username``/``password``, e.g. from Kubernetes Secrets
  mounted as files); they take precedence over the URL's.
- ``addresses`` (``host:port``, e.g. the nodes of a RabbitMQ cluster) are tried in turn after the URL's own
  host and port, on the first connect and on every reconnect (pika takes a sequence of parameters and uses
  the first that answers); everything else (credentials, vhost, TLS) is the URL's. With TLS each address is
  checked against its own host name unless ``tls.server_name`` is set.
- Heartbeat and blocked-connection timeouts are explicit: the heartbeat detects a dead peer (the broker
  closes a connection after about two missed heartbeats); the blocked timeout closes a connection that a
  broker resource alarm has blocked for too long, which then goes through the normal reconnect.
"""

from __future__ import annotations

import random
import ssl
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pika
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from tessera.errors import ConfigurationError

MIB = 1024 * 1024
BROKER_MAX_MESSAGE_BYTES = 128 * MIB
"""RabbitMQ's default ``max_message_size``."""


class TlsSettings(BaseModel):
    """TLS for ``amqps``; the broker's certificate is always verified."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: Path | None = Field(
        default=None, description="CA bundle for the broker's certificate (default: system)"
    )
    cert_file: Path | None = Field(default=None, description="client certificate (PEM), for mutual TLS")
    key_file: Path | None = Field(
        default=None, description="client private key (PEM); default: inside cert_file"
    )
    server_name: str | None = Field(
        default=None, description="name to check the certificate against (default: host)"
    )


class ReconnectPolicy(BaseModel):
    """Exponential backoff with jitter between connection attempts: attempt ``n`` (0-based) waits a uniform
    random time in ``[cap/2, cap]`` with ``cap = min(max_delay, initial_delay * multiplier**n)``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    initial_delay: float = Field(default=0.5, gt=0, description="seconds before the first retry")
    max_delay: float = Field(default=30.0, gt=0, description="upper bound of any single wait, seconds")
    multiplier: float = Field(default=2.0, ge=1.0)
    max_attempts: int | None = Field(
        default=None, ge=1, description="give up after this many failures in a row"
    )

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        cap = min(self.max_delay, self.initial_delay * self.multiplier ** min(attempt, 64))
        return (rng or random).uniform(cap / 2, cap)


class ConnectionSettings(BaseModel):
    """Where and how to connect. ``url`` may hold the credentials; it is a secret because of that."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: SecretStr = Field(description="amqp://user:pass@host:5672/vhost or amqps://…")
    username: str | None = Field(default=None, description="overrides the URL's user")
    password: SecretStr | None = Field(default=None, description="overrides the URL's password")
    tls: TlsSettings = TlsSettings()
    heartbeat: int = Field(default=30, ge=1, description="AMQP heartbeat interval, seconds")
    blocked_connection_timeout: float = Field(
        default=60.0, gt=0, description="close a blocked connection after, s"
    )
    socket_timeout: float = Field(default=10.0, gt=0)
    stack_timeout: float = Field(default=30.0, gt=0, description="bound on the whole connection handshake, s")
    reconnect: ReconnectPolicy = ReconnectPolicy()
    addresses: tuple[str, ...] = Field(
        default=(),
        description="more brokers (host:port, e.g. a cluster's other nodes) tried in turn after the URL's",
    )

    @field_validator("addresses", mode="before")
    @classmethod
    def _split_addresses(cls, value: object) -> object:
        # From an environment variable or a chart value: "host1:5672,host2:5672".
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            parse_address(address)
        return value


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) → (host, port); :class:`ValueError` if it is not one."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (
        not sep
        or not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or any(c in host for c in "/@ ")
    ):
        raise ValueError(f"invalid broker address {address!r}: expected host:port")
    return host, int(port)


def redact_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _tls_context(tls: TlsSettings) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(
            purpose=ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
        if tls.cert_file is not None:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load TLS files: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # create_default_context already sets these; asserting them keeps a future edit from weakening them.
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    return context


def connection_parameters(
    settings: ConnectionSettings, *, virtual_host: str | None = None, connection_name: str | None = None
) -> pika.ConnectionParameters:
    """Build pika parameters. ``virtual_host`` is the vhost the caller needs; if the URL names another one,
    that is a :class:`ConfigurationError` (a URL without a path means "whatever the caller needs")."""
    url = settings.url.get_secret_value()
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigurationError(f"unsupported URL scheme {parts.scheme!r}: use amqp:// or amqps://")
    if not parts.hostname:
        raise ConfigurationError("the broker URL has no host")
    if parts.query or parts.fragment:
        raise ConfigurationError("query options in the broker URL are not supported; use the settings")
    tls = parts.scheme == "amqps"
    if not tls and settings.tls != TlsSettings():
        raise ConfigurationError("TLS files are configured but the URL is amqp://; use amqps://")
    try:
        port = parts.port or (5671 if tls else 5672)
    except ValueError as exc:
        raise ConfigurationError(f"invalid port in the broker URL: {exc}") from exc

    url_vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else None
    if virtual_host is not None and url_vhost is not None and url_vhost != virtual_host:
        raise ConfigurationError(f"the broker URL names vhost {url_vhost!r} but {virtual_host!r} is needed")
    vhost = virtual_host or url_vhost or "/"

    username = settings.username or (unquote(parts.username) if parts.username else None)
    password: str | None = None
    if settings.password is not None:
        password = settings.password.get_secret_value()
    elif parts.password is not None:
        password = unquote(parts.password)
    if not username or password is None:
        raise ConfigurationError("no broker credentials: put them in the URL or in username/password")

    ssl_options = None
    if tls:
        server_name = settings.tls.server_name or parts.hostname
        ssl_options = pika.SSLOptions(_tls_context(settings.tls), server_hostname=server_name)

    properties = {"connection_name": connection_name} if connection_name else None
    return pika.ConnectionParameters(
        host=parts.hostname,
        port=port,
        virtual_host=vhost,
        credentials=pika.PlainCredentials(username, password, erase_on_connect=False),
        ssl_options=ssl_options,
        heartbeat=settings.heartbeat,
        blocked_connection_timeout=settings.blocked_connection_timeout,
        socket_timeout=settings.socket_timeout,
        stack_timeout=settings.stack_timeout,
        # Retries are ours (backoff with jitter, logged), not pika's.
        connection_attempts=1,
        client_properties=properties,
    )


def connection_parameters_list(
    settings: ConnectionSettings, *, virtual_host: str | None = None, connection_name: str | None = None
) -> list[pika.ConnectionParameters]:
    """The URL's parameters, then the same for each of ``settings.addresses`` (duplicates once): the
    sequence a ``pika.BlockingConnection`` tries in turn."""
    first = connection_parameters(settings, virtual_host=virtual_host, connection_name=connection_name)
    result = [first]
    seen = {(first.host, first.port)}
    for address in settings.addresses:
        host, port = parse_address(address)
        if (host, port) in seen:
            continue
        seen.add((host, port))
        # The same URL (credentials, vhost, scheme) aimed at this address: built by the same code.
        parts = urlsplit(settings.url.get_secret_value())
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = ("[" + host + "]" if ":" in host else host) + f":{port}"
        url = parts._replace(netloc=f"{userinfo}@{netloc}" if userinfo else netloc).geturl()
        params = connection_parameters(
            settings.model_copy(update={"url": SecretStr(url)}),
            virtual_host=virtual_host,
            connection_name=connection_name,
        )
        result.append(params)
    return result


def parameters_username(parameters: pika.ConnectionParameters) -> str:
    credentials = parameters.credentials
    assert isinstance(credentials, pika.PlainCredentials)
    return str(credentials.username)


__all__ = [
    "BROKER_MAX_MESSAGE_BYTES",
    "MIB",
    "ConnectionSettings",
    "ReconnectPolicy",
    "TlsSettings",
    "connection_parameters",
    "connection_parameters_list",
    "parameters_username",
    "parse_address",
    "redact_url",
]
