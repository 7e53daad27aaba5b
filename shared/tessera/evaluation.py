"""Evaluation counts that add up across organisations, and the metrics derived from their sums.

Used on both sides: a participant counts on its validation split (:func:`tessera.inference.evaluate`)
and submits the counts through secure aggregation; the curator derives accuracy, precision, recall and F1
from the *summed* counts only -- never from one organisation's rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tessera.errors import LocalUsageError


@dataclass(frozen=True, eq=False)
class EvalCounts:
    """Summable evaluation counts: correct, total, summed cross-entropy loss, and a confusion matrix.

    ``confusion[i, j]`` counts examples of true class ``i`` predicted as ``j`` (int64).
    """

    correct: int
    total: int
    loss_sum: float
    confusion: npt.NDArray[np.int64]

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    def __add__(self, other: EvalCounts) -> EvalCounts:
        if other.confusion.shape != self.confusion.shape:
            raise LocalUsageError(f"cannot add counts of {self.num_classes} and {other.num_classes} classes")
        return EvalCounts(
            self.correct + other.correct,
            self.total + other.total,
            self.loss_sum + other.loss_sum,
            self.confusion + other.confusion,
        )

    @classmethod
    def zero(cls, num_classes: int) -> EvalCounts:
        return cls(0, 0, 0.0, np.zeros((num_classes, num_classes), dtype=np.int64))


def accuracy(counts: EvalCounts) -> float:
    """correct / total; NaN when there are no examples."""
    return counts.correct / counts.total if counts.total else math.nan


@dataclass(frozen=True)
class ClassMetrics:
    """Per-class precision, recall, F1 and support (arrays indexed by class)."""

    precision: npt.NDArray[np.float64]
    recall: npt.NDArray[np.float64]
    f1: npt.NDArray[np.float64]
    support: npt.NDArray[np.int64]

    @property
    def macro_f1(self) -> float:
        """Unweighted mean F1 over classes that occur (support > 0); NaN if none occur."""
        present = self.support > 0
        return float(self.f1[present].mean()) if present.any() else math.nan


def class_metrics(counts: EvalCounts | npt.NDArray[np.int64]) -> ClassMetrics:
    """Per-class metrics from (summed) counts or a confusion matrix; 0/0 gives 0 (as scikit-learn's
    ``zero_division=0``)."""
    conf = (counts.confusion if isinstance(counts, EvalCounts) else np.asarray(counts)).astype(np.float64)
    tp = np.diag(conf)
    predicted, actual = conf.sum(axis=0), conf.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    return ClassMetrics(precision, recall, f1, actual.astype(np.int64))


__all__ = ["ClassMetrics", "EvalCounts", "accuracy", "class_metrics"]
