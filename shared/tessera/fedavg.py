"""The vector a participant submits through secure aggregation, and the federated average read from the sum.

ARCHITECTURE.md, round step 3: one ring vector per participant holds everything per-organisation that the
curator may learn *only as a sum* (PITFALLS.md, "plaintext side channels")::

    [ q(delta_w) * n_k  (P coordinates)  |  n_k  |  eval counts  |  clipped count  |  epsilon spent  |  non-private flag ]

- ``q(delta_w) * n_k``: the local update, clipped to [-clip, clip], quantised with stochastic rounding and
  multiplied by the integer weight n_k (the participant's training-sample count), so the sum over
  participants is sum_k n_k * delta_w_k and the sample-weighted average is that divided by sum_k n_k.
- ``n_k``, the evaluation counts (correct, total, loss sum in fixed point, confusion matrix) and the number
  of clipped coordinates are non-negative integers. Each takes two coordinates, a high and a low digit in
  base B = (per-participant integer limit + 1), so counts far larger than the quantiser's per-coordinate
  limit still sum exactly: sum(hi) * B + sum(lo).

The layout is a pure function of the federation's settings (parameter count, class count, quantiser), which
the curator sends with the model, so both sides agree on it without negotiating.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from tessera.errors import LocalUsageError
from tessera.evaluation import EvalCounts
from tessera.quantize import BitBudget, Quantizer, RingBits

LOSS_SCALE = 1000
"""Loss sums travel as integers in thousandths."""

EPSILON_SCALE = 10_000
"""Each participant's spent epsilon travels as an integer in ten-thousandths, so the curator learns only the
sum (hence the mean over the round's survivors), never one organisation's privacy spend."""

MAX_LOSS_PER_EXAMPLE = 100.0
"""A per-example loss above this is counted as this much (a diverged model must not overflow the field)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Aggregate:
    """What the curator learns from one round's secure sum."""

    mean_update: npt.NDArray[np.float64]
    total_weight: int
    evaluation: EvalCounts
    clipped: int
    epsilon_sum: float
    non_private: int  # how many participants of the round trained without differential privacy


@dataclass(frozen=True, kw_only=True, eq=False)
class IntegerAggregate:
    """What the curator learns from one step of distributed DP-SGD: the summed integer gradients plus
    noise (signed), the summed expected batch sizes, and the summed counts."""

    values: npt.NDArray[np.int64]
    total_weight: int
    evaluation: EvalCounts
    clipped: int
    epsilon_sum: float
    non_private: int


@dataclass(frozen=True, kw_only=True)
class UpdateLayout:
    """Positions of every field in the submitted vector; see the module docstring."""

    num_params: int
    num_classes: int
    clip: float
    ring_bits: RingBits
    value_bits: int
    max_weight: int
    max_participants: int

    def __post_init__(self) -> None:
        if self.num_params < 1 or self.num_classes < 2:
            raise LocalUsageError("a layout needs at least one parameter and two classes")
        self.quantizer  # noqa: B018 -- validates the bit budget now, not at the first round

    @cached_property
    def quantizer(self) -> Quantizer:
        budget = BitBudget(
            value_bits=self.value_bits, max_weight=self.max_weight, max_participants=self.max_participants
        )
        return Quantizer(clip=self.clip, budget=budget, ring_bits=self.ring_bits)

    @property
    def _counts(self) -> int:
        # weight, correct, total, loss, confusion (C^2), clipped, epsilon, non-private: two digits each
        return 2 * (4 + self.num_classes**2 + 3)

    @property
    def length(self) -> int:
        return self.num_params + self._counts

    @property
    def _base(self) -> int:
        return self.quantizer.max_integer + 1

    def _counts_into(
        self,
        vector: npt.NDArray[np.unsignedinteger[Any]],
        *,
        weight: int,
        evaluation: EvalCounts,
        clipped: int,
        epsilon: float | None,
    ) -> None:
        if evaluation.confusion.shape != (self.num_classes, self.num_classes):
            raise LocalUsageError(f"confusion matrix must be {self.num_classes}x{self.num_classes}")
        quantizer = self.quantizer
        loss = min(evaluation.loss_sum, MAX_LOSS_PER_EXAMPLE * evaluation.total)
        counts = np.concatenate(
            [
                np.array(
                    [weight, evaluation.correct, evaluation.total, round(loss * LOSS_SCALE)], dtype=np.int64
                ),
                evaluation.confusion.astype(np.int64).ravel(),
                np.array(
                    [clipped, round((epsilon or 0.0) * EPSILON_SCALE), int(epsilon is None)],
                    dtype=np.int64,
                ),
            ]
        )
        if (counts < 0).any():
            raise LocalUsageError("counts and epsilon must be non-negative")
        high, low = np.divmod(counts, self._base)
        if (high > quantizer.max_integer).any():
            raise LocalUsageError("a count is too large for this layout's bit budget")
        digits = np.stack([high, low], axis=1).ravel()
        vector[self.num_params :] = quantizer.encode_integers(digits)

    def encode_integer_update(
        self,
        values: npt.NDArray[np.int64],
        *,
        weight: int,
        evaluation: EvalCounts,
        epsilon: float,
        bound: int,
    ) -> npt.NDArray[np.unsignedinteger[Any]]:
        """The ring vector of distributed DP-SGD: the integer gradient sum plus noise share ``values`` in two's
        complement (each |value| <= ``bound``, which the caller derived from its overflow analysis), then
        the counts. ``weight`` is the expected batch size, revealed only as a sum."""
        if values.shape != (self.num_params,) or values.dtype != np.int64:
            raise LocalUsageError(f"values must be int64 of shape ({self.num_params},)")
        if self.ring_bits != 64:
            raise LocalUsageError("integer updates travel in the 64-bit ring")
        if int(np.abs(values).max(initial=0)) > bound:
            raise LocalUsageError(f"a value exceeds the bound {bound} the overflow analysis allows")
        vector = np.empty(self.length, dtype=np.uint64)
        vector[: self.num_params] = values.view(np.uint64)
        self._counts_into(vector, weight=weight, evaluation=evaluation, clipped=0, epsilon=epsilon)
        return vector

    def decode_integer_sum(self, total: npt.NDArray[np.unsignedinteger[Any]]) -> IntegerAggregate:
        """The summed integer gradient (as signed integers) and the summed counts of distributed DP-SGD."""
        if total.shape != (self.length,) or total.dtype != np.uint64:
            raise LocalUsageError(f"sum must be uint64 of shape ({self.length},)")
        counts = self._decode_counts(total)
        return IntegerAggregate(values=total[: self.num_params].view(np.int64).copy(), **counts)

    def _decode_counts(self, total: npt.NDArray[np.unsignedinteger[Any]]) -> dict[str, Any]:
        digits = self.quantizer.decode_integers(total[self.num_params :]).reshape(-1, 2)
        counts = digits[:, 0] * self._base + digits[:, 1]
        weight, correct, seen, loss = (int(v) for v in counts[:4])
        c = self.num_classes
        confusion = counts[4 : 4 + c * c].reshape(c, c).astype(np.int64)
        return {
            "total_weight": weight,
            "evaluation": EvalCounts(correct, seen, loss / LOSS_SCALE, confusion),
            "clipped": int(counts[4 + c * c]),
            "epsilon_sum": int(counts[5 + c * c]) / EPSILON_SCALE,
            "non_private": int(counts[6 + c * c]),
        }

    def encode(
        self,
        update: npt.NDArray[np.floating[Any]],
        *,
        weight: int,
        evaluation: EvalCounts,
        epsilon: float | None,
        rng: np.random.Generator,
    ) -> tuple[npt.NDArray[np.unsignedinteger[Any]], int]:
        """The ring vector for one participant, and how many update coordinates were clipped.

        ``epsilon`` is the participant's privacy spend so far, or None when it trains without DP (which the
        curator then learns only as a count of such participants in the round).
        """
        if update.shape != (self.num_params,):
            raise LocalUsageError(f"update has shape {update.shape}, the layout expects ({self.num_params},)")
        if evaluation.confusion.shape != (self.num_classes, self.num_classes):
            raise LocalUsageError(f"confusion matrix must be {self.num_classes}x{self.num_classes}")
        vector = np.empty(self.length, dtype=self.quantizer.dtype)
        clipped = self.quantizer.encode_into(update, vector[: self.num_params], weight=weight, rng=rng)
        self._counts_into(vector, weight=weight, evaluation=evaluation, clipped=clipped, epsilon=epsilon)
        return vector, clipped

    def decode(self, total: npt.NDArray[np.unsignedinteger[Any]]) -> Aggregate:
        """Read the federated average and the summed metrics from the secure sum."""
        if total.shape != (self.length,):
            raise LocalUsageError(f"sum has shape {total.shape}, the layout expects ({self.length},)")
        weighted = self.quantizer.decode_sum(total[: self.num_params])
        counts = self._decode_counts(total)
        weight = counts["total_weight"]
        mean = weighted / weight if weight > 0 else np.zeros(self.num_params)
        return Aggregate(mean_update=mean, **counts)


def largest_value_bits(*, ring_bits: RingBits, max_weight: int, max_participants: int) -> int:
    """The most value bits the budget allows for this ring, weight and federation size (capped at 53)."""
    probe = BitBudget(value_bits=2, max_weight=max_weight, max_participants=max_participants)
    return min(53, ring_bits - probe.weight_bits - probe.participant_bits - 1)


__all__ = [
    "EPSILON_SCALE",
    "LOSS_SCALE",
    "Aggregate",
    "IntegerAggregate",
    "UpdateLayout",
    "largest_value_bits",
]
