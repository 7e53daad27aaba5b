"""Local training, with DP-SGD (Opacus) or without: one round of it, in a training mode chosen as a value.

This is the only module that imports Opacus' ``PrivacyEngine``.

Training contract (:func:`train_one_round`)
-------------------------------------------
A :class:`TrainingMode` decides how a round trains: which loader, which optimiser wrapper, what is recorded
before the first step and what ε the round ends at. ``train_one_round(model, data, mode, ...)`` runs the
steps and builds the :class:`TrainResult` once, whatever the mode; a new mode is one new class.

- **Local DP-SGD** (:class:`LocalDpSgd`) runs exactly ``budget.steps_per_round`` DP-SGD steps: Poisson
  sampling at ``budget.sample_rate`` (``batch_size / n_train``), per-sample gradients clipped to
  ``budget.max_grad_norm``, Gaussian noise of standard deviation ``noise_multiplier × max_grad_norm`` added
  to each summed batch gradient. The round is recorded in the :class:`~tessera.dp.PersistentAccountant`
  *before* training starts (write-ahead: a crash can only over-count spent privacy); a round that would
  exceed the target ε is refused with :class:`~tessera.errors.LocalUsageError` and nothing is trained or
  recorded.
- **Non-private** (:class:`NonPrivate`) must be asked for explicitly and logs a loud warning
  (``training_without_differential_privacy``): plain mini-batch SGD over shuffled data, nothing recorded.
- The caller's ``model`` is not modified: training runs on a deep copy, which Opacus wraps in a
  ``GradSampleModule`` whose parameter names carry a ``_module.`` prefix. Weights are read back from the
  *unwrapped* copy with :func:`tessera.models.flatten_parameters`, so their order and names are those of
  ``model``. Load them with :func:`tessera.models.load_flat_parameters`.
- Determinism: with an integer ``rng_seed`` the Poisson sampling and the noise come from two torch generators
  seeded from it, so a round is reproducible on the same machine and thread count (torch's CPU kernels
  may still differ in the last bits across thread counts and builds). With ``rng_seed=None`` both seeds are
  drawn from the operating system's entropy (``secrets``): use that in deployments, because **anyone who
  knows the seed can regenerate the noise and subtract it**, which voids the DP guarantee.

Randomness and ``secure_mode`` — what the guarantee rests on
------------------------------------------------------------
Opacus' ``PrivacyEngine(secure_mode=True)`` needs ``torchcsprng``, which does not install with current torch,
so we do not use it. The noise and the Poisson sampling therefore come from torch's default CPU generator
(Mersenne Twister, mt19937): statistically fine, but **not a cryptographically secure generator**. Seeded
from OS entropy it is unpredictable in practice to someone who never sees its raw output, but it has no
security proof, and its state could in principle be reconstructed from enough raw outputs. The DP guarantee
as accounted assumes truly random Gaussian noise and sampling; with this generator it holds against an
adversary who cannot predict the generator, not against an unbounded one. We do switch on the DP optimizer's
own ``secure_mode`` noise routine (the sum of four Gaussian draws / 2, after Holohan et al. 2021), which needs
no torchcsprng and defends against the floating-point attack on naively sampled Gaussian noise. Where a
certified guarantee matters, install a CSPRNG-backed generator once torchcsprng (or an equivalent) is
available for the torch in use and pass it as the noise generator.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import secrets
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import structlog
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.validators.errors import UnsupportedModuleError
from tessera.data import ArrayDataset
from tessera.dp import PersistentAccountant, PrivacyBudget, steps_for_epochs
from tessera.errors import ConfigurationError, LocalUsageError
from tessera.evaluation import EvalCounts
from tessera.fedavg import UpdateLayout
from tessera.models import flatten_parameters, trainable_parameters
from tessera.secagg.config import AggregationConfig
from tessera.secagg.messages import RingVector
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

log = structlog.get_logger(__name__)

# Opacus' per-sample-gradient hooks trigger this on the first layer, whose inputs never require gradients;
# it is expected and harmless, and would otherwise print once per participant process.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


# -- threads ---------------------------------------------------------------------------------------------


def default_num_threads() -> int:
    """Threads for torch: the CPUs this process may use (affinity, capped by a cgroup v2 quota) minus one.

    One CPU is left for the service's I/O thread (broker heartbeats) and everything else on the host: on a
    2-core machine that means one torch thread. Measured here, two intra-op threads on two busy cores made a
    DP-SGD step 5-8× *slower* than one thread (OpenMP workers waiting on each other), while the gain on idle
    cores is small for models this size.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    return max(1, n - 1)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (default :func:`default_num_threads`), then restore."""
    previous = torch.get_num_threads()
    torch.set_num_threads(default_num_threads() if n is None else max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# -- training --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one local round.

    ``weights`` is the trained flat parameter vector (order of :func:`tessera.models.flatten_parameters`).
    ``epsilon`` is the ε spent so far *including* this round (``None`` when not private). ``mean_loss`` and
    ``examples_processed`` are local diagnostics: never send them to the curator in plaintext.
    """

    weights: npt.NDArray[np.float32]
    steps: int
    private: bool
    noise_multiplier: float | None
    sample_rate: float | None
    epsilon: float | None
    mean_loss: float
    examples_processed: int
    seconds: float


@dataclass
class PreparedRound:
    """What a mode hands the step loop: the (possibly wrapped) model, optimiser and loader, the step count,
    the ε after this round, and what to undo once the steps are done."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[tuple[torch.Tensor, ...]]
    steps: int
    epsilon: float | None = None
    finish: Callable[[], None] = field(default=lambda: None)


class Contribution(ABC):
    """What a participant submits to one round, ready to be turned into a ring vector once the
    aggregation's configuration is known (the distributed mode's noise share depends on its threshold)."""

    epsilon: float | None

    @abstractmethod
    def vector(self, config: AggregationConfig) -> RingVector:
        """The ring vector for the aggregation ``config``; ProtocolError if it cannot be submitted to it."""


@dataclass
class FixedContribution(Contribution):
    """A vector computed once (the local modes: the encoded, weighted update)."""

    encoded: RingVector
    epsilon: float | None

    def vector(self, config: AggregationConfig) -> RingVector:
        return self.encoded


@dataclass(frozen=True, kw_only=True)
class RoundInputs:
    """Everything a mode may use to make its contribution to one round."""

    weights: npt.NDArray[np.float32]  # the announced global model, already loaded into ``model``
    layout: UpdateLayout
    evaluation: EvalCounts
    round_number: int
    lr: float
    momentum: float
    rng_seed: int | None
    quantisation_rng: np.random.Generator


class TrainingMode(ABC):
    """How a participant turns the announced global model into its contribution to one round: one class per
    privacy mode (non-private and local DP-SGD below; distributed DP-SGD in ``.distributed``)."""

    private: ClassVar[bool]
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    target_epsilon: float | None = None

    @abstractmethod
    def contribute(self, model: nn.Module, train_data: ArrayDataset, inputs: RoundInputs) -> Contribution:
        """This organisation's contribution; raises LocalUsageError (nothing recorded) past the budget."""

    def refusal(self) -> str | None:
        """Why one more round must not be trained (its privacy budget would be exceeded), or None."""
        return None

    def epsilon(self) -> float | None:
        """ε spent so far (None when the mode is not differentially private)."""
        return None


class LocalTraining(TrainingMode):
    """Modes that train a copy of the model for a round and submit the weighted update (FedAvg)."""

    @abstractmethod
    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: TensorDataset,
        *,
        sample_seed: int,
        noise_seed: int,
    ) -> PreparedRound:
        """Set up one round on ``model`` (a private copy); raise before anything is recorded if it cannot run."""

    def contribute(self, model: nn.Module, train_data: ArrayDataset, inputs: RoundInputs) -> Contribution:
        result = train_one_round(
            model, train_data, self, rng_seed=inputs.rng_seed, lr=inputs.lr, momentum=inputs.momentum
        )
        update = result.weights.astype(np.float64) - inputs.weights.astype(np.float64)
        vector, clipped = inputs.layout.encode(
            update,
            weight=len(train_data),
            evaluation=inputs.evaluation,
            epsilon=result.epsilon,
            rng=inputs.quantisation_rng,
        )
        log.info(
            "trained",
            steps=result.steps,
            lr=inputs.lr,
            seconds=round(result.seconds, 2),
            epsilon=None if result.epsilon is None else round(result.epsilon, 4),
            clipped=clipped,
        )
        return FixedContribution(vector, result.epsilon)


class NonPrivate(LocalTraining):
    """Plain mini-batch SGD over shuffled data, ``epochs`` passes per round: NO differential privacy."""

    private = False

    def __init__(self, *, epochs: float, batch_size: int) -> None:
        if not epochs > 0 or batch_size < 1:
            raise LocalUsageError("non-private training needs epochs > 0 and batch_size >= 1")
        self.epochs = epochs
        self.batch_size = batch_size

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: TensorDataset,
        *,
        sample_seed: int,
        noise_seed: int,
    ) -> PreparedRound:
        steps = steps_for_epochs(self.epochs, n_train=len(dataset), batch_size=self.batch_size)
        log.warning(
            "training_without_differential_privacy",
            reason="the non-private training mode was chosen",
            consequence="the update is NOT differentially private and reveals information about local data",
            steps=steps,
        )
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(sample_seed),
        )
        return PreparedRound(model=model, optimizer=optimizer, loader=loader, steps=steps)


class LocalDpSgd(LocalTraining):
    """DP-SGD at this organisation (Opacus): Poisson sampling at the budget's rate, per-example clipping,
    Gaussian noise of ``noise_multiplier × max_grad_norm``; each round is recorded in the persistent
    accountant before its first step."""

    private = True

    def __init__(
        self,
        *,
        budget: PrivacyBudget | None,
        noise_multiplier: float | None,
        accountant: PersistentAccountant | None,
    ) -> None:
        if budget is None or accountant is None or noise_multiplier is None:
            raise LocalUsageError("local DP-SGD needs budget, noise_multiplier and accountant")
        if accountant.budget != budget:
            raise LocalUsageError("the accountant was loaded with a different budget than the one passed")
        self.budget = budget
        self.noise_multiplier = self._sigma = noise_multiplier
        self.accountant = accountant
        self.sample_rate = budget.sample_rate
        self.target_epsilon = budget.target_epsilon

    def refusal(self) -> str | None:
        b = self.budget
        if not self.accountant.would_exceed(self._sigma, b.sample_rate, b.steps_per_round):
            return None
        return (
            f"one more round would take epsilon from {self.accountant.epsilon():.3f} above the target "
            f"{b.target_epsilon}"
        )

    def epsilon(self) -> float:
        return self.accountant.epsilon()

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: TensorDataset,
        *,
        sample_seed: int,
        noise_seed: int,
    ) -> PreparedRound:
        budget = self.budget
        if len(dataset) != budget.n_train:
            raise ConfigurationError(
                f"the privacy budget was planned for n_train={budget.n_train} but the training split holds "
                f"{len(dataset)} examples; set n_train to the split size and re-plan the noise"
            )
        q, steps = budget.sample_rate, budget.steps_per_round
        names_before = [n for n, _ in trainable_parameters(model)]
        with warnings.catch_warnings():
            # We document the missing secure RNG above; Opacus' generic warning would only repeat it every round.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant="rdp")
            poisson_loader = DPDataLoader(
                dataset, sample_rate=q, generator=torch.Generator().manual_seed(sample_seed)
            )
            try:
                dp_model, dp_optimizer, dp_loader = engine.make_private(
                    module=model,
                    optimizer=optimizer,
                    data_loader=poisson_loader,
                    noise_multiplier=self._sigma,
                    max_grad_norm=budget.max_grad_norm,
                    poisson_sampling=False,  # the loader above already samples with our q and generator
                    noise_generator=torch.Generator().manual_seed(noise_seed),
                )
            except UnsupportedModuleError as exc:
                raise ConfigurationError(f"model cannot be trained with DP-SGD: {exc}") from exc
        # make_private derives the expected batch size from len(loader); the true mean batch size is n × q.
        dp_optimizer.expected_batch_size = budget.batch_size
        # Noise robust to the floating-point attack (sum of 4 Gaussians / 2); needs no torchcsprng.
        dp_optimizer.secure_mode = True
        if dp_model._module is not model:  # pragma: no cover - guards an Opacus behaviour change
            raise RuntimeError("Opacus did not wrap the model we passed")
        epsilon = self.accountant.record_round(self._sigma, q, steps)  # write-ahead

        def finish() -> None:
            engine_steps = sum(h[2] for h in engine.accountant.history)
            if engine_steps != steps:  # pragma: no cover - our step loop and Opacus' hook must agree
                raise RuntimeError(f"Opacus counted {engine_steps} noisy steps, we recorded {steps}")
            dp_model.remove_hooks()
            if [n for n, _ in trainable_parameters(model)] != names_before:  # pragma: no cover
                raise RuntimeError("parameter names changed during private training")

        return PreparedRound(
            model=dp_model,
            optimizer=dp_optimizer,
            loader=dp_loader,
            steps=steps,
            epsilon=epsilon,
            finish=finish,
        )


def _seeds(rng_seed: int | None) -> tuple[int, int]:
    """(sampling seed, noise seed): derived from ``rng_seed``, or fresh from OS entropy when it is None."""
    if rng_seed is None:
        return secrets.randbits(63), secrets.randbits(63)
    ss = np.random.SeedSequence(rng_seed).spawn(2)
    return int(ss[0].generate_state(1, np.uint64)[0] >> 1), int(ss[1].generate_state(1, np.uint64)[0] >> 1)


def _tensors(data: ArrayDataset) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.array(data.x)), torch.from_numpy(np.array(data.y)))


def _run_steps(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    optimizer: torch.optim.Optimizer,
    steps: int,
) -> tuple[float, int]:
    """Run exactly ``steps`` optimiser steps, cycling through ``loader``; return (loss sum, examples)."""
    criterion = nn.CrossEntropyLoss()
    loss_sum, seen, done = 0.0, 0, 0
    model.train()
    with warnings.catch_warnings():
        # Opacus' hooks on the first layer fire although the inputs need no gradient; torch warns each round.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        while done < steps:
            loss_sum, seen, done = _run_epoch(
                model, loader, optimizer, criterion, steps, (loss_sum, seen, done)
            )
    return loss_sum, seen


def _run_epoch(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    steps: int,
    state: tuple[float, int, int],
) -> tuple[float, int, int]:
    """One pass over ``loader``, stopping at ``steps`` steps in total; returns (loss sum, seen, steps done)."""
    loss_sum, seen, done = state
    progressed = False
    for xb, yb in loader:
        progressed = True
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        if len(yb):  # an empty Poisson batch still takes a (noise-only) step
            loss_sum += float(loss.detach()) * len(yb)
            seen += len(yb)
        done += 1
        if done == steps:
            break
    if not progressed:
        raise LocalUsageError("the training data loader yielded no batches")
    return loss_sum, seen, done


def train_one_round(
    model: nn.Module,
    train_data: ArrayDataset,
    mode: LocalTraining,
    *,
    rng_seed: int | None,
    lr: float,
    momentum: float = 0.0,
    num_threads: int | None = None,
) -> TrainResult:
    """Train a copy of ``model`` on ``train_data`` for one round in ``mode``; return its weights and statistics.

    Raises:
        LocalUsageError: ``lr`` is not positive, the data is empty, or (private modes) the round would exceed
            the privacy budget (nothing was trained or recorded; stop training, the budget is spent).
        ConfigurationError: the training split does not match the budget's ``n_train``, or the model has
            layers Opacus cannot train privately (e.g. BatchNorm: use GroupNorm).
        OSError: the accountant file could not be saved (nothing was trained).
    """
    if not lr > 0:
        raise LocalUsageError(f"lr must be > 0, got {lr}")
    if len(train_data) == 0:
        raise LocalUsageError("empty training data")
    sample_seed, noise_seed = _seeds(rng_seed)
    work = copy.deepcopy(model)
    optimizer = torch.optim.SGD(work.parameters(), lr=lr, momentum=momentum)
    start = time.perf_counter()
    prepared = mode.prepare(
        work, optimizer, _tensors(train_data), sample_seed=sample_seed, noise_seed=noise_seed
    )
    with torch_threads(num_threads):
        loss_sum, seen = _run_steps(prepared.model, prepared.loader, prepared.optimizer, prepared.steps)
    prepared.finish()
    return TrainResult(
        weights=flatten_parameters(work),
        steps=prepared.steps,
        private=mode.private,
        noise_multiplier=mode.noise_multiplier,
        sample_rate=mode.sample_rate,
        epsilon=prepared.epsilon,
        mean_loss=loss_sum / seen if seen else math.nan,
        examples_processed=seen,
        seconds=time.perf_counter() - start,
    )


__all__ = [
    "Contribution",
    "FixedContribution",
    "LocalDpSgd",
    "LocalTraining",
    "NonPrivate",
    "PreparedRound",
    "RoundInputs",
    "TrainResult",
    "TrainingMode",
    "default_num_threads",
    "torch_threads",
    "train_one_round",
]
