"""Distributed DP-SGD at one organisation: one step's clipped, rounded gradient sum and its noise share.

In the distributed privacy mode every aggregation is one DP-SGD step of the federation
(:mod:`tessera.skellam` has the mechanism and its analysis). For each step this organisation

1. Poisson-samples its training records at its own rate q = batch_size / n (bits from :mod:`tessera.csprng`);
2. computes each sampled record's gradient of the (optionally class-weighted) loss at the announced model
   (``torch.func``: ``vmap`` over ``grad``, no Opacus wrapper needed), clips it to L2 norm C;
3. scales it by γ and rounds it to integers with conditional randomised rounding, so that one record never
   moves the sum by more than Δ2 in L2 norm;
4. sums the rounded vectors (no noise yet, no averaging);
5. when the aggregation's configuration is known (its threshold t), adds Skellam noise of variance
   μ / (t − T), so that any t survivors of whom T collude still carry μ.

The step is recorded in the persistent accountant *before* anything derived from the sampled records is
computed (write-ahead): a crash can only over-count. Local epochs and several steps per round do not exist
here: every step's noise must be added to the aggregate of that step, which is what secure aggregation
reveals.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import structlog
import torch
from tessera.csprng import Csprng
from tessera.data import ArrayDataset
from tessera.dp import PersistentAccountant
from tessera.errors import ConfigurationError, LocalUsageError, ProtocolError
from tessera.evaluation import EvalCounts
from tessera.fedavg import UpdateLayout
from tessera.models import trainable_parameters
from tessera.secagg.config import AggregationConfig
from tessera.secagg.messages import RingVector
from tessera.skellam import SkellamMechanism, round_conditionally
from torch import nn
from torch.func import functional_call, grad, vmap

from .training import Contribution, RoundInputs, TrainingMode

log = structlog.get_logger("tessera.participant")

_CHUNK = 256  # records whose per-example gradients are held at once
# A sanity bound on each submitted value; the federation-wide overflow analysis (tessera.skellam.
# require_no_wrap) runs at start-up and keeps the aggregate far below 2^63.
_VALUE_BOUND = 2**62


@dataclass(frozen=True)
class GradientSum:
    """One step's contribution before noise: the integer sum of the sampled records' rounded gradients."""

    values: npt.NDArray[np.int64]
    sampled: int  # a local diagnostic: never sent
    epsilon: float
    seconds: float


@dataclass
class NoisedContribution(Contribution):
    """A step's gradient sum, to which each aggregation attempt adds a fresh noise share for its threshold."""

    mode: DistributedDpSgd
    gradient: GradientSum
    layout: UpdateLayout
    evaluation: EvalCounts

    def __post_init__(self) -> None:
        self.epsilon = self.gradient.epsilon

    def vector(self, config: AggregationConfig) -> RingVector:
        honest = config.threshold - self.mode.colluders
        if honest < 1:
            raise ProtocolError(
                f"threshold {config.threshold} with {self.mode.colluders} possible colluders: the survivors would "
                "carry less than the target noise; refusing the aggregation",
                sender="curator",
            )
        values = self.gradient.values + self.mode.noise(threshold=config.threshold)
        return self.layout.encode_integer_update(
            values,
            weight=self.mode.batch_size,
            evaluation=self.evaluation,
            epsilon=self.gradient.epsilon,
            bound=_VALUE_BOUND,
        )


class DistributedDpSgd(TrainingMode):
    """This organisation's part of distributed DP-SGD (see the module docstring)."""

    private = True

    def __init__(
        self,
        *,
        mechanism: SkellamMechanism,
        colluders: int,
        batch_size: int,
        n_train: int,
        accountant: PersistentAccountant,
        class_weights: tuple[float, ...] | None = None,
        rng: Csprng | None = None,
    ) -> None:
        if accountant.mechanism != "skellam":
            raise LocalUsageError("distributed DP-SGD needs an accountant of the skellam mechanism")
        if not 1 <= batch_size <= n_train:
            raise ConfigurationError(
                f"batch_size {batch_size} must be between 1 and the {n_train} training records"
            )
        self.mechanism = mechanism
        self.colluders = colluders
        self.batch_size = batch_size
        self.n_train = n_train
        self.sample_rate = batch_size / n_train
        self.accountant = accountant
        self.class_weights = class_weights
        self.noise_multiplier = mechanism.noise_multiplier
        self.target_epsilon = accountant.budget.target_epsilon
        self._rng = rng or Csprng()
        self._entry = mechanism.entry(self.sample_rate, 1)

    # --- budget -------------------------------------------------------------------------------------------

    def refusal(self) -> str | None:
        if not self.accountant.would_exceed_entry(self._entry):
            return None
        return (
            f"one more step would take epsilon from {self.accountant.epsilon():.3f} above the target "
            f"{self.target_epsilon}"
        )

    def epsilon(self) -> float:
        return self.accountant.epsilon()

    # --- one step -----------------------------------------------------------------------------------------

    def contribute(self, model: nn.Module, train_data: ArrayDataset, inputs: RoundInputs) -> Contribution:
        step = self.gradient_sum(model, train_data)
        log.info(
            "gradient_summed",
            seconds=round(step.seconds, 3),
            epsilon=round(step.epsilon, 4),
        )
        return NoisedContribution(
            mode=self, gradient=step, layout=inputs.layout, evaluation=inputs.evaluation
        )

    def gradient_sum(self, model: nn.Module, data: ArrayDataset) -> GradientSum:
        """Record the step, sample, and return the integer sum of the rounded, clipped gradients.

        Raises LocalUsageError (nothing recorded) when the step would exceed the budget.
        """
        if len(data) != self.n_train:
            raise ConfigurationError(
                f"the plan was made for {self.n_train} training records, the split holds {len(data)}"
            )
        epsilon = self.accountant.record_entry(self._entry)  # write-ahead: before touching the records
        started = time.perf_counter()
        chosen = np.flatnonzero(self._rng.bernoulli(np.full(len(data), self.sample_rate)))
        total = np.zeros(self.mechanism.dimension, dtype=np.int64)
        for start in range(0, len(chosen), _CHUNK):
            rows = chosen[start : start + _CHUNK]
            total += self._rounded(model, data.x[rows], data.y[rows]).sum(axis=0)
        return GradientSum(total, int(chosen.size), epsilon, time.perf_counter() - started)

    def noise(self, *, threshold: int) -> npt.NDArray[np.int64]:
        """This organisation's Skellam noise share for an aggregation whose threshold is ``threshold``."""
        variance = self.mechanism.share_variance(threshold=threshold, colluders=self.colluders)
        return self._rng.skellam(variance, self.mechanism.dimension)

    def _rounded(self, model: nn.Module, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.int64]:
        grads = per_example_gradients(
            model, torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)), self.class_weights
        )
        norms = grads.norm(dim=1, keepdim=True)
        clip = self.mechanism.clip
        scaled = grads * torch.clamp(clip / (norms + 1e-12), max=1.0) * self.mechanism.scale
        bound_sq = self.mechanism.rounding_bound_sq
        unconditional = (self.mechanism.scale * clip + math.sqrt(self.mechanism.dimension)) ** 2
        return round_conditionally(
            scaled.double().numpy(),
            bound_sq=bound_sq if bound_sq < unconditional else math.inf,
            rng=self._rng,
        )


def per_example_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, class_weights: tuple[float, ...] | None = None
) -> torch.Tensor:
    """Each record's gradient of its (class-weighted) cross-entropy, flattened in the order of
    :func:`tessera.models.flatten_parameters`: shape (records, parameters)."""
    names = [name for name, _ in trainable_parameters(model)]
    params = {name: p.detach() for name, p in model.named_parameters() if name in set(names)}
    frozen = {name: p.detach() for name, p in model.named_parameters() if name not in set(names)}
    buffers = dict(model.named_buffers())
    weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**p, **frozen}, buffers), (xi.unsqueeze(0),))
        # "sum" over a batch of one: a mean would divide the class weight out again.
        return nn.functional.cross_entropy(out, yi.unsqueeze(0), weight=weights, reduction="sum")

    was_training = model.training
    model.train()
    try:
        per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    finally:
        model.train(was_training)
    return torch.cat([per[name].reshape(x.shape[0], -1) for name in names], dim=1)


__all__ = ["DistributedDpSgd", "GradientSum", "NoisedContribution", "per_example_gradients"]
