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

Admission of messages lives in :mod:`.inbox`, who takes part in :mod:`.attendance`, the aggregation itself
in :mod:`.aggregation`, and what a round leaves behind in :mod:`.records` and :mod:`.checkpoint`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog
import torch
from tessera import protocol
from tessera.bus import CuratorBus
from tessera.data import ArrayDataset
from tessera.envelope import seal
from tessera.errors import ConfigurationError
from tessera.fedavg import Aggregate, IntegerAggregate
from tessera.inference import evaluate
from tessera.models import build_model, flatten_parameters, load_flat_parameters, model_fingerprint
from tessera.observability import CuratorMetricsSink
from tessera.roster import PrivacyMode, RosterFile
from tessera.secagg.config import AggregationConfig, Graph, SessionIds
from tessera.secagg.curator import CuratorSession, PhaseTimeouts
from tessera.secagg.wire import WireLimits

from . import checkpoint
from .aggregation import AggregationDriver, AggregationOutcome
from .attendance import Attendance
from .inbox import CuratorInbox
from .optimizer import ServerSgd
from .records import Evaluation, RoundRecord, Status
from .settings import CuratorSettings

log = structlog.get_logger("tessera.curator")

PLOT_INTERVAL = 30.0
"""Seconds between two redraws of report.png (report.json is rewritten after every round)."""


class Curator:
    """Runs the federation to its end. ``bus`` is a RabbitMQ transport or an in-process exchange endpoint."""

    def __init__(
        self,
        settings: CuratorSettings,
        roster: RosterFile,
        bus: CuratorBus,
        *,
        validation: ArrayDataset | None = None,
        metrics: CuratorMetricsSink | None = None,
        heartbeat: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if roster.federation != settings.federation:
            raise ConfigurationError(
                f"roster is for federation {roster.federation!r}, settings say {settings.federation!r}"
            )
        self.settings = settings
        self.roster = roster
        self.validation = validation
        self.heartbeat = heartbeat
        self.clock = clock
        # The curator's own configuration names its model, so an import spec there is trusted (participants,
        # who receive the spec from the curator, build one only if their own allowed_imports lists it).
        self._allowed_imports = (settings.model.import_target,) if settings.model.import_target else ()
        self.model = build_model(settings.model, allowed_imports=self._allowed_imports)
        self.fingerprint = model_fingerprint(settings.model, self.model)
        self.roster_fingerprint = roster.fingerprint()
        self.parameters = roster.parameters
        self.min_participants = self._min_participants()
        num_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.layout = roster.update_layout(num_params=num_params, num_classes=settings.num_classes)
        self.distributed = roster.parameters.privacy.mode is PrivacyMode.DISTRIBUTED
        self.mechanism = roster.parameters.privacy.mechanism(num_params) if self.distributed else None
        self.limits = WireLimits(
            max_participants=len(roster.members),
            vector_length=self.layout.length,
            ring_bits=self.layout.ring_bits,
        )
        self.state = self._restore()
        self.optimizer = ServerSgd(settings.server, self.state.momentum)
        rounds = settings.rounds
        self.attendance = Attendance(
            roster.organisations,
            left=(name for record in self.state.history for name in record.left),
            unresponsive=self.state.unresponsive,
            excluded=self.state.excluded,
            min_participants=self.min_participants,
            rejoin_wait=rounds.rejoin_wait,
            max_offences=rounds.max_offences,
        )
        metrics = metrics or CuratorMetricsSink()
        self.inbox = CuratorInbox(
            bus,
            federation=settings.federation,
            organisations=roster.organisations,
            attendance=self.attendance,
            max_payload=self.limits.max_message_bytes,
            metrics=metrics,
        )
        self.aggregation = AggregationDriver(
            federation=settings.federation,
            roster=roster,
            inbox=self.inbox,
            attendance=self.attendance,
            limits=self.limits,
            metrics=metrics,
            heartbeat=heartbeat,
            clock=clock,
        )
        self.metrics = metrics
        self._plotted = -PLOT_INTERVAL

    @property
    def active(self) -> set[str]:
        return self.attendance.active

    # --- the federation ---------------------------------------------------------------------------------------

    def run(self) -> checkpoint.CuratorState:
        """Train until a stopping condition holds; returns the final state (also on disk)."""
        rounds = self.settings.rounds
        while self.state.status is Status.RUNNING:
            reason = self._stop_reason()
            if reason is not None:
                self._finish(reason)
                break
            round_number = self.state.rounds_completed + 1
            structlog.contextvars.bind_contextvars(federation=self.settings.federation, round=round_number)
            self._maybe_pause(round_number)
            for attempt in range(rounds.attempts_per_round):
                if self._run_round(round_number, attempt):
                    break
                if len(self.active) < self.min_participants:
                    break
            else:
                self._finish(f"round {round_number} failed {rounds.attempts_per_round} attempts")
        self.inbox.broadcast(
            seal(
                protocol.Finished(
                    federation=self.settings.federation,
                    rounds_completed=self.state.rounds_completed,
                    reason=(self.state.stop_reason or "stopped")[:500],
                )
            ),
            audience=0,
        )
        structlog.contextvars.unbind_contextvars("round", "phase")
        return self.state

    def _run_round(self, round_number: int, attempt: int) -> bool:
        """One attempt at a round; True when it completed (and was saved)."""
        started = self.clock()
        aggregation = (
            f"r{round_number}a{attempt}-{secrets.token_hex(4)}"  # never reused, even after a restart
        )
        self._announce(round_number, attempt, aggregation)
        ready = self._await_ready(aggregation, started)
        training_seconds = self.clock() - started
        minimum = self.min_participants
        if len(ready) < minimum:
            log.warning(
                "round_attempt_failed",
                attempt=attempt,
                reason=f"{len(ready)} participants ready, minimum {minimum}",
            )
            return False
        outcome = self._aggregate(round_number, aggregation, sorted(ready))
        outcome.phase_seconds = {"training": training_seconds, **outcome.phase_seconds}
        self.attendance.mark_unresponsive(outcome.silent(), why="gone during secure aggregation")
        if outcome.result is None:
            log.warning("round_attempt_failed", attempt=attempt, reason=outcome.abort_reason)
            return False
        self._complete(round_number, attempt, outcome)
        return True

    def _maybe_pause(self, round_number: int) -> None:
        """Fault injection for resilience tests (TESSERA_FAULTS__PAUSE_BEFORE_ROUND: "2" or "2,3"); never
        set in production."""
        faults = self.settings.faults
        if round_number in faults.pause_rounds:
            log.warning("fault_injection_pause", seconds=faults.pause_seconds)
            deadline = self.clock() + faults.pause_seconds
            while self.clock() < deadline:
                self.heartbeat()
                time.sleep(min(0.5, max(0.0, deadline - self.clock())))

    # --- the steps of a round ---------------------------------------------------------------------------------

    def _announce(self, round_number: int, attempt: int, aggregation: str) -> None:
        structlog.contextvars.bind_contextvars(phase="announce", aggregation=aggregation)
        announcement = protocol.RoundAnnouncement(
            federation=self.settings.federation,
            round=round_number,
            attempt=attempt,
            aggregation=aggregation,
            model=self.settings.model,
            model_fingerprint=self.fingerprint,
            layout=protocol.LayoutHeader.of(self.layout),
            roster_fingerprint=self.roster_fingerprint,
            evaluate=self._evaluates(round_number),
            decision_threshold=self.settings.server.decision_threshold,
        )
        sealed = seal(announcement, protocol.weights_to_bytes(self.state.weights))
        self.inbox.broadcast(sealed, audience=len(self.active))
        log.info("round_announced", attempt=attempt, active=len(self.active), bytes=len(sealed.body))

    def _await_ready(self, aggregation: str, started: float) -> set[str]:
        """Collect Ready for ``aggregation`` until every awaited participant sent one or the deadline."""
        structlog.contextvars.bind_contextvars(phase="training")
        rounds = self.settings.rounds
        deadline = started + rounds.training_timeout
        rejoin_deadline = started + min(rounds.rejoin_wait, rounds.training_timeout)
        ready: set[str] = set()
        while self.clock() < deadline:
            rejoin_passed = self.clock() >= rejoin_deadline
            if ready >= self.attendance.awaited(rejoin_passed):
                break
            self.heartbeat()
            until = deadline if rejoin_passed else rejoin_deadline
            arrival = self.inbox.next(timeout=min(1.0, max(0.0, until - self.clock())))
            if arrival is None:
                continue
            header = arrival.message.header
            if isinstance(header, protocol.Ready) and header.aggregation == aggregation:
                ready.add(arrival.message.sender)
                log.info(
                    "participant_ready",
                    organisation=arrival.message.sender,
                    ready=len(ready),
                    active=len(self.active),
                )
                self.inbox.done(arrival)
            elif isinstance(header, protocol.Leave):
                self.attendance.leave(
                    arrival.message.sender, reason=header.reason.value, detail=header.detail
                )
                ready.discard(arrival.message.sender)
                self.inbox.done(arrival)
            else:
                self.inbox.stale(arrival)
        late = self.active - ready
        if late - self.attendance.unresponsive and self.clock() >= deadline:
            self.attendance.mark_unresponsive(late, why="not ready by the training deadline")
        skipped = sorted((self.active & self.attendance.unresponsive) - ready)
        if skipped:
            log.info("round_goes_on_without", organisations=skipped)
        return ready & self.active

    def _aggregate(self, round_number: int, aggregation: str, ready: list[str]) -> AggregationOutcome:
        indices = [self.roster.index_of(org) for org in ready]
        n = len(indices)
        rules = self.parameters.rules()
        graph = rules.graph_for(n)
        config = AggregationConfig.create(
            ids=SessionIds(federation=self.settings.federation, round=round_number, aggregation=aggregation),
            participants=indices,
            vector_length=self.layout.length,
            ring_bits=self.layout.ring_bits,
            threshold=self._threshold(n),
            graph=graph,
            neighbours=rules.neighbours_for(n) if graph is Graph.SPARSE else None,
            # Mixed into the graph seed with the advertisements (which do not exist yet): not a choice of ours.
            graph_seed=secrets.token_bytes(32),
        )
        timeout = self.settings.secagg.phase_timeout
        session = CuratorSession(
            config=config,
            roster=self.roster.secagg_roster(),
            timeouts=PhaseTimeouts(
                advertise=timeout, share=timeout, masked_input=timeout, consistency=timeout, unmask=timeout
            ),
        )
        return self.aggregation.run(session, tuple(ready))

    def _complete(self, round_number: int, attempt: int, outcome: AggregationOutcome) -> None:
        assert outcome.result is not None
        aggregate: Aggregate | IntegerAggregate
        if self.mechanism is None:
            aggregate = self.layout.decode(outcome.result.total)
            self.state.weights = (self.state.weights + aggregate.mean_update).astype(np.float32)
        else:
            aggregate = self.layout.decode_integer_sum(outcome.result.total)
            # The DP estimate of the mean clipped gradient: the noised integer sum over γ and Σ q_i n_i.
            gradient = aggregate.values / (self.mechanism.scale * max(1, aggregate.total_weight))
            self.state.weights = self.optimizer.step(self.state.weights, gradient, step_number=round_number)
            self.state.momentum = self.optimizer.buffer
            honest = outcome.result.survivors
            log.info(
                "noise_surplus",
                survivors=len(honest),
                factor=round(
                    len(honest)
                    / max(1, self._threshold(len(outcome.invited)) - self.parameters.privacy.colluders),
                    3,
                ),
            )
        record = self._record(round_number, attempt, outcome, aggregate)
        self.state.history.append(record)
        self.state.rounds_completed = round_number
        self._save()
        # After the checkpoint, which alone is the curator's state: a crash in between loses only the
        # export of this round's weights by number (the checkpoint still holds them as the latest).
        checkpoint.save_round_weights(
            self.settings.state_dir,
            round_number,
            self.state.weights,
            self.state.model_fingerprint,
            keep=self.settings.rounds.keep_weights,
        )
        self.metrics.round_completed(
            round_number, accuracy=record.accuracy, seconds=sum(outcome.phase_seconds.values())
        )
        log.info(
            "round_completed",
            participants=len(record.participants),
            accuracy=record.accuracy,
            epsilon_mean=record.epsilon_mean,
            clipped_fraction=round(record.clipped_fraction, 6),
        )
        if aggregate.non_private:
            log.warning("non_private_participants", count=aggregate.non_private)

    # --- bookkeeping ------------------------------------------------------------------------------------------

    def _record(
        self,
        round_number: int,
        attempt: int,
        outcome: AggregationOutcome,
        aggregate: Aggregate | IntegerAggregate,
    ) -> RoundRecord:
        survivors = len(outcome.survivors)
        return RoundRecord(
            round=round_number,
            attempt=attempt,
            participants=outcome.survivors,
            invited=outcome.invited,
            phases={phase: tuple(names) for phase, names in outcome.phases.items()},
            total_weight=aggregate.total_weight,
            evaluation=Evaluation.of(aggregate.evaluation),
            clipped_fraction=aggregate.clipped / max(1, self.layout.num_params * survivors),
            epsilon_mean=aggregate.epsilon_sum / survivors if survivors else None,
            non_private_participants=aggregate.non_private,
            left=self.attendance.take_left(),
            seconds={k: round(v, 3) for k, v in outcome.phase_seconds.items()},
            curator_validation=self._validate() if self._evaluates(round_number) else None,
        )

    def _validate(self) -> Evaluation | None:
        """Accuracy of the *new* global model on the curator's own validation set (if it holds one)."""
        if self.validation is None:
            return None
        load_flat_parameters(self.model, self.state.weights)
        return Evaluation.of(
            evaluate(
                self.model,
                self.validation,
                self.settings.num_classes,
                decision_threshold=self.settings.server.decision_threshold,
            )
        )

    def _stop_reason(self) -> str | None:
        rounds = self.settings.rounds
        if self.state.rounds_completed >= rounds.max_rounds:
            return f"round limit {rounds.max_rounds} reached"
        if len(self.active) < self.min_participants:
            return (
                f"only {len(self.active)} participants left (minimum {self.min_participants}); "
                "the others' privacy budgets are spent or they left"
            )
        if rounds.target_accuracy is not None and self.state.history:
            accuracy = self.state.history[-1].accuracy
            if accuracy is not None and accuracy >= rounds.target_accuracy:
                return f"target accuracy {rounds.target_accuracy} reached ({accuracy:.4f})"
        return None

    def _finish(self, reason: str) -> None:
        self.state.status = Status.FINISHED
        self.state.stop_reason = reason
        self._save(final=True)
        log.info("federation_finished", reason=reason, rounds_completed=self.state.rounds_completed)

    def _evaluates(self, round_number: int) -> bool:
        """Whether participants evaluate the model announced in ``round_number``."""
        every = self.settings.server.evaluate_every
        last = round_number == self.settings.rounds.max_rounds
        return round_number == 1 or last or round_number % every == 0

    def _threshold(self, invited: int) -> int:
        return self.parameters.rules().threshold(invited)

    def _min_participants(self) -> int:
        floor = self.roster.parameters.min_participants
        wanted = self.settings.rounds.min_participants
        if wanted is not None and wanted < floor:
            raise ConfigurationError(
                f"rounds.min_participants {wanted} is below the roster's parameters.min_participants {floor}; "
                "participants would refuse such rounds"
            )
        return floor if wanted is None else wanted

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
        saved.status, saved.stop_reason = Status.RUNNING, None
        log.info("federation_resumed", rounds_completed=saved.rounds_completed, status=saved.status.value)
        return saved

    def _save(self, *, final: bool = False) -> None:
        self.state.unresponsive = tuple(sorted(self.attendance.unresponsive & self.attendance.active))
        self.state.excluded = dict(self.attendance.excluded)
        checkpoint.save(self.settings.state_dir, self.state, report_extra=self._report_extra())
        # Drawing the plot costs about half a second: at most every PLOT_INTERVAL, and at the end (distributed
        # DP-SGD completes a round every fraction of a second).
        if not final and self.clock() - self._plotted < PLOT_INTERVAL:
            return
        self._plotted = self.clock()
        try:
            from tessera.report import write_plot

            write_plot(
                [record.to_json() for record in self.state.history], self.settings.state_dir / "report.png"
            )
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


__all__ = ["Curator"]
