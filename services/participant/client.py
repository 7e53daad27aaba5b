"""An organisation's participant: its main loop reads like one round of ARCHITECTURE.md.

    on a round announcement:
        check the curator's model is the one this organisation agreed to train
        refuse (and leave the federation) if training would exceed the privacy budget
        evaluate the global model on the local validation split
        train it with DP-SGD on the local training split; the accountant is saved first
        encode [n_k * update, n_k, evaluation counts, clipped count, epsilon] into the ring; report ready
    on secure-aggregation messages: drive the protocol state machine with that vector
    on "finished": stop

A vector is reused for a retried attempt of the same round only if this participant never revealed unmask
shares for it: after unmasking, the curator may hold that round's sum, and a second sum over a different set
of participants could expose this organisation's update. Otherwise it trains again (and pays for it in epsilon).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from tessera import protocol
from tessera.bus import ParticipantBus, Received
from tessera.crypto import SigningKey, key_fingerprint
from tessera.data import ArrayDataset
from tessera.envelope import Admitted, Refused, Sealed, admit, seal, seal_secagg
from tessera.errors import ConfigurationError, ProtocolError
from tessera.evaluation import EvalCounts
from tessera.fedavg import UpdateLayout
from tessera.inference import evaluate
from tessera.models import build_model, load_flat_parameters, model_fingerprint
from tessera.observability import ParticipantMetricsSink
from tessera.roster import RosterFile, normalise_fingerprint, secure_fingerprint_equal
from tessera.secagg.config import ParticipantPolicy
from tessera.secagg.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    EncryptedShares,
    MaskedInput,
    StartAggregation,
    UnmaskShares,
    advertisement_signed_bytes,
)
from tessera.secagg.participant import ParticipantSession, ParticipantState
from tessera.secagg.wire import WireLimits
from tessera.storage import atomic_write_arrays
from torch import nn

from . import announced
from .plan import training_mode
from .replay import ReplayGuard
from .settings import ParticipantSettings
from .training import Contribution, RoundInputs, TrainingMode

log = structlog.get_logger("tessera.participant")

# Fault injection (testing only): the message types a participant can be told to stall before sending.
_STALL_POINTS: dict[type, str] = {
    AdvertiseKeys: "advertise",
    EncryptedShares: "shares",
    MaskedInput: "masked_input",
    ConsistencySignature: "consistency",
    UnmaskShares: "unmask",
}


class Exit(enum.Enum):
    FINISHED = "finished"
    BUDGET_EXHAUSTED = "budget_exhausted"
    MODEL_REFUSED = "model_refused"


@dataclass
class _Work:
    """This participant's contribution to one round (possibly over several aggregation attempts)."""

    round: int
    weights_digest: bytes
    layout: UpdateLayout
    contribution: Contribution
    revealed: bool = False


class Participant:
    """One organisation in the federation. ``bus`` is a RabbitMQ transport or an in-process endpoint."""

    def __init__(
        self,
        settings: ParticipantSettings,
        roster: RosterFile,
        identity: SigningKey,
        bus: ParticipantBus,
        *,
        train: ArrayDataset,
        validation: ArrayDataset,
        metrics: ParticipantMetricsSink | None = None,
        heartbeat: Callable[[], None] = lambda: None,
        mode: TrainingMode | None = None,
    ) -> None:
        if roster.federation != settings.federation:
            raise ConfigurationError(
                f"roster is for federation {roster.federation!r}, settings say {settings.federation!r}"
            )
        if settings.organisation not in roster.organisations:
            raise ConfigurationError(f"organisation {settings.organisation!r} is not in the roster")
        if not secure_fingerprint_equal(roster.fingerprint(), settings.roster_fingerprint):
            raise ConfigurationError(
                f"the roster's fingerprint is {roster.fingerprint()}, this organisation pinned "
                f"{normalise_fingerprint(settings.roster_fingerprint)}: refusing to take part under another roster"
            )
        self.index = roster.index_of(settings.organisation)
        if roster.secagg_roster().key(self.index) != identity.public_bytes:
            raise ConfigurationError(
                f"the identity key does not match the roster entry of {settings.organisation!r}: this "
                f"organisation's public key is {identity.public_bytes.hex()} (fingerprint "
                f"{key_fingerprint(identity.public_bytes)}); send it to the coordinator to rebuild the roster"
            )
        self.roster_fingerprint = roster.fingerprint()
        self.settings = settings
        self.roster = roster
        self.identity = identity
        self.bus = bus
        self.train_data = train
        self.validation = validation
        self.metrics = metrics or ParticipantMetricsSink()
        self.heartbeat = heartbeat
        self.model: nn.Module = build_model(settings.model, allowed_imports=settings.allowed_imports)
        self.fingerprint = model_fingerprint(settings.model, self.model)
        self.mode = mode or training_mode(
            settings.privacy,
            train=train,
            state_dir=settings.state_dir,
            roster=roster,
            num_params=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            seed=settings.training_seed,
        )
        self._report_epsilon()
        self._work: _Work | None = None
        self._announcement: protocol.RoundAnnouncement | None = None
        self._session: ParticipantSession | None = None
        self._limits: WireLimits | None = None
        self._guard = ReplayGuard(settings.state_dir)  # announcements acted on, kept across restarts
        self._rng = np.random.default_rng(
            secrets.randbits(128) if settings.training_seed is None else settings.training_seed
        )

    # --- main loop --------------------------------------------------------------------------------------------

    def run(self, *, idle_timeout: float | None = None) -> Exit:
        """Take part until the curator finishes, the budget is spent, or (if set) nothing arrives for a while."""
        structlog.contextvars.bind_contextvars(
            federation=self.settings.federation, organisation=self.settings.organisation
        )
        quiet_since = time.monotonic()
        while True:
            self.heartbeat()
            delivery = self.bus.receive(timeout=1.0)
            if delivery is None:
                if idle_timeout is not None and time.monotonic() - quiet_since > idle_timeout:
                    raise TimeoutError(f"no message from the curator for {idle_timeout} s")
                continue
            quiet_since = time.monotonic()
            outcome = self._handle(delivery)
            if outcome is not None:
                return outcome

    def _handle(self, delivery: Received) -> Exit | None:
        self.metrics.bytes_received(len(delivery.body))
        entry = admit(delivery, federation=self.settings.federation, max_payload=self._max_payload())
        try:
            if isinstance(entry, Refused):
                raise ProtocolError(entry.reason)
            outcome = self._dispatch(entry)
        except ProtocolError as exc:
            log.warning("message_rejected", reason=exc.reason, type=delivery.message_type)
            self.metrics.message_rejected("invalid")
            self.bus.reject(delivery, exc.reason)
            return None
        except (ConfigurationError, OSError):
            raise  # this organisation's own setup is broken (an accountant it cannot write): stop, loudly
        except Exception as exc:
            # No message may end the service: whatever it triggered, drop it and the aggregation it was for
            # (a retry starts a fresh one), and go on. This is a bug to report, hence the traceback.
            log.error("message_handling_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            self._session = None
            self.metrics.message_rejected("failed")
            self.bus.reject(delivery, "message handling failed")
            return None
        self.bus.ack(delivery)
        return outcome

    def _dispatch(self, message: Admitted) -> Exit | None:
        header = message.header
        if isinstance(header, protocol.RoundAnnouncement):
            return self._on_round(header, message.payload)
        if isinstance(header, protocol.SecAgg):
            self._on_secagg(message)
            return None
        if isinstance(header, protocol.Finished):
            log.info("federation_finished", reason=header.reason, rounds_completed=header.rounds_completed)
            return Exit.FINISHED
        raise ProtocolError(f"{type(header).__name__} is not a message for participants")

    def _send(self, sealed: Sealed) -> None:
        self.bus.send(sealed.body, message_type=sealed.message_type)
        self.metrics.bytes_sent(len(sealed.body))

    def _max_payload(self) -> int:
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        secagg = self._limits.max_message_bytes if self._limits is not None else 0
        return max(4 * params, secagg, 1 << 16)

    # --- a round ----------------------------------------------------------------------------------------------

    def _on_round(self, header: protocol.RoundAnnouncement, payload: bytes) -> Exit | None:
        self._check_roster(header)
        weights = protocol.weights_from_bytes(payload)  # refused before anything below changes state
        # A replayed or redelivered announcement must not restart work (or spend privacy) on an old model,
        # also after a restart: the guard is saved before anything below acts on the announcement.
        self._guard.admit(header.round, header.aggregation)
        structlog.contextvars.bind_contextvars(round=header.round, phase="announce")
        refusal = self._check_model(header)
        if refusal is not None:
            log.error("model_refused", reason=refusal)
            self._leave(protocol.LeaveReason.MODEL_REFUSED, refusal)
            return Exit.MODEL_REFUSED
        # Kept for `tessera model export` at this organisation (the model it accepted, not a refused one).
        announced.save(
            self.settings.state_dir,
            announced.AnnouncedModel(
                federation=self.settings.federation,
                organisation=self.settings.organisation,
                round=header.round,
                model=self.settings.model.model_dump(),
                model_fingerprint=self.fingerprint,
                num_classes=self.settings.num_classes,
                weights=weights,
            ),
        )
        layout = header.layout.layout()
        digest = hashlib.sha256(payload).digest()
        self._announcement = header
        self._session = None
        self._limits = WireLimits(
            max_participants=len(self.roster.members), vector_length=layout.length, ring_bits=layout.ring_bits
        )
        work = self._work
        reusable = (
            work is not None
            and work.round == header.round
            and work.weights_digest == digest
            and not work.revealed
        )
        if not reusable:
            if self._budget_spent():
                return Exit.BUDGET_EXHAUSTED
            self._work = self._compute(header, digest, weights)
        else:
            log.info("update_reused", attempt=header.attempt)
        self._inject_faults("ready")
        self._send(
            seal(
                protocol.Ready(
                    federation=self.settings.federation,
                    round=header.round,
                    attempt=header.attempt,
                    aggregation=header.aggregation,
                )
            )
        )
        log.info("ready", attempt=header.attempt)
        return None

    def _check_model(self, header: protocol.RoundAnnouncement) -> str | None:
        """Why this organisation refuses to train what the curator announced (and leaves), or None."""
        if header.model != self.settings.model:
            return (
                f"the curator's model {header.model.canonical_json()} differs from this organisation's "
                f"{self.settings.model.canonical_json()}"
            )
        if header.model_fingerprint != self.fingerprint:
            return (
                f"model fingerprint {header.model_fingerprint[:12]} differs from ours {self.fingerprint[:12]}"
            )
        if header.layout.num_classes != self.settings.num_classes:
            return f"{header.layout.num_classes} classes announced, this organisation has {self.settings.num_classes}"
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if header.layout.num_params != params:
            return f"layout for {header.layout.num_params} parameters, the model has {params}"
        return None

    def _check_roster(self, header: protocol.RoundAnnouncement) -> None:
        """An announcement under another roster or with other encoding parameters than the roster's is a
        curator's, not this organisation's, problem: refuse it (ProtocolError) and stay."""
        if header.roster_fingerprint != self.roster_fingerprint:
            raise ProtocolError(
                f"round announced under roster {header.roster_fingerprint[:16]}..., this organisation pinned "
                f"{self.roster_fingerprint[:16]}..."
            )
        expected = self.roster.update_layout(
            num_params=header.layout.num_params, num_classes=header.layout.num_classes
        )
        if header.layout != protocol.LayoutHeader.of(expected):
            raise ProtocolError(
                f"announced layout {header.layout.model_dump()} differs from the roster's "
                f"{protocol.LayoutHeader.of(expected).model_dump()}"
            )

    def _budget_spent(self) -> bool:
        detail = self.mode.refusal()
        if detail is None:
            return False
        log.warning("privacy_budget_exhausted", detail=detail)
        self._leave(protocol.LeaveReason.BUDGET_EXHAUSTED, detail)
        return True

    def _compute(
        self, header: protocol.RoundAnnouncement, digest: bytes, weights: npt.NDArray[np.float32]
    ) -> _Work:
        round_number = header.round
        layout = header.layout.layout()
        load_flat_parameters(self.model, weights)
        structlog.contextvars.bind_contextvars(phase="evaluate")
        evaluation = (
            evaluate(
                self.model,
                self.validation,
                self.settings.num_classes,
                decision_threshold=header.decision_threshold,
            )
            if header.evaluate
            else EvalCounts.zero(self.settings.num_classes)
        )
        structlog.contextvars.bind_contextvars(phase="train")
        privacy = self.settings.privacy
        started = time.monotonic()
        contribution = self.mode.contribute(
            self.model,
            self.train_data,
            RoundInputs(
                weights=weights,
                layout=layout,
                evaluation=evaluation,
                round_number=round_number,
                lr=privacy.round_lr(round_number),
                momentum=privacy.momentum,
                rng_seed=None
                if self.settings.training_seed is None
                else self.settings.training_seed + round_number,
                quantisation_rng=self._rng,
            ),
        )
        self.metrics.trained(time.monotonic() - started)
        self._report_epsilon()
        if self.settings.faults.slow_seconds:
            log.warning("fault_injection_slow", seconds=self.settings.faults.slow_seconds)
            time.sleep(self.settings.faults.slow_seconds)
        return _Work(round=round_number, weights_digest=digest, layout=layout, contribution=contribution)

    def _report_epsilon(self) -> None:
        spent, target = self.mode.epsilon(), self.mode.target_epsilon
        if spent is not None and target is not None:
            self.metrics.privacy_spent(spent, target=target)

    def _leave(self, reason: protocol.LeaveReason, detail: str) -> None:
        self._send(
            seal(protocol.Leave(federation=self.settings.federation, reason=reason, detail=detail[:500]))
        )

    # --- secure aggregation -----------------------------------------------------------------------------------

    def _inject_faults(self, reply: Any) -> Any:
        """Fault injection for resilience and security tests (TESSERA_FAULTS__*); never set in production.
        ``reply`` is the secure-aggregation message about to be sent, or ``"ready"``."""
        faults = self.settings.faults
        kind = "ready" if reply == "ready" else _STALL_POINTS.get(type(reply))
        round_number = self._announcement.round if self._announcement is not None else None
        if (
            faults.stall_before is not None
            and kind == faults.stall_before
            and round_number == faults.stall_round
        ):
            log.warning("fault_injection_stall", before=kind, seconds=faults.stall_seconds)
            time.sleep(faults.stall_seconds)
        if faults.advertise_low_order_key and isinstance(reply, AdvertiseKeys):
            log.warning("fault_injection_low_order_key")
            low_order = bytes(32)
            signed = advertisement_signed_bytes(
                reply.ids, reply.sender, reply.encryption_key, low_order, reply.commitment
            )
            return dataclasses.replace(reply, masking_key=low_order, signature=self.identity.sign(signed))
        return reply

    def _on_secagg(self, envelope: Admitted) -> None:
        if self._limits is None or self._announcement is None or self._work is None:
            raise ProtocolError("secure-aggregation message before any round announcement")
        message = envelope.secagg(self._limits)
        session: ParticipantSession | None = self._session
        if isinstance(message, StartAggregation):
            ids = message.config.ids
            if (ids.round, ids.aggregation) != (self._announcement.round, self._announcement.aggregation):
                raise ProtocolError(f"aggregation {ids} does not match the announced round")
            if self._session is not None:  # a replay or redelivery must not restart the session with new keys
                raise ProtocolError(f"duplicate start of aggregation {ids.aggregation}")
            layout = self._work.layout
            vector = self._work.contribution.vector(message.config)
            if self.settings.faults.record_inputs:  # TESTING ONLY: the input in the clear, for the checks
                atomic_write_arrays(
                    self.settings.state_dir / "fault-injection" / "inputs" / f"{ids.aggregation}.npz",
                    vector=vector,
                )
            session = ParticipantSession(
                index=self.index,
                identity=self.identity,
                roster=self.roster.secagg_roster(),
                policy=ParticipantPolicy(
                    federation=self.settings.federation,
                    vector_length=layout.length,
                    ring_bits=layout.ring_bits,
                    rules=self.roster.parameters.rules(),
                ),
                vector=vector,
            )
        if session is None:
            raise ProtocolError(f"{type(message).__name__} outside an aggregation")
        structlog.contextvars.bind_contextvars(phase=session.state.value)
        replies = session.receive(message)  # type: ignore[arg-type]
        self._session = session  # a refused start leaves no session behind
        for problem in self._session.share_problems:
            log.warning("share_problem", reason=problem.reason)
        self._session.share_problems.clear()
        for reply in map(self._inject_faults, replies):
            if isinstance(reply, UnmaskShares):
                self._work.revealed = True  # before sending: a crash now must not allow reuse
            self._send(seal_secagg(self.settings.federation, reply))
        # Shares sent: mask the input now, while the curator waits for everybody else's shares, rather than
        # after ForwardedShares arrives (n - 1 keystreams of the vector's size; a no-op in other states).
        self._session.prepare_masked_input()
        if self._session.state is ParticipantState.DONE:
            log.info("aggregation_done")
            self.metrics.aggregation_completed()
        elif self._session.state is ParticipantState.ABORTED:
            log.warning("aggregation_aborted", reason=self._session.abort_reason)


__all__ = ["Exit", "Participant"]
