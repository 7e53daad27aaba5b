"""The curator's typed records: what a completed round leaves in the history, and the federation's status.

A :class:`RoundRecord` is written once, when its round completes, and read back by the curator (target
accuracy, who left), the report, the benchmarks and the tests. On disk (``checkpoint.npz`` and
``report.json``) it is the JSON object of :meth:`RoundRecord.to_json`, whose keys are the report's
documented fields; :meth:`RoundRecord.from_json` reads it back.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tessera.evaluation import EvalCounts, class_metrics


class Status(enum.Enum):
    """Whether the federation still trains. "finished" is re-decided at every start: a curator restarted
    with a higher round limit goes on."""

    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Metrics derived from summed evaluation counts (never from one organisation's rates)."""

    accuracy: float | None
    loss: float | None
    evaluated_examples: int
    precision: tuple[float, ...] = ()
    recall: tuple[float, ...] = ()
    f1: tuple[float, ...] = ()
    macro_f1: float | None = None
    confusion: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def of(cls, counts: EvalCounts) -> Evaluation:
        if counts.total == 0:
            return cls(accuracy=None, loss=None, evaluated_examples=0)
        per_class = class_metrics(counts)
        return cls(
            accuracy=counts.correct / counts.total,
            loss=counts.loss_sum / counts.total,
            evaluated_examples=counts.total,
            precision=tuple(per_class.precision.tolist()),
            recall=tuple(per_class.recall.tolist()),
            f1=tuple(per_class.f1.tolist()),
            macro_f1=per_class.macro_f1,
            confusion=tuple(tuple(row) for row in counts.confusion.tolist()),
        )

    def to_json(self) -> dict[str, Any]:
        if self.evaluated_examples == 0:
            return {"accuracy": None, "loss": None, "evaluated_examples": 0}
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "evaluated_examples": self.evaluated_examples,
            "precision": list(self.precision),
            "recall": list(self.recall),
            "f1": list(self.f1),
            "macro_f1": self.macro_f1,
            "confusion": [list(row) for row in self.confusion],
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Evaluation:
        return cls(
            accuracy=document.get("accuracy"),
            loss=document.get("loss"),
            evaluated_examples=int(document.get("evaluated_examples", 0)),
            precision=tuple(document.get("precision", ())),
            recall=tuple(document.get("recall", ())),
            f1=tuple(document.get("f1", ())),
            macro_f1=document.get("macro_f1"),
            confusion=tuple(tuple(row) for row in document.get("confusion", ())),
        )


_EVALUATION_KEYS = frozenset(Evaluation.__dataclass_fields__)


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """One completed round: who took part, what the secure sums revealed, and how long each step took.

    ``evaluation`` describes the model *announced* in this round (participants evaluate before they train);
    ``curator_validation``, when the curator holds a validation set, the model *after* this round's update.
    """

    round: int
    attempt: int
    participants: tuple[str, ...]
    invited: tuple[str, ...]
    phases: Mapping[str, tuple[str, ...]]
    total_weight: int
    evaluation: Evaluation
    clipped_fraction: float
    epsilon_mean: float | None
    non_private_participants: int
    left: tuple[str, ...] = ()
    seconds: Mapping[str, float] = field(default_factory=dict)
    curator_validation: Evaluation | None = None

    @property
    def accuracy(self) -> float | None:
        return self.evaluation.accuracy

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "round": self.round,
            "attempt": self.attempt,
            "participants": list(self.participants),
            "invited": list(self.invited),
            "phases": {phase: list(names) for phase, names in self.phases.items()},
            "total_weight": self.total_weight,
            **self.evaluation.to_json(),
            "clipped_fraction": self.clipped_fraction,
            "epsilon_mean": self.epsilon_mean,
            "non_private_participants": self.non_private_participants,
            "left": list(self.left),
            "seconds": dict(self.seconds),
        }
        if self.curator_validation is not None:
            document["curator_validation"] = self.curator_validation.to_json()
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> RoundRecord:
        """Read a record back; raises KeyError, TypeError or ValueError on a document that is not one."""
        validation = document.get("curator_validation")
        return cls(
            round=int(document["round"]),
            attempt=int(document["attempt"]),
            participants=tuple(document["participants"]),
            invited=tuple(document["invited"]),
            phases={phase: tuple(names) for phase, names in document["phases"].items()},
            total_weight=int(document["total_weight"]),
            evaluation=Evaluation.from_json({k: v for k, v in document.items() if k in _EVALUATION_KEYS}),
            clipped_fraction=float(document["clipped_fraction"]),
            epsilon_mean=document["epsilon_mean"],
            non_private_participants=int(document["non_private_participants"]),
            left=tuple(document.get("left", ())),
            seconds=dict(document.get("seconds", {})),
            curator_validation=None if validation is None else Evaluation.from_json(validation),
        )


__all__ = ["Evaluation", "RoundRecord", "Status"]
