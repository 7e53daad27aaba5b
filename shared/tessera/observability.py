"""Health probes and Prometheus metrics for the curator and participant services.

One :class:`HealthServer` per service process serves three read-only endpoints on its own daemon thread:

- ``GET /healthz`` (liveness): 200 while the service's main loop calls :meth:`HealthServer.beat` at least
  once every ``liveness_timeout`` seconds, else 503. Kubernetes restarts a pod whose liveness probe fails,
  so the timeout must exceed the longest time the loop can legitimately go without a beat. Beat from the
  main loop itself, which keeps turning while local training runs on a worker thread (PITFALLS.md,
  "Timeouts tied to training time"): a loop blocked for longer than the timeout is what this probe catches.
- ``GET /readyz`` (readiness): 200 once the service called ``set_ready(True)`` (connected to the broker,
  state loaded), else 503 with the reason given to ``set_ready(False, reason)``.
- ``GET /metrics``: the Prometheus text exposition of the service's own :class:`CollectorRegistry`
  (OpenMetrics when the scraper's ``Accept`` header asks for it).

Every other path answers 404 and every other method 405. A handler never lets an exception out: a failure
(e.g. a collector that raises while ``/metrics`` is rendered) answers 500, is logged, and the server goes on.

:class:`CuratorMetrics` and :class:`ParticipantMetrics` are the services' metrics sinks (the events of
:class:`CuratorMetricsSink` and :class:`ParticipantMetricsSink`, whose no-op base classes are what a service
uses when it exports nothing), registered on a registry the caller creates (``CollectorRegistry()``, one per service instance — never the process-global default
registry), so tests and in-process federations can run several services side by side.

Label values must come from a small fixed vocabulary: ``phase`` is a secure-aggregation phase name
(``"advertise"``, ``"share"``...), ``reason`` a short reason *code* such as ``"bad_signature"`` or
``"wrong_round"``. Never pass free text such as ``ProtocolError.reason`` (it embeds numbers: every distinct
string is a new time series) and never anything that identifies one organisation's data.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, cast
from urllib.parse import urlsplit

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from tessera.errors import ConfigurationError, LocalUsageError

__all__ = [
    "CuratorMetrics",
    "CuratorMetricsSink",
    "HealthServer",
    "ParticipantMetrics",
    "ParticipantMetricsSink",
]

_log = structlog.get_logger(__name__)

_JSON: Final = "application/json"
# How often the serving thread checks for shutdown; bounds how long close() blocks.
_POLL_INTERVAL: Final = 0.1
# A client that sends nothing for this long is dropped, so a stuck probe cannot hold a thread forever.
_REQUEST_TIMEOUT: Final = 10.0


class HealthServer:
    """Liveness, readiness and metrics over HTTP, on a daemon thread.

    ``port=0`` binds a free port; read the bound one from :attr:`port` after :meth:`start`. Construction
    has no side effects; :meth:`start` binds (raising ``OSError`` if the address is taken — pick another
    port or stop the other process) and :meth:`close` stops serving and frees the port. Use it as a context
    manager to get both.

    Thread-safe: :meth:`beat` and :meth:`set_ready` may be called from any thread while probes are served.
    ``clock`` (monotonic seconds) is injectable for tests; the liveness window starts at :meth:`start`.

    Raises :class:`~tessera.errors.ConfigurationError` for a port outside 0–65535 or a non-positive
    ``liveness_timeout``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        liveness_timeout: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigurationError(f"health port {port} is outside 0-65535 (0 picks a free port)")
        if not liveness_timeout > 0:
            raise ConfigurationError(f"liveness_timeout must be positive seconds, got {liveness_timeout}")
        self.host = host
        self.registry = registry
        self.liveness_timeout = float(liveness_timeout)
        self._requested_port = port
        self._clock = clock
        self._lock = threading.Lock()
        self._last_beat = clock()
        self._ready = False
        self._not_ready_reason = "starting"
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the free one chosen when constructed with ``port=0``). Only after start()."""
        if self._server is None:
            raise LocalUsageError("HealthServer.port is known only between start() and close()")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve on a daemon thread. Starts the liveness window. Raises OSError if binding fails."""
        if self._server is not None:
            raise LocalUsageError("HealthServer.start() called twice")
        server_class = _Server6 if ":" in self.host else _Server
        server = server_class((self.host, self._requested_port), _Handler)
        server.health = self
        with self._lock:
            self._last_beat = self._clock()
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"tessera-health-{server.server_address[1]}",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        _log.info("health_server_started", host=self.host, port=self.port)

    def close(self) -> None:
        """Stop serving and free the port. Safe to call more than once, or without start()."""
        server, thread = self._server, self._thread
        if server is None:
            return
        port = server.server_address[1]
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)
        self._server = self._thread = None
        _log.info("health_server_stopped", port=port)

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- state the service reports ---------------------------------------------------------------------

    def beat(self) -> None:
        """Record that the main loop is alive; call it on every loop iteration."""
        now = self._clock()
        with self._lock:
            self._last_beat = now

    def set_ready(self, ready: bool, reason: str = "starting") -> None:
        """Mark the service ready (connected, state loaded) or not ready, with a reason shown by /readyz."""
        with self._lock:
            changed = ready != self._ready or (not ready and reason != self._not_ready_reason)
            self._ready = ready
            self._not_ready_reason = reason
        if changed:
            if ready:
                _log.info("service_ready")
            else:
                _log.info("service_not_ready", reason=reason)

    # -- probe answers (used by the handler; pure functions of the state above) ------------------------

    def liveness(self) -> tuple[HTTPStatus, dict[str, Any]]:
        """The /healthz answer: status code and JSON body."""
        with self._lock:
            silent_for = self._clock() - self._last_beat
        if silent_for > self.liveness_timeout:
            return HTTPStatus.SERVICE_UNAVAILABLE, {
                "status": "unhealthy",
                "reason": (
                    f"main loop has not reported for {silent_for:.1f} s "
                    f"(liveness timeout {self.liveness_timeout:g} s)"
                ),
                "seconds_since_beat": round(silent_for, 3),
            }
        return HTTPStatus.OK, {"status": "ok"}

    def readiness(self) -> tuple[HTTPStatus, dict[str, Any]]:
        """The /readyz answer: status code and JSON body."""
        with self._lock:
            ready, reason = self._ready, self._not_ready_reason
        if ready:
            return HTTPStatus.OK, {"status": "ready"}
        return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "not_ready", "reason": reason}


def _json(status: HTTPStatus, body: dict[str, Any]) -> tuple[HTTPStatus, str, bytes]:
    return status, _JSON, json.dumps(body).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    health: HealthServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Replaces socketserver's traceback-to-stderr; reached only if the handler's own guard failed.
        _log.exception("health_request_failed", client=str(client_address))


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "tessera-health"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = _REQUEST_TIMEOUT

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        try:
            status, content_type, body = self._answer(path)
        except Exception as exc:
            _log.exception("health_handler_failed", path=path, error=type(exc).__name__)
            status, content_type, body = _json(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"status": "error", "reason": type(exc).__name__}
            )
        self._send(status, content_type, body)

    def _answer(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        health = cast(_Server, self.server).health
        if path == "/healthz":
            return _json(*health.liveness())
        if path == "/readyz":
            return _json(*health.readiness())
        if path == "/metrics":
            # The library's own negotiation: the classic text format (generate_latest, version 0.0.4) unless
            # the scraper asks for OpenMetrics, as Prometheus does; the content type always matches the body.
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            return HTTPStatus.OK, content_type, encoder(health.registry)
        return _json(HTTPStatus.NOT_FOUND, {"status": "not_found", "reason": f"no route {path}"})

    def _method_not_allowed(self) -> None:
        reason = f"{self.command} is not supported; use GET"
        # Any request body is left unread, so this connection cannot carry another request.
        self.close_connection = True
        self._send(
            *_json(HTTPStatus.METHOD_NOT_ALLOWED, {"status": "method_not_allowed", "reason": reason}),
            extra_headers={"Allow": "GET", "Connection": "close"},
        )

    # Every method other than GET answers 405 (http.server would say 501 for the ones it has no do_X for).
    def __getattr__(self, name: str) -> Callable[[], None]:
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _send(
        self, status: HTTPStatus, content_type: str, body: bytes, extra_headers: dict[str, str] | None = None
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (extra_headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer carries headers only (RFC 9110, 9.3.2)
                self.wfile.write(body)
        except OSError as exc:  # the prober hung up or timed out; nothing left to tell it
            self.close_connection = True
            _log.debug("probe_client_gone", path=urlsplit(self.path).path, error=type(exc).__name__)
            return
        _log.debug("probe_served", method=self.command, path=urlsplit(self.path).path, status=int(status))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _send logs each answer at debug level instead

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("health_http", message=format % args, client=self.client_address[0])

    def log_error(self, format: str, *args: Any) -> None:
        _log.warning("health_http_error", message=format % args, client=self.client_address[0])


# -- metrics -------------------------------------------------------------------------------------------

# Rounds include local training, so they run from seconds (tests, small tabular models) to an hour.
_ROUND_BUCKETS: Final = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
# Phases are bounded by the per-phase deadlines (tens of seconds by default).
_PHASE_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class CuratorMetricsSink:
    """What the curator reports to monitoring, as events. This base class records nothing: it is the null
    object a curator uses when no metrics are exported (tests, in-process federations, benchmarks)."""

    def bytes_sent(self, count: int) -> None:
        """``count`` message body bytes were published."""

    def bytes_received(self, count: int) -> None:
        """``count`` message body bytes were received."""

    def message_rejected(self, reason: str) -> None:
        """A message was dropped; ``reason`` is a code from a fixed vocabulary (``invalid``, ``stale``)."""

    def phase_closed(self, phase: str, *, seconds: float, expected: int, answered: int) -> None:
        """A secure-aggregation phase closed after ``seconds`` with ``answered`` of ``expected`` participants."""

    def round_completed(self, round_number: int, *, accuracy: float | None, seconds: float) -> None:
        """Round ``round_number`` completed; ``accuracy`` is its secure-averaged accuracy (None: not evaluated)."""


class ParticipantMetricsSink:
    """What a participant reports to its organisation's monitoring, as events; this base records nothing
    (the null object). None of it is ever sent to the curator."""

    def bytes_sent(self, count: int) -> None:
        """``count`` message body bytes were published."""

    def bytes_received(self, count: int) -> None:
        """``count`` message body bytes were received."""

    def message_rejected(self, reason: str) -> None:
        """A message was dropped; ``reason`` is a code from a fixed vocabulary."""

    def trained(self, seconds: float) -> None:
        """Local training of one round took ``seconds``."""

    def privacy_spent(self, epsilon: float, *, target: float) -> None:
        """ε spent so far, and the target it may reach."""

    def aggregation_completed(self) -> None:
        """A secure aggregation this participant took part in completed."""


class _CommonMetrics:
    """The metrics both services export, under the same names (the scrape job tells them apart)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rounds_completed: Counter = Counter(
            "tessera_rounds_completed", "Federation rounds this service completed.", registry=registry
        )
        self.round_duration: Histogram = Histogram(
            "tessera_round_duration_seconds",
            "Wall-clock duration of a completed round.",
            buckets=_ROUND_BUCKETS,
            registry=registry,
        )
        self.phase_duration: Histogram = Histogram(
            "tessera_phase_duration_seconds",
            "Wall-clock duration of one secure-aggregation phase.",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=registry,
        )
        self.bytes_sent_total: Counter = Counter(
            "tessera_bytes_sent", "Message body bytes published to the broker.", registry=registry
        )
        self.bytes_received_total: Counter = Counter(
            "tessera_bytes_received", "Message body bytes received from the broker.", registry=registry
        )
        self.rejected_messages: Counter = Counter(
            "tessera_rejected_messages",
            "Messages dropped by validation, by reason code (a fixed vocabulary, never free text).",
            ["reason"],
            registry=registry,
        )

    def bytes_sent(self, count: int) -> None:
        self.bytes_sent_total.inc(count)

    def bytes_received(self, count: int) -> None:
        self.bytes_received_total.inc(count)

    def message_rejected(self, reason: str) -> None:
        self.rejected_messages.labels(reason=reason).inc()


class CuratorMetrics(_CommonMetrics, CuratorMetricsSink):
    """The curator's metrics, registered on ``registry`` (a fresh ``CollectorRegistry`` per curator).

    Raises ``ValueError`` (from prometheus_client) if the registry already holds these names: give each
    service instance its own registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.participants: Gauge = Gauge(
            "tessera_round_participants",
            "Participants that took part in each secure-aggregation phase of the last round.",
            ["phase"],
            registry=registry,
        )
        self.dropouts: Counter = Counter(
            "tessera_dropouts",
            "Participants that dropped out, by the phase in which they went missing.",
            ["phase"],
            registry=registry,
        )
        self.current_round: Gauge = Gauge(
            "tessera_current_round", "The round the curator is running (or last ran).", registry=registry
        )
        self.last_accuracy: Gauge = Gauge(
            "tessera_last_accuracy",
            "Secure-averaged accuracy (sum of correct / sum of total) of the last evaluated global model.",
            registry=registry,
        )

    def phase_closed(self, phase: str, *, seconds: float, expected: int, answered: int) -> None:
        self.phase_duration.labels(phase=phase).observe(seconds)
        self.participants.labels(phase=phase).set(answered)
        if expected > answered:
            self.dropouts.labels(phase=phase).inc(expected - answered)

    def round_completed(self, round_number: int, *, accuracy: float | None, seconds: float) -> None:
        self.rounds_completed.inc()
        self.current_round.set(round_number)
        if accuracy is not None:
            self.last_accuracy.set(accuracy)
        self.round_duration.observe(seconds)


class ParticipantMetrics(_CommonMetrics, ParticipantMetricsSink):
    """One participant's metrics, registered on ``registry`` (a fresh ``CollectorRegistry`` per participant).

    These stay inside the organisation's own monitoring; none of them is sent to the curator. Raises
    ``ValueError`` (from prometheus_client) if the registry already holds these names.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.training_duration: Histogram = Histogram(
            "tessera_training_duration_seconds",
            "Wall-clock duration of local DP-SGD training in one round.",
            buckets=_ROUND_BUCKETS,
            registry=registry,
        )
        self.epsilon_spent: Gauge = Gauge(
            "tessera_privacy_epsilon_spent",
            "Cumulative privacy loss ε spent by this participant across rounds and restarts.",
            registry=registry,
        )
        self.epsilon_budget_remaining: Gauge = Gauge(
            "tessera_privacy_epsilon_remaining",
            "Privacy budget ε this participant has left before it stops training.",
            registry=registry,
        )

    def trained(self, seconds: float) -> None:
        self.training_duration.observe(seconds)

    def privacy_spent(self, epsilon: float, *, target: float) -> None:
        self.epsilon_spent.set(epsilon)
        self.epsilon_budget_remaining.set(max(0.0, target - epsilon))

    def aggregation_completed(self) -> None:
        self.rounds_completed.inc()
