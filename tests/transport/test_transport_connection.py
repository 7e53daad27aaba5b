"""Connection parameters from URLs, TLS, and the reconnect backoff (no broker)."""

from __future__ import annotations

import random
import ssl

import pika
import pytest
from pydantic import SecretStr
from tessera.errors import ConfigurationError
from tessera.transport import ConnectionSettings, ReconnectPolicy, TlsSettings, connection_parameters
from tessera.transport.connection import redact_url


def params(url: str, **kwargs) -> pika.ConnectionParameters:
    vhost = kwargs.pop("virtual_host", None)
    return connection_parameters(ConnectionSettings(url=SecretStr(url), **kwargs), virtual_host=vhost)


def test_amqp_url():
    p = params("amqp://acme:p%40ss@broker.example:5673/tessera-f1", heartbeat=7, blocked_connection_timeout=9)
    assert (p.host, p.port, p.virtual_host) == ("broker.example", 5673, "tessera-f1")
    assert p.credentials.username == "acme" and p.credentials.password == "p@ss"
    assert p.heartbeat == 7 and p.blocked_connection_timeout == 9 and p.ssl_options is None
    assert p.connection_attempts == 1


def test_vhost_from_caller_and_mismatch():
    assert params("amqp://u:p@h/", virtual_host="tessera-x").virtual_host == "tessera-x"
    assert params("amqp://u:p@h", virtual_host="tessera-x").port == 5672
    with pytest.raises(ConfigurationError, match="vhost"):
        params("amqp://u:p@h/other", virtual_host="tessera-x")


def test_credentials_outside_the_url_take_precedence():
    p = params("amqp://h/", username="acme", password=SecretStr("s3cret"))
    assert p.credentials.username == "acme" and p.credentials.password == "s3cret"
    with pytest.raises(ConfigurationError, match="credentials"):
        params("amqp://h/")


@pytest.mark.parametrize(
    "url", ["http://u:p@h/", "amqp://u:p@/", "amqps://u:p@h/?ssl_options=x", "amqp://u:p@h:notaport/"]
)
def test_bad_urls(url):
    with pytest.raises(ConfigurationError):
        params(url)


def test_amqps_always_verifies(tmp_path):
    p = params("amqps://u:p@broker.example/")
    assert p.port == 5671
    context = p.ssl_options.context
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert p.ssl_options.server_hostname == "broker.example"
    p = params("amqps://u:p@10.0.0.1/", tls=TlsSettings(server_name="broker.internal"))
    assert p.ssl_options.server_hostname == "broker.internal"
    with pytest.raises(ConfigurationError, match="TLS files"):
        params("amqps://u:p@h/", tls=TlsSettings(ca_file=tmp_path / "missing.pem"))
    with pytest.raises(ConfigurationError, match="amqps"):
        params("amqp://u:p@h/", tls=TlsSettings(ca_file=tmp_path / "ca.pem"))


def test_redaction():
    assert redact_url("amqp://acme:secret@h:5672/v") == "amqp://acme:***@h:5672/v"
    assert redact_url("amqp://h/") == "amqp://h/"
    assert "secret" not in repr(ConnectionSettings(url=SecretStr("amqp://a:secret@h/")))


def test_backoff_is_exponential_jittered_and_bounded():
    policy = ReconnectPolicy(initial_delay=0.5, max_delay=8, multiplier=2)
    rng = random.Random(1)
    for attempt, cap in [(0, 0.5), (1, 1), (2, 2), (3, 4), (4, 8), (10, 8), (10_000, 8)]:
        delays = [policy.delay(attempt, rng) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 1


def test_addresses_follow_the_url_broker_in_turn_with_its_credentials_and_vhost():
    from tessera.transport.connection import connection_parameters_list

    settings = ConnectionSettings(
        url=SecretStr("amqp://acme:pw@node-1:5672/"),
        addresses="node-2:5673, node-1:5672,[::1]:5674",  # one string, as from an environment variable
        heartbeat=7,
    )
    assert settings.addresses == ("node-2:5673", "node-1:5672", "[::1]:5674")
    listed = connection_parameters_list(settings, virtual_host="tessera-f1", connection_name="n")
    assert [(p.host, p.port) for p in listed] == [("node-1", 5672), ("node-2", 5673), ("::1", 5674)]
    for p in listed:
        assert (p.virtual_host, p.credentials.username, p.credentials.password) == (
            "tessera-f1",
            "acme",
            "pw",
        )
        assert p.heartbeat == 7 and p.connection_attempts == 1
        assert p.client_properties == {"connection_name": "n"}


def test_tls_addresses_are_checked_against_their_own_names_unless_one_is_set():
    from tessera.transport.connection import connection_parameters_list

    def names(**tls) -> list[str]:
        settings = ConnectionSettings(
            url=SecretStr("amqps://u:p@node-1/"), addresses=("node-2:5671",), tls=TlsSettings(**tls)
        )
        return [p.ssl_options.server_hostname for p in connection_parameters_list(settings)]

    assert names() == ["node-1", "node-2"]
    assert names(server_name="broker.internal") == ["broker.internal", "broker.internal"]


@pytest.mark.parametrize(
    "bad", ["node-2", "node-2:", ":5672", "node-2:0", "node-2:70000", "u@node:1", "a b:1"]
)
def test_bad_addresses_are_refused(bad):
    with pytest.raises(ValueError, match="host:port"):
        ConnectionSettings(url=SecretStr("amqp://u:p@h/"), addresses=(bad,))
