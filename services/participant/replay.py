"""The participant's replay guard: which round announcements it has acted on, kept across restarts.

A round announcement makes a participant evaluate, train (spend privacy) and start a secure aggregation. A
replayed or redelivered one must do none of that again, so the participant remembers the newest round it
was announced and every aggregation id announced in that round, and refuses

- an announcement of an older round (``stale announcement``), and
- an aggregation id it has already been announced (``repeated announcement``).

Older rounds' ids need not be kept: the round check refuses them. The guard lives in
``<state_dir>/replay-guard.json``, written atomically (:mod:`tessera.storage`) *before* the announcement is
acted on, so a participant killed at any moment and restarted from the same state directory still refuses a
replay of an aggregation it took part in. A damaged file is an error at start-up, never a silent reset (a
reset guard would accept the replays it exists to refuse); the operator moves it away to start afresh.
"""

from __future__ import annotations

import json
from pathlib import Path

from tessera.errors import ConfigurationError, ProtocolError
from tessera.storage import atomic_write_json

FILE_NAME = "replay-guard.json"
FORMAT_VERSION = 1


class ReplayGuard:
    """``admit(round, aggregation)`` raises :class:`ProtocolError` for a stale or repeated announcement and
    otherwise records it durably before returning."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME
        self.round: int | None = None
        self.aggregations: set[str] = set()
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            document = json.loads(self.path.read_text())
            if document["format_version"] != FORMAT_VERSION:
                raise ValueError(f"format {document['format_version']}, expected {FORMAT_VERSION}")
            round_number = document["round"]
            aggregations = document["aggregations"]
            if type(round_number) is not int or round_number < 1:
                raise ValueError(f"round {round_number!r}")
            if not isinstance(aggregations, list) or not all(isinstance(a, str) for a in aggregations):
                raise ValueError("aggregations is not a list of ids")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"replay guard {self.path} is damaged ({exc}); move it away to start this participant's "
                "replay protection afresh"
            ) from exc
        self.round, self.aggregations = round_number, set(aggregations)

    def admit(self, round_number: int, aggregation: str) -> None:
        if self.round is not None and round_number < self.round:
            raise ProtocolError(f"stale announcement of round {round_number} during round {self.round}")
        if round_number == self.round and aggregation in self.aggregations:
            raise ProtocolError(f"repeated announcement of aggregation {aggregation}")
        aggregations = {aggregation} if round_number != self.round else self.aggregations | {aggregation}
        atomic_write_json(
            self.path,
            {"format_version": FORMAT_VERSION, "round": round_number, "aggregations": sorted(aggregations)},
        )
        self.round, self.aggregations = round_number, aggregations


__all__ = ["FILE_NAME", "ReplayGuard"]
