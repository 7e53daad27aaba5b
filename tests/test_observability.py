"""Health server and metrics: real HTTP requests against a server bound to a free port."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector
from structlog.testing import capture_logs
from tessera.errors import ConfigurationError, LocalUsageError
from tessera.observability import CuratorMetrics, HealthServer, ParticipantMetrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(
    server: HealthServer, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{path}", method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def get_json(server: HealthServer, path: str) -> tuple[int, Any]:
    status, headers, body = request(server, path)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(registry: CollectorRegistry, clock: FakeClock) -> Iterator[HealthServer]:
    with HealthServer("127.0.0.1", 0, registry, liveness_timeout=5.0, clock=clock) as health:
        yield health


# -- liveness ------------------------------------------------------------------------------------------


def test_healthz_ok_while_beating_and_503_after_timeout(server: HealthServer, clock: FakeClock) -> None:
    assert get_json(server, "/healthz") == (200, {"status": "ok"})
    clock.now += 4.0
    server.beat()
    clock.now += 4.0
    assert get_json(server, "/healthz") == (200, {"status": "ok"})
    clock.now += 1.5
    status, body = get_json(server, "/healthz")
    assert status == 503
    assert body["status"] == "unhealthy"
    assert "5 s" in body["reason"]
    assert body["seconds_since_beat"] == pytest.approx(5.5)
    server.beat()
    assert get_json(server, "/healthz") == (200, {"status": "ok"})


def test_healthz_with_real_clock_and_tiny_timeout(registry: CollectorRegistry) -> None:
    with HealthServer("127.0.0.1", 0, registry, liveness_timeout=0.25) as health:
        health.beat()
        assert get_json(health, "/healthz")[0] == 200
        time.sleep(0.35)
        assert get_json(health, "/healthz")[0] == 503
        health.beat()
        assert get_json(health, "/healthz")[0] == 200


# -- readiness -----------------------------------------------------------------------------------------


def test_readyz_starts_not_ready_and_toggles_with_reasons(server: HealthServer) -> None:
    assert get_json(server, "/readyz") == (503, {"status": "not_ready", "reason": "starting"})
    server.set_ready(True)
    assert get_json(server, "/readyz") == (200, {"status": "ready"})
    server.set_ready(False, "broker connection lost")
    assert get_json(server, "/readyz") == (503, {"status": "not_ready", "reason": "broker connection lost"})
    server.set_ready(True)
    assert get_json(server, "/readyz") == (200, {"status": "ready"})
    server.set_ready(False)
    assert get_json(server, "/readyz") == (503, {"status": "not_ready", "reason": "starting"})


def test_readiness_and_liveness_are_independent(server: HealthServer, clock: FakeClock) -> None:
    server.set_ready(True)
    clock.now += 60.0
    assert get_json(server, "/healthz")[0] == 503
    assert get_json(server, "/readyz")[0] == 200


def test_query_string_is_ignored(server: HealthServer) -> None:
    assert get_json(server, "/healthz?verbose=1") == (200, {"status": "ok"})


# -- metrics -------------------------------------------------------------------------------------------


def test_metrics_exposes_curator_metrics_with_values(
    server: HealthServer, registry: CollectorRegistry
) -> None:
    metrics = CuratorMetrics(registry)
    metrics.rounds_completed.inc()
    metrics.rounds_completed.inc()
    metrics.round_duration.observe(12.5)
    metrics.phase_duration.labels(phase="advertise").observe(0.3)
    metrics.participants.labels(phase="unmask").set(7)
    metrics.dropouts.labels(phase="masked_input").inc(2)
    metrics.bytes_sent(1024)
    metrics.bytes_received(2048)
    metrics.rejected_messages.labels(reason="bad_signature").inc()
    metrics.current_round.set(3)
    metrics.last_accuracy.set(0.875)

    status, headers, raw = request(server, "/metrics")
    assert status == 200
    # No Accept header: the classic text format, labelled as such (not as the newer 1.0.0 format).
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = raw.decode()
    for line in (
        "tessera_rounds_completed_total 2.0",
        "tessera_round_duration_seconds_count 1.0",
        "tessera_round_duration_seconds_sum 12.5",
        'tessera_phase_duration_seconds_count{phase="advertise"} 1.0',
        'tessera_round_participants{phase="unmask"} 7.0',
        'tessera_dropouts_total{phase="masked_input"} 2.0',
        "tessera_bytes_sent_total 1024.0",
        "tessera_bytes_received_total 2048.0",
        'tessera_rejected_messages_total{reason="bad_signature"} 1.0',
        "tessera_current_round 3.0",
        "tessera_last_accuracy 0.875",
    ):
        assert line in text.splitlines(), line


def test_metrics_exposes_participant_metrics_with_values(
    server: HealthServer, registry: CollectorRegistry
) -> None:
    metrics = ParticipantMetrics(registry)
    metrics.rounds_completed.inc()
    metrics.round_duration.observe(3.0)
    metrics.phase_duration.labels(phase="share").observe(0.2)
    metrics.bytes_sent(10)
    metrics.bytes_received(20)
    metrics.rejected_messages.labels(reason="wrong_round").inc()
    metrics.training_duration.observe(2.0)
    metrics.epsilon_spent.set(1.25)
    metrics.epsilon_budget_remaining.set(6.75)

    text = request(server, "/metrics")[2].decode().splitlines()
    for line in (
        "tessera_rounds_completed_total 1.0",
        "tessera_round_duration_seconds_sum 3.0",
        'tessera_phase_duration_seconds_count{phase="share"} 1.0',
        "tessera_bytes_sent_total 10.0",
        "tessera_bytes_received_total 20.0",
        'tessera_rejected_messages_total{reason="wrong_round"} 1.0',
        "tessera_training_duration_seconds_count 1.0",
        "tessera_privacy_epsilon_spent 1.25",
        "tessera_privacy_epsilon_remaining 6.75",
    ):
        assert line in text, line


def test_metrics_negotiates_openmetrics(server: HealthServer, registry: CollectorRegistry) -> None:
    CuratorMetrics(registry).current_round.set(4)
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    status, headers, raw = request(server, "/metrics", headers={"Accept": accept})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    text = raw.decode()
    assert "tessera_current_round 4.0" in text.splitlines()
    assert text.endswith("# EOF\n")


def test_each_service_instance_gets_its_own_registry() -> None:
    # Two curators and two participants in one process (the in-process federation) do not collide ...
    registries = [CollectorRegistry() for _ in range(2)]
    curators = [CuratorMetrics(r) for r in registries]
    for _ in range(2):
        ParticipantMetrics(CollectorRegistry())
    curators[0].rounds_completed.inc()
    assert registries[0].get_sample_value("tessera_rounds_completed_total") == 1.0
    assert registries[1].get_sample_value("tessera_rounds_completed_total") == 0.0
    # ... while reusing one registry is refused loudly rather than silently sharing counters.
    shared = CollectorRegistry()
    CuratorMetrics(shared)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        CuratorMetrics(shared)


# -- errors --------------------------------------------------------------------------------------------


def test_unknown_path_is_404(server: HealthServer) -> None:
    status, body = get_json(server, "/admin")
    assert status == 404
    assert body["status"] == "not_found"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW"])
def test_non_get_is_405(server: HealthServer, method: str) -> None:
    status, headers, body = request(server, "/healthz", method=method)
    assert status == 405
    assert headers["Allow"] == "GET"
    if method != "HEAD":
        assert json.loads(body)["status"] == "method_not_allowed"
    else:
        assert body == b""


class ExplodingCollector(Collector):
    def collect(self) -> Iterator[Any]:
        raise RuntimeError("collector broke")


def test_handler_exception_answers_500_and_server_keeps_serving(
    server: HealthServer, registry: CollectorRegistry
) -> None:
    exploding = ExplodingCollector()
    registry.register(exploding)
    with capture_logs() as logs:
        status, body = get_json(server, "/metrics")
    assert status == 500
    assert body == {"status": "error", "reason": "RuntimeError"}
    assert any(e["event"] == "health_handler_failed" and e["log_level"] == "error" for e in logs)
    # The server survived: other endpoints answer, and /metrics recovers once the collector is gone.
    assert get_json(server, "/healthz") == (200, {"status": "ok"})
    registry.unregister(exploding)
    assert request(server, "/metrics")[0] == 200


def test_probes_are_logged_at_debug_only(server: HealthServer) -> None:
    with capture_logs() as logs:
        for _ in range(3):
            get_json(server, "/healthz")
    probe_logs = [e for e in logs if e["event"] in {"probe_served", "health_http"}]
    assert probe_logs
    assert {e["log_level"] for e in probe_logs} == {"debug"}


# -- lifecycle and configuration -----------------------------------------------------------------------


def test_port_zero_picks_a_free_port_and_close_frees_it(registry: CollectorRegistry) -> None:
    health = HealthServer("127.0.0.1", 0, registry)
    with pytest.raises(LocalUsageError):
        _ = health.port
    health.start()
    port = health.port
    assert port > 0
    assert request(health, "/healthz")[0] == 200
    health.close()
    health.close()  # idempotent
    with pytest.raises(LocalUsageError):
        _ = health.port
    # The same port can be bound again right away.
    with HealthServer("127.0.0.1", port, registry) as again:
        assert again.port == port
        assert request(again, "/readyz")[0] == 503


def test_start_twice_is_a_usage_error(server: HealthServer) -> None:
    with pytest.raises(LocalUsageError):
        server.start()


@pytest.mark.parametrize(
    ("port", "timeout"),
    [(-1, 120.0), (65536, 120.0), (0, 0.0), (0, -1.0), (0, float("nan"))],
)
def test_bad_configuration_is_refused(registry: CollectorRegistry, port: int, timeout: float) -> None:
    with pytest.raises(ConfigurationError):
        HealthServer("127.0.0.1", port, registry, liveness_timeout=timeout)
