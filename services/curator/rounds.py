"""The curator's main loop: one federated round after another, as ARCHITECTURE.md describes them.

    for each round:
        announce the global model (and the layout of the vector to submit)
        wait for participants to report their update ready (or the training deadline)
        run secure aggregation over the ready ones; learn only the sum
        average: w += sum(n_k * dw_k) / sum(n_k); record the secure-averaged metrics
        save model, history and report atomically
    until the target accuracy, the round limit, or too few participants left

A round whose aggregation aborts (fewer than the threshold left) is retried with fresh keys under a new
aggregation id, never with the old ones. After a restart the curator resumes at the last completed round;
the round that was in flight is announced again under a new aggregation id.

Every message is validated before it touches state; a bad one is logged with a reason and dropped
(rejected to the dead-letter queue), and the round goes on.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch
from tessera import protocol
from tessera.bus import CuratorBus, Received
from tessera.data import ArrayDataset
from tessera.errors import ConfigurationError, ProtocolError
from tessera.evaluation import EvalCounts, class_metrics
from tessera.fedavg import Aggregate, UpdateLayout, largest_value_bits
from tessera.models import build_model, flatten_parameters, load_flat_parameters, model_fingerprint
from tessera.roster import RosterFile
from tessera.secagg.config import AggregationConfig, Graph, SessionIds, default_threshold, minimum_threshold
from tessera.secagg.curator import CuratorSession, PhaseTimeouts
from tessera.secagg.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    EncryptedShares,
    MaskedInput,
    UnmaskShares,
)
from tessera.secagg.wire import WireLimits
from tessera.secagg.wire import decode as decode_secagg
from tessera.secagg.wire import encode as encode_secagg

from . import checkpoint
from .settings import CuratorSettings

log = structlog.get_logger("tessera.curator")

_SECAGG_REPLIES = (AdvertiseKeys, EncryptedShares, MaskedInput, ConsistencySignature, UnmaskShares)


@dataclass
class RoundOutcome:
    aggregate: Aggregate | None
    survivors: tuple[str, ...] = ()
    invited: tuple[str, ...] = ()
    phases: dict[str, list[str]] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    abort_reason: str | None = None


class Curator:
    """Runs the federation to its end. ``bus`` is a RabbitMQ transport or an in-process exchange endpoint."""

    def __init__(
        self,
        settings: CuratorSettings,
        roster: RosterFile,
        bus: CuratorBus,
        *,
        validation: ArrayDataset | None = None,
        metrics: Any = None,
        heartbeat: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if roster.federation != settings.federation:
            raise ConfigurationError(
                f"roster is for federation {roster.federation!r}, settings say {settings.federation!r}"
            )
        self.settings = settings
        self.roster = roster
        self.bus = bus
        self.validation = validation
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.clock = clock
        # The curator's own configuration names its model, so an import spec there is trusted (participants,
        # who receive the spec from the curator, build one only if their own allowed_imports lists it).
        self._allowed_imports = (settings.model.import_target,) if settings.model.import_target else ()
        self.model = build_model(settings.model, allowed_imports=self._allowed_imports)
        self.fingerprint = model_fingerprint(settings.model, self.model)
        n = len(roster.members)
        secagg = settings.secagg
        self.layout = UpdateLayout(
            num_params=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            num_classes=settings.num_classes,
            clip=secagg.clip,
            ring_bits=secagg.ring_bits,
            value_bits=secagg.value_bits
            or largest_value_bits(
                ring_bits=secagg.ring_bits, max_weight=secagg.max_weight, max_participants=n
            ),
            max_weight=secagg.max_weight,
            max_participants=n,
        )
        self.limits = WireLimits(
            max_participants=n, vector_length=self.layout.length, ring_bits=secagg.ring_bits
        )
        self.active: set[str] = set(roster.organisations)
        self._left: list[str] = []  # organisations that left during the current round
        # Active organisations that missed their last round (no Ready by the deadline, or gone during secure
        # aggregation) and have sent nothing since: a round waits for them only rejoin_wait seconds.
        self.unresponsive: set[str] = set()
        self.state = self._restore()

    # --- state ------------------------------------------------------------------------------------------------

    def _restore(self) -> checkpoint.CuratorState:
        saved = checkpoint.load(self.settings.state_dir)
        if saved is None:
            torch.manual_seed(self.settings.rounds.seed)
            fresh = build_model(self.settings.model, allowed_imports=self._allowed_imports)
            state = checkpoint.CuratorState(
                federation=self.settings.federation,
                model=self.settings.model.model_dump(),
                model_fingerprint=self.fingerprint,
                weights=flatten_parameters(fresh),
            )
            log.info("federation_created", federation=state.federation, parameters=self.layout.num_params)
            return state
        if saved.federation != self.settings.federation or saved.model_fingerprint != self.fingerprint:
            raise ConfigurationError(
                f"{self.settings.state_dir} holds a checkpoint of federation {saved.federation!r} with model "
                f"{saved.model_fingerprint[:12]}; this curator runs {self.settings.federation!r} with "
                f"{self.fingerprint[:12]}. Use another state_dir or move the checkpoint away."
            )
        saved.restarts += 1
        # "finished" is re-decided at every start: a curator restarted with a higher round limit goes on.
        saved.status, saved.stop_reason = "running", None
        for record in saved.history:  # organisations that left stay gone after a restart
            for organisation in record.get("left", []):
                self.active.discard(organisation)
        log.info("federation_resumed", rounds_completed=saved.rounds_completed, status=saved.status)
        return saved

    def _save(self) -> None:
        checkpoint.save(self.settings.state_dir, self.state, report_extra=self._report_extra())
        try:
            from tessera.report import write_plot

            write_plot(self.state.history, self.settings.state_dir / "report.png")
        except Exception as exc:  # a plot must never stop training
            log.warning("report_plot_failed", error=str(exc))

    def _report_extra(self) -> dict[str, Any]:
        return {
            "layout": {
                "parameters": self.layout.num_params,
                "vector_length": self.layout.length,
                "ring_bits": self.layout.ring_bits,
                "value_bits": self.layout.value_bits,
                "clip": self.layout.clip,
            },
            "organisations": list(self.roster.organisations),
            "active": sorted(self.active),
        }

    # --- main loop --------------------------------------------------------------------------------------------

    def run(self) -> checkpoint.CuratorState:
        """Train until a stopping condition holds; returns the final state (also on disk)."""
        rounds = self.settings.rounds
        while self.state.status == "running":
            reason = self._stop_reason()
            if reason is not None:
                self._finish(reason)
                break
            round_number = self.state.rounds_completed + 1
            structlog.contextvars.bind_contextvars(federation=self.settings.federation, round=round_number)
            for attempt in range(rounds.attempts_per_round):
                outcome = self._run_round(round_number, attempt)
                if outcome.aggregate is not None:
                    self._complete_round(round_number, attempt, outcome)
                    break
                log.warning("round_attempt_failed", attempt=attempt, reason=outcome.abort_reason)
                if len(self.active) < rounds.min_participants:
                    break
            else:
                self._finish(f"round {round_number} failed {rounds.attempts_per_round} attempts")
        self._broadcast_finished()
        structlog.contextvars.unbind_contextvars("round", "phase")
        return self.state

    def _stop_reason(self) -> str | None:
        rounds = self.settings.rounds
        if self.state.rounds_completed >= rounds.max_rounds:
            return f"round limit {rounds.max_rounds} reached"
        if len(self.active) < rounds.min_participants:
            return (
                f"only {len(self.active)} participants left (minimum {rounds.min_participants}); "
                "the others' privacy budgets are spent or they left"
            )
        if rounds.target_accuracy is not None and self.state.history:
            accuracy = self.state.history[-1].get("accuracy")
            if accuracy is not None and accuracy >= rounds.target_accuracy:
                return f"target accuracy {rounds.target_accuracy} reached ({accuracy:.4f})"
        return None

    def _finish(self, reason: str) -> None:
        self.state.status = "finished"
        self.state.stop_reason = reason
        self._save()
        log.info("federation_finished", reason=reason, rounds_completed=self.state.rounds_completed)

    def _broadcast_finished(self) -> None:
        header = protocol.Finished(
            federation=self.settings.federation,
            rounds_completed=self.state.rounds_completed,
            reason=(self.state.stop_reason or "stopped")[:500],
        )
        self.bus.broadcast(protocol.encode(header), message_type="finished")

    # --- one round --------------------------------------------------------------------------------------------

    def _run_round(self, round_number: int, attempt: int) -> RoundOutcome:
        started = self.clock()
        aggregation = (
            f"r{round_number}a{attempt}-{secrets.token_hex(4)}"  # never reused, even after a restart
        )
        structlog.contextvars.bind_contextvars(phase="announce", aggregation=aggregation)
        announcement = protocol.RoundAnnouncement(
            federation=self.settings.federation,
            round=round_number,
            attempt=attempt,
            aggregation=aggregation,
            model=self.settings.model,
            model_fingerprint=self.fingerprint,
            layout=protocol.LayoutHeader.of(self.layout),
        )
        body = protocol.encode(announcement, protocol.weights_to_bytes(self.state.weights))
        self.bus.broadcast(body, message_type="round")
        self._count_bytes("sent", len(body) * len(self.active))
        log.info("round_announced", attempt=attempt, active=len(self.active), bytes=len(body))

        structlog.contextvars.bind_contextvars(phase="training")
        rounds = self.settings.rounds
        ready = self._collect_ready(
            aggregation,
            deadline=started + rounds.training_timeout,
            rejoin_deadline=started + min(rounds.rejoin_wait, rounds.training_timeout),
        )
        training_seconds = self.clock() - started
        if len(ready) < self.settings.rounds.min_participants:
            return RoundOutcome(
                aggregate=None,
                abort_reason=f"{len(ready)} participants ready, minimum {self.settings.rounds.min_participants}",
            )
        outcome = self._aggregate(round_number, aggregation, sorted(ready))
        outcome.phase_seconds = {"training": training_seconds, **outcome.phase_seconds}
        # Who vanished during the aggregation: those invited who did not answer its last closed phase.
        answered = list(outcome.phases.values())[-1] if outcome.phases else outcome.invited
        self._mark_unresponsive(set(outcome.invited) - set(answered), why="gone during secure aggregation")
        return outcome

    def _awaited(self, rejoin_passed: bool) -> set[str]:
        """Whom the round still waits for: every active participant until the rejoin deadline, then only
        those that answered their last round (unless too few of them are left to aggregate at all)."""
        if not rejoin_passed:
            return set(self.active)
        responsive = self.active - self.unresponsive
        return responsive if len(responsive) >= self.settings.rounds.min_participants else set(self.active)

    def _mark_unresponsive(self, organisations: set[str], *, why: str) -> None:
        fresh = (organisations & self.active) - self.unresponsive
        if fresh:
            self.unresponsive |= fresh
            log.warning(
                "participants_unresponsive",
                organisations=sorted(fresh),
                why=why,
                next_rounds_wait_s=self.settings.rounds.rejoin_wait,
            )

    def _collect_ready(self, aggregation: str, *, deadline: float, rejoin_deadline: float) -> set[str]:
        ready: set[str] = set()
        while self.clock() < deadline:
            rejoin_passed = self.clock() >= rejoin_deadline
            if ready >= self._awaited(rejoin_passed):
                break
            self.heartbeat()
            until = deadline if rejoin_passed else rejoin_deadline
            delivery = self.bus.receive(timeout=min(1.0, max(0.0, until - self.clock())))
            if delivery is None:
                continue
            parsed = self._parse(delivery)
            if parsed is None:
                continue
            header, _ = parsed
            if isinstance(header, protocol.Ready) and header.aggregation == aggregation:
                ready.add(delivery.sender)
                log.info(
                    "participant_ready",
                    organisation=delivery.sender,
                    ready=len(ready),
                    active=len(self.active),
                )
            elif isinstance(header, protocol.Leave):
                self._on_leave(delivery.sender, header)
                ready.discard(delivery.sender)
            else:
                log.info(
                    "message_dropped", reason="stale", kind=type(header).__name__, sender=delivery.sender
                )
            self.bus.ack(delivery)
        if self.active - ready - self.unresponsive and self.clock() >= deadline:
            self._mark_unresponsive(self.active - ready, why="not ready by the training deadline")
        skipped = sorted((self.active & self.unresponsive) - ready)
        if skipped:
            log.info("round_goes_on_without", organisations=skipped)
        return ready & self.active

    def _aggregate(self, round_number: int, aggregation: str, ready: list[str]) -> RoundOutcome:
        secagg = self.settings.secagg
        indices = [self.roster.index_of(org) for org in ready]
        n = len(indices)
        threshold = default_threshold(n)
        if secagg.threshold_fraction is not None:
            threshold = max(minimum_threshold(n), min(n, int(np.ceil(secagg.threshold_fraction * n))))
        config = AggregationConfig.create(
            ids=SessionIds(federation=self.settings.federation, round=round_number, aggregation=aggregation),
            participants=indices,
            vector_length=self.layout.length,
            ring_bits=secagg.ring_bits,
            threshold=threshold,
            graph=Graph(secagg.graph) if n > 8 else Graph.FULL,
            graph_seed=secrets.token_bytes(32),
        )
        timeout = secagg.phase_timeout
        session = CuratorSession(
            config=config,
            roster=self.roster.secagg_roster(),
            timeouts=PhaseTimeouts(
                advertise=timeout, share=timeout, masked_input=timeout, consistency=timeout, unmask=timeout
            ),
        )
        outcome = RoundOutcome(aggregate=None, invited=tuple(ready))
        phase_started = self.clock()
        structlog.contextvars.bind_contextvars(phase=session.phase.value)
        self._send(session.start(self.clock()))
        while not session.finished:
            self.heartbeat()
            deadline = session.next_deadline or self.clock()
            delivery = self.bus.receive(timeout=min(1.0, max(0.0, deadline - self.clock())))
            if delivery is not None:
                self._send(self._on_secagg(session, delivery))
            self._send(session.poll(self.clock()))
            if len(session.phase_log) > len(outcome.phases):
                phase_started = self._phases_closed(outcome, session, phase_started)
                structlog.contextvars.bind_contextvars(phase=session.phase.value)
        if session.result is None:
            outcome.abort_reason = session.abort_reason
            log.warning("aggregation_aborted", reason=session.abort_reason)
            return outcome
        result = session.result
        outcome.aggregate = self.layout.decode(result.total)
        outcome.survivors = tuple(sorted(self.roster.organisation_of(u) for u in result.survivors))
        if result.bad_share_senders:
            log.warning(
                "bad_shares_detected",
                senders=sorted(self.roster.organisation_of(u) for u in result.bad_share_senders),
            )
        return outcome

    def _phases_closed(self, outcome: RoundOutcome, session: CuratorSession, started: float) -> float:
        """Record the phases that closed since ``started``; returns when this happened."""
        now = self.clock()
        for phase, (expected, answered_indices) in session.phase_log.items():
            if phase.value in outcome.phases:
                continue
            seconds = now - started
            answered = sorted(self.roster.organisation_of(u) for u in answered_indices)
            outcome.phases[phase.value] = answered
            outcome.phase_seconds[phase.value] = seconds
            log.info(
                "phase_closed",
                closed=phase.value,
                answered=len(answered),
                expected=len(expected),
                seconds=round(seconds, 3),
            )
            if self.metrics is not None:
                self.metrics.phase_duration.labels(phase=phase.value).observe(seconds)
                self.metrics.participants.labels(phase=phase.value).set(len(answered))
                if len(expected) > len(answered):
                    self.metrics.dropouts.labels(phase=phase.value).inc(len(expected) - len(answered))
            started = now
        return now

    def _on_secagg(self, session: CuratorSession, delivery: Received) -> list[Any]:
        parsed = self._parse(delivery)
        if parsed is None:
            return []
        header, payload = parsed
        try:
            if isinstance(header, protocol.Leave):
                self._on_leave(delivery.sender, header)
                self.bus.ack(delivery)
                return []
            if isinstance(header, protocol.Ready):  # late for its round: harmless, same as in _collect_ready
                log.info("message_dropped", reason="stale", kind="Ready", sender=delivery.sender)
                self.bus.ack(delivery)
                return []
            if not isinstance(header, protocol.SecAgg):
                raise ProtocolError(f"{type(header).__name__} is not expected during aggregation")
            message = decode_secagg(payload, self.limits)
            if not isinstance(message, _SECAGG_REPLIES):
                raise ProtocolError(f"{type(message).__name__} is a curator message")
            out = session.receive(self.roster.index_of(delivery.sender), message, self.clock())
        except ProtocolError as exc:
            self._drop(delivery, exc.reason, stale=True)
            return []
        self.bus.ack(delivery)
        return out

    def _send(self, outgoing: list[Any]) -> None:
        """One publish per message, however many recipients: the same body to several organisations goes
        out once (the broker copies it to each inbox, without telling anyone the others)."""
        for item in outgoing:
            recipients = [self.roster.organisation_of(index) for index in item.recipients]
            if not recipients:
                continue
            body = protocol.encode(
                protocol.SecAgg(federation=self.settings.federation), encode_secagg(item.message)
            )
            if len(recipients) == 1:
                self.bus.send(recipients[0], body, message_type="secagg")
            else:
                self.bus.send_many(recipients, body, message_type="secagg")
            self._count_bytes("sent", len(body) * len(item.recipients))

    # --- messages ---------------------------------------------------------------------------------------------

    def _parse(self, delivery: Received) -> tuple[protocol.Header, bytes] | None:
        """Decode and authenticate a delivery, or drop it with a logged reason."""
        self._count_bytes("received", len(delivery.body))
        if delivery.sender not in self.roster.organisations:
            self._drop(delivery, "sender is not in the roster")
            return None
        try:
            header, payload = protocol.decode(delivery.body, max_payload=self.limits.max_message_bytes)
        except ProtocolError as exc:
            self._drop(delivery, exc.reason)
            return None
        if getattr(header, "federation", None) != self.settings.federation:
            self._drop(delivery, "message for another federation")
            return None
        if delivery.sender in self.unresponsive:  # a sign of life: wait for it fully again
            self.unresponsive.discard(delivery.sender)
            log.info("participant_responsive_again", organisation=delivery.sender)
        return header, payload

    def _drop(self, delivery: Received, reason: str, *, stale: bool = False) -> None:
        log.warning("message_rejected", reason=reason, sender=delivery.sender, type=delivery.message_type)
        if self.metrics is not None:
            self.metrics.rejected_messages.labels(reason="stale" if stale else "invalid").inc()
        self.bus.reject(delivery, reason)

    def _on_leave(self, organisation: str, header: protocol.Leave) -> None:
        if organisation in self.active:
            self.active.discard(organisation)
            self._left.append(organisation)
            log.info(
                "participant_left",
                organisation=organisation,
                reason=header.reason.value,
                detail=header.detail,
            )

    def _count_bytes(self, direction: str, count: int) -> None:
        if self.metrics is not None:
            (self.metrics.bytes_sent if direction == "sent" else self.metrics.bytes_received).inc(count)

    # --- bookkeeping ------------------------------------------------------------------------------------------

    def _complete_round(self, round_number: int, attempt: int, outcome: RoundOutcome) -> None:
        aggregate = outcome.aggregate
        assert aggregate is not None
        self.state.weights = (self.state.weights + aggregate.mean_update).astype(np.float32)
        evaluation = aggregate.evaluation
        survivors = len(outcome.survivors)
        record: dict[str, Any] = {
            "round": round_number,
            "attempt": attempt,
            "participants": list(outcome.survivors),
            "invited": list(outcome.invited),
            "phases": outcome.phases,
            "total_weight": aggregate.total_weight,
            **_metrics(evaluation),
            "clipped_fraction": aggregate.clipped / max(1, self.layout.num_params * survivors),
            "epsilon_mean": aggregate.epsilon_sum / survivors if survivors else None,
            "non_private_participants": aggregate.non_private,
            "left": list(self._left),
            "seconds": {k: round(v, 3) for k, v in outcome.phase_seconds.items()},
        }
        self._left.clear()
        if self.validation is not None:
            record["curator_validation"] = self._validate()
        self.state.history.append(record)
        self.state.rounds_completed = round_number
        self._save()
        if self.metrics is not None:
            self.metrics.rounds_completed.inc()
            self.metrics.current_round.set(round_number)
            if record["accuracy"] is not None:
                self.metrics.last_accuracy.set(record["accuracy"])
            self.metrics.round_duration.observe(sum(outcome.phase_seconds.values()))
        log.info(
            "round_completed",
            participants=survivors,
            accuracy=record["accuracy"],
            epsilon_mean=record["epsilon_mean"],
            clipped_fraction=round(record["clipped_fraction"], 6),
        )
        if aggregate.non_private:
            log.warning("non_private_participants", count=aggregate.non_private)

    def _validate(self) -> dict[str, Any]:
        """Accuracy of the *new* global model on the curator's own validation set."""
        from tessera.participant.training import evaluate

        assert self.validation is not None
        load_flat_parameters(self.model, self.state.weights)
        return _metrics(evaluate(self.model, self.validation, self.settings.num_classes))


def _metrics(evaluation: EvalCounts) -> dict[str, Any]:
    """Accuracy, loss, per-class precision/recall/F1 from summed counts (of the model announced this round)."""
    if evaluation.total == 0:
        return {"accuracy": None, "loss": None, "evaluated_examples": 0}
    per_class = class_metrics(evaluation)
    return {
        "accuracy": evaluation.correct / evaluation.total,
        "loss": evaluation.loss_sum / evaluation.total,
        "evaluated_examples": evaluation.total,
        "precision": per_class.precision.tolist(),
        "recall": per_class.recall.tolist(),
        "f1": per_class.f1.tolist(),
        "macro_f1": per_class.macro_f1,
        "confusion": evaluation.confusion.tolist(),
    }


__all__ = ["Curator"]
