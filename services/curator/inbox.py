"""The curator's side of the bus: admit what arrives, send what the protocol produces, count both.

Every delivery goes through :func:`tessera.envelope.admit` (a roster member, a body that decodes within the
size limit, this federation) before anything looks at it; a refused one is logged with its reason, counted
and dead-lettered. An admitted delivery is a sign of life of its sender (:meth:`Attendance.heard_from`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from tessera.bus import CuratorBus, Envelope, Received
from tessera.envelope import Admitted, Refused, Sealed, admit
from tessera.observability import CuratorMetricsSink

from .attendance import Attendance

log = structlog.get_logger("tessera.curator")


@dataclass(frozen=True)
class Arrival:
    """An admitted message and the delivery to settle once it is handled."""

    message: Admitted
    delivery: Received


class CuratorInbox:
    def __init__(
        self,
        bus: CuratorBus,
        *,
        federation: str,
        organisations: Sequence[str],
        attendance: Attendance,
        max_payload: int,
        metrics: CuratorMetricsSink,
    ) -> None:
        self._bus = bus
        self._federation = federation
        self._organisations = frozenset(organisations)
        self._attendance = attendance
        self._max_payload = max_payload
        self._metrics = metrics

    def next(self, timeout: float) -> Arrival | None:
        """The next admitted message within ``timeout`` seconds, or None (refused ones are dropped here)."""
        delivery = self._bus.receive(timeout=timeout)
        if delivery is None:
            return None
        self._metrics.bytes_received(len(delivery.body))
        entry = admit(
            delivery, federation=self._federation, max_payload=self._max_payload, senders=self._organisations
        )
        if isinstance(entry, Refused):
            self._reject(delivery, entry.reason, stale=False)
            return None
        self._attendance.heard_from(delivery.sender)
        return Arrival(entry, delivery)

    def done(self, arrival: Arrival) -> None:
        """The message was handled: acknowledge it."""
        self._bus.ack(arrival.delivery)

    def drop(self, arrival: Arrival, reason: str, *, stale: bool) -> None:
        """The message does not fit (a protocol error, or stale): log, count and dead-letter it."""
        self._reject(arrival.delivery, reason, stale=stale)

    def stale(self, arrival: Arrival) -> None:
        """A harmless leftover of an earlier step (a late Ready, say): acknowledged, not dead-lettered."""
        log.info(
            "message_dropped",
            reason="stale",
            kind=type(arrival.message.header).__name__,
            sender=arrival.message.sender,
        )
        self._bus.ack(arrival.delivery)

    def send_all(self, envelopes: Sequence[Envelope]) -> None:
        """Send every message at once (the broker's confirms overlap) and wait for all. One publish per
        message, however many recipients: the same body to several organisations goes out once (the broker
        copies it to each inbox, without telling anyone the others)."""
        if not envelopes:
            return
        # A failure other than a missing inbox (no confirm at all) is raised: the curator stops and resumes
        # from its checkpoint.
        report = self._bus.send_each(envelopes)
        for envelope, sent in zip(envelopes, report, strict=True):
            reached = list(envelope.organisations)
            if sent.undelivered:
                # Some inbox is gone (deleted behind the curator's back): those organisations cannot answer,
                # which the protocol already handles as dropping out; the others have their copy.
                log.warning(
                    "message_undelivered", type=envelope.message_type, organisations=list(sent.undelivered)
                )
                self._attendance.mark_unresponsive(sent.undelivered, why="its inbox does not exist")
                reached = [o for o in reached if o not in sent.undelivered]
            self._metrics.bytes_sent(len(envelope.body) * len(reached))

    def broadcast(self, sealed: Sealed, *, audience: int) -> None:
        """To every organisation's inbox; ``audience`` (how many read it) only counts the bytes."""
        self._bus.broadcast(sealed.body, message_type=sealed.message_type)
        self._metrics.bytes_sent(len(sealed.body) * audience)

    def _reject(self, delivery: Received, reason: str, *, stale: bool) -> None:
        log.warning("message_rejected", reason=reason, sender=delivery.sender, type=delivery.message_type)
        self._metrics.message_rejected("stale" if stale else "invalid")
        self._bus.reject(delivery, reason)


__all__ = ["Arrival", "CuratorInbox"]
