"""Who takes part: the active organisations, who left this round, and who stopped answering.

A participant that missed its previous round (not ready by the training deadline, or silent in the last
phase of the aggregation: killed, stalled, cut off) is *unresponsive*: a round waits for it only
``rounds.rejoin_wait`` seconds instead of ``training_timeout``, so a company whose machine died costs the
federation its training timeout once, not every round. Any message from it restores the full wait. The set
is saved with the checkpoint, so a restarted curator does not wait the full timeout for a dead participant
again.

A participant that keeps breaking aggregations (a :class:`~tessera.errors.Misbehaviour`: a bad signature, a
low-order key, malformed shares) is *excluded* after ``max_offences`` of them, with the reason logged and
kept in the checkpoint and the report: it is no longer invited, so the others can finish.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import structlog

log = structlog.get_logger("tessera.curator")


class Attendance:
    """The curator's view of who is in the federation (organisation ids)."""

    def __init__(
        self,
        organisations: Iterable[str],
        *,
        left: Iterable[str] = (),
        unresponsive: Iterable[str] = (),
        excluded: Mapping[str, str] | None = None,
        min_participants: int,
        rejoin_wait: float,
        max_offences: int,
    ) -> None:
        self.excluded: dict[str, str] = dict(excluded or {})
        self.active: set[str] = set(organisations) - set(left) - set(self.excluded)
        self.unresponsive: set[str] = set(unresponsive) & self.active
        self.left_this_round: list[str] = []
        self.offences: dict[str, list[str]] = {}
        self._min_participants = min_participants
        self._rejoin_wait = rejoin_wait
        self._max_offences = max_offences

    def leave(self, organisation: str, *, reason: str, detail: str) -> None:
        """``organisation`` left the federation for good (its budget is spent, it refused the model...)."""
        if organisation in self.active:
            self.active.discard(organisation)
            self.unresponsive.discard(organisation)
            self.left_this_round.append(organisation)
            log.info("participant_left", organisation=organisation, reason=reason, detail=detail)

    def offence(self, organisation: str, reason: str) -> None:
        """``organisation`` sent something no honest participant sends; exclude it once it has done so
        ``max_offences`` times."""
        if organisation not in self.active:
            return
        reasons = self.offences.setdefault(organisation, [])
        reasons.append(reason)
        log.warning("participant_misbehaved", organisation=organisation, reason=reason, offences=len(reasons))
        if len(reasons) >= self._max_offences:
            summary = f"{len(reasons)} offences, the last: {reason}"
            self.excluded[organisation] = summary
            self.active.discard(organisation)
            self.unresponsive.discard(organisation)
            log.error("participant_excluded", organisation=organisation, reason=summary)

    def heard_from(self, organisation: str) -> None:
        """A sign of life: wait for it fully again."""
        if organisation in self.unresponsive:
            self.unresponsive.discard(organisation)
            log.info("participant_responsive_again", organisation=organisation)

    def mark_unresponsive(self, organisations: Iterable[str], *, why: str) -> None:
        fresh = (set(organisations) & self.active) - self.unresponsive
        if fresh:
            self.unresponsive |= fresh
            log.warning(
                "participants_unresponsive",
                organisations=sorted(fresh),
                why=why,
                next_rounds_wait_s=self._rejoin_wait,
            )

    def awaited(self, rejoin_passed: bool) -> set[str]:
        """Whom a round still waits for: every active participant until the rejoin deadline, then only
        those that answered their last round (unless too few of them are left to aggregate at all)."""
        if not rejoin_passed:
            return set(self.active)
        responsive = self.active - self.unresponsive
        return responsive if len(responsive) >= self._min_participants else set(self.active)

    def take_left(self) -> tuple[str, ...]:
        """Who left during the round that just completed (and forget them for the next)."""
        left, self.left_this_round = tuple(self.left_this_round), []
        return left


__all__ = ["Attendance"]
