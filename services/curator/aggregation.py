"""One secure aggregation driven over the curator's inbox: the sans-I/O :class:`CuratorSession` fed with
admitted messages and the clock, its output sent, each closed phase logged and measured.

During an aggregation a ``Leave`` is honoured and a late ``Ready`` is stale; anything else that is not a
participant's secure-aggregation message for this session is dropped with its reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from tessera import protocol
from tessera.envelope import secagg_envelopes
from tessera.errors import Misbehaviour, ProtocolError
from tessera.observability import CuratorMetricsSink
from tessera.roster import RosterFile
from tessera.secagg.curator import AggregationResult, CuratorSession, Outgoing
from tessera.secagg.messages import ParticipantMessage
from tessera.secagg.wire import WireLimits

from .attendance import Attendance
from .inbox import Arrival, CuratorInbox

log = structlog.get_logger("tessera.curator")

_PARTICIPANT_MESSAGES = ParticipantMessage.__args__


@dataclass
class AggregationOutcome:
    """Who answered each phase and how long it took; ``result`` is None when the aggregation aborted."""

    invited: tuple[str, ...]
    result: AggregationResult | None = None
    survivors: tuple[str, ...] = ()
    phases: dict[str, list[str]] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    abort_reason: str | None = None

    def silent(self) -> set[str]:
        """Those invited who did not answer the aggregation's last closed phase."""
        answered = list(self.phases.values())[-1] if self.phases else self.invited
        return set(self.invited) - set(answered)


class AggregationDriver:
    def __init__(
        self,
        *,
        federation: str,
        roster: RosterFile,
        inbox: CuratorInbox,
        attendance: Attendance,
        limits: WireLimits,
        metrics: CuratorMetricsSink,
        heartbeat: Callable[[], None],
        clock: Callable[[], float],
    ) -> None:
        self._federation = federation
        self._roster = roster
        self._inbox = inbox
        self._attendance = attendance
        self._limits = limits
        self._metrics = metrics
        self._heartbeat = heartbeat
        self._clock = clock

    def run(self, session: CuratorSession, invited: tuple[str, ...]) -> AggregationOutcome:
        outcome = AggregationOutcome(invited=invited)
        phase_started = self._clock()
        structlog.contextvars.bind_contextvars(phase=session.phase.value)
        self._send(session.start(self._clock()))
        while not session.finished:
            self._heartbeat()
            deadline = session.next_deadline or self._clock()
            arrival = self._inbox.next(timeout=min(1.0, max(0.0, deadline - self._clock())))
            if arrival is not None:
                self._send(self._receive(session, arrival))
            self._send(session.poll(self._clock()))
            if len(session.phase_log) > len(outcome.phases):
                phase_started = self._record_phases(outcome, session, phase_started)
                structlog.contextvars.bind_contextvars(phase=session.phase.value)
        if session.result is None:
            outcome.abort_reason = session.abort_reason
            log.warning("aggregation_aborted", reason=session.abort_reason)
            return outcome
        outcome.result = session.result
        outcome.survivors = self._names(session.result.survivors)
        for sender in self._names(session.result.bad_share_senders):
            self._attendance.offence(sender, "revealed a share that does not reconstruct")
        return outcome

    def _receive(self, session: CuratorSession, arrival: Arrival) -> list[Outgoing]:
        header = arrival.message.header
        if isinstance(header, protocol.Leave):
            self._attendance.leave(arrival.message.sender, reason=header.reason.value, detail=header.detail)
            self._inbox.done(arrival)
            return []
        if isinstance(header, protocol.Ready):  # late for its round: harmless
            self._inbox.stale(arrival)
            return []
        try:
            if not isinstance(header, protocol.SecAgg):
                raise ProtocolError(f"{type(header).__name__} is not expected during aggregation")
            message = arrival.message.secagg(self._limits)
            if not isinstance(message, _PARTICIPANT_MESSAGES):
                raise ProtocolError(f"{type(message).__name__} is a curator message")
            out = session.receive(self._roster.index_of(arrival.message.sender), message, self._clock())
        except Misbehaviour as exc:
            self._inbox.drop(arrival, exc.reason, stale=False)
            self._attendance.offence(arrival.message.sender, exc.reason)
            session.stop_waiting_for(self._roster.index_of(arrival.message.sender))
            return []
        except ProtocolError as exc:
            self._inbox.drop(arrival, exc.reason, stale=True)
            return []
        except Exception as exc:  # no message may end the curator: drop it, report the bug, go on
            log.error("message_handling_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            self._inbox.drop(arrival, "message handling failed", stale=False)
            return []
        self._inbox.done(arrival)
        return out

    def _send(self, outgoing: list[Outgoing]) -> None:
        # All of one step's messages at once (the share phase forwards a different one to each holder).
        self._inbox.send_all(secagg_envelopes(self._federation, outgoing, self._roster.organisation_of))

    def _record_phases(self, outcome: AggregationOutcome, session: CuratorSession, started: float) -> float:
        """Record the phases that closed since ``started``; returns when this happened."""
        now = self._clock()
        for phase, (expected, answered_indices) in session.phase_log.items():
            if phase.value in outcome.phases:
                continue
            seconds = now - started
            answered = sorted(self._names(answered_indices))
            outcome.phases[phase.value] = answered
            outcome.phase_seconds[phase.value] = seconds
            log.info(
                "phase_closed",
                closed=phase.value,
                answered=len(answered),
                expected=len(expected),
                seconds=round(seconds, 3),
            )
            self._metrics.phase_closed(
                phase.value, seconds=seconds, expected=len(expected), answered=len(answered)
            )
            started = now
        return now

    def _names(self, indices: frozenset[int] | tuple[int, ...]) -> tuple[str, ...]:
        return tuple(sorted(self._roster.organisation_of(u) for u in indices))


__all__ = ["AggregationDriver", "AggregationOutcome"]
