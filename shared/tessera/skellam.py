"""The distributed Skellam mechanism of distributed DP-SGD, in the integers of the secure-aggregation ring.

One DP-SGD step of the federation is one secure aggregation. Each organisation i Poisson-samples its own
records at rate q_i, clips each record's gradient to L2 norm C, scales it by γ and rounds it to integers
(conditional randomised rounding, :func:`round_conditionally`), sums the rounded vectors, adds its share of
Skellam noise and submits the sum. Secure aggregation reveals only the total: the sum of all sampled
records' rounded gradients plus Skellam noise of variance at least μ in every coordinate.

Privacy of one record (of organisation i), per step
---------------------------------------------------
Adding or removing the record changes the integer sum by that record's rounded vector x, whatever the other
records and organisations do. Conditional rounding guarantees ``||x||_2 <= Δ2`` (:attr:`SkellamMechanism.
l2_sensitivity`), after Kairouz, Liu & Steinke (ICML 2021, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", the conditional randomised rounding lemma):
``||R(v)||_2^2 <= ||v||_2^2 + d/4 + sqrt(2 ln(1/β)) (||v||_2 + sqrt(d)/2)`` with probability >= 1 - β, so
rounding is repeated until the bound holds (and ``||R(v)||_2 <= ||v||_2 + sqrt(d)`` always). For integer
vectors ``||x||_1 <= min(||x||_2^2, sqrt(d) ||x||_2)``, which bounds Δ1.

The multi-dimensional Skellam mechanism with per-coordinate variance μ (each coordinate Poisson(μ/2) −
Poisson(μ/2)) and sensitivities Δ1, Δ2 is (α, ε(α))-RDP for every integer α > 1 with

    ε(α) = α Δ2² / (2μ) + min( ((2α − 1) Δ2² + 6 Δ1) / (4μ²),  3 Δ1 / (2μ) )

(Agarwal, Kairouz & Liu, "The Skellam Mechanism for Differentially Private Federated Learning", NeurIPS
2021, their RDP bound for the multi-dimensional Skellam mechanism; the same form is used by the authors' and
Dordis' accounting code). Its first term is exactly the Gaussian mechanism's with σ² = μ: with μ = (z Δ2)² the
mechanism behaves like DP-SGD with noise multiplier z, plus a discretisation surcharge that vanishes as γ
grows.

The record is in the step's batch with probability q_i (Poisson sampling at its own organisation). The RDP
of the Poisson-subsampled mechanism is bounded, for every integer order α, by

    ε'(α) <= 1/(α−1) log( (1−q)^(α−1) (1 + (α−1) q) + Σ_{k=2..α} C(α,k) (1−q)^(α−k) q^k e^((k−1) ε(k)) )

(Steinke, "Composition of Differential Privacy & Privacy Amplification by Subsampling", arXiv:2210.00597,
the Poisson-subsampling theorem for Rényi DP under addition or removal of one record). It needs ε(k) to bound
the base mechanism's Rényi divergence in both orders, which holds for the Skellam mechanism: its noise is
symmetric, so shifting by x or by −x gives the same divergences. For the Gaussian mechanism the formula is
exactly the sampled Gaussian's RDP at integer orders (Mironov, Talwar & Zhang 2019) that Opacus computes,
which the tests check; the tests also check it against exact Rényi divergences of subsampled mixtures of
small discrete distributions. (Zhu & Wang's general bound, ICML 2019 Theorem 6, holds without the symmetry
but carries a factor 3 on the terms k >= 3: at q = 0.125 and ε = 3 it needs a noise multiplier several
times larger, which is why it is not used.) The bound is never taken above ε(α) itself.
Steps compose by adding RDP; (ε, δ) follows with the conversion Opacus uses (Balle et al., AISTATS 2020,
Theorem 21).

Noise that survives dropouts and collusion
------------------------------------------
An aggregation completes only with at least ``t`` survivors (the threshold; below it secure aggregation
aborts and nothing is released). Up to ``T`` of them may collude with the curator and subtract their own
noise. Each organisation therefore adds Skellam noise of variance ``μ / (t − T)``: any completed aggregation
holds at least ``t − T`` honest shares, whose sum is Skellam of variance >= μ (sums of independent Skellam
variables are Skellam). With all n invited surviving the sum carries ``n / (t − T)`` times μ (reported as the
surplus).

The ring
--------
The sum must not wrap around modulo 2^64. Every rounded coordinate has magnitude at most ``γC + 1``, so the
records' part of a coordinate is at most ``N (γC + 1)`` for N records in all; the noise's tail is bounded by
Chernoff's inequality with the Skellam moment generating function E[e^(λX)] = e^(μ(cosh λ − 1)):
``P(|X| >= s) <= 2 e^(μ(cosh λ − 1) − λ s)``. :func:`wrap_probability` evaluates the union bound over the
coordinates; configurations are refused unless it is below 2^-128.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from opacus.accountants.analysis.rdp import get_privacy_spent  # the RDP -> (ε, δ) conversion only
from scipy.special import gammaln, logsumexp

from tessera.csprng import Csprng
from tessera.errors import ConfigurationError, LocalUsageError

ORDERS: tuple[int, ...] = (*range(2, 65), *range(72, 257, 8))
"""Integer RDP orders: the subsampling bound above holds for integer α only."""

RING_BITS = 64
MAX_WRAP_PROBABILITY = 2.0**-128


@dataclass(frozen=True, kw_only=True)
class SkellamMechanism:
    """One step of distributed DP-SGD in integer units: clip ``clip``, scale ``scale`` (integer units per
    gradient unit), ``dimension`` coordinates, aggregate noise of standard deviation ``noise_multiplier × Δ2``.
    """

    clip: float
    scale: float
    dimension: int
    noise_multiplier: float
    beta: float = 2.0**-20  # conditional rounding: the bound each attempt meets with probability >= 1 - β

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigurationError(f"clip must be > 0, got {self.clip}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigurationError(f"scale must be > 0, got {self.scale}")
        if self.dimension < 1:
            raise ConfigurationError(f"dimension must be >= 1, got {self.dimension}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigurationError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.beta < 1:
            raise ConfigurationError(f"beta must be in (0, 1), got {self.beta}")

    @property
    def l2_sensitivity(self) -> float:
        """Δ2: the largest L2 norm of one record's rounded, scaled, clipped gradient."""
        c, d = self.scale * self.clip, self.dimension
        always = c + math.sqrt(d)
        conditional = math.sqrt(
            c * c + d / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (c + math.sqrt(d) / 2)
        )
        return min(always, conditional)

    @property
    def rounding_bound_sq(self) -> float:
        """The squared norm conditional rounding enforces (only when it is below the unconditional one)."""
        return self.l2_sensitivity**2

    @property
    def l1_sensitivity(self) -> float:
        """Δ1 <= min(Δ2², sqrt(d) Δ2) for integer vectors."""
        d2 = self.l2_sensitivity
        return d2 * min(math.sqrt(self.dimension), d2)

    @property
    def variance(self) -> float:
        """μ: the aggregate noise variance per coordinate, in integer units."""
        return (self.noise_multiplier * self.l2_sensitivity) ** 2

    def share_variance(self, *, threshold: int, colluders: int) -> float:
        """The noise variance one organisation adds so that any ``threshold`` survivors, ``colluders`` of whom
        may subtract their own, still carry μ."""
        honest = threshold - colluders
        if honest < 1:
            raise ConfigurationError(
                f"threshold {threshold} with {colluders} colluders leaves no honest survivor to carry the noise"
            )
        return self.variance / honest

    def rdp(self, alpha: int) -> float:
        """ε(α) of one unsampled step (Agarwal, Kairouz & Liu 2021)."""
        mu, d1, d2 = self.variance, self.l1_sensitivity, self.l2_sensitivity
        return alpha * d2 * d2 / (2 * mu) + min(
            ((2 * alpha - 1) * d2 * d2 + 6 * d1) / (4 * mu * mu), 3 * d1 / (2 * mu)
        )

    def entry(self, sample_rate: float, steps: int) -> tuple[float, float, float, float, int]:
        """The accountant history entry of ``steps`` steps at ``sample_rate``: (μ, Δ2, Δ1, q, steps)."""
        return (self.variance, self.l2_sensitivity, self.l1_sensitivity, float(sample_rate), int(steps))


def skellam_rdp(alpha: int, *, variance: float, l2: float, l1: float) -> float:
    return alpha * l2 * l2 / (2 * variance) + min(
        ((2 * alpha - 1) * l2 * l2 + 6 * l1) / (4 * variance * variance), 3 * l1 / (2 * variance)
    )


def subsampled_rdp(alpha: int, q: float, rdp_of: Sequence[float]) -> float:
    """RDP at integer order ``alpha`` of the Poisson-subsampled mechanism (rate ``q``) whose RDP at orders
    2..alpha, in both orders of every neighbouring pair, is ``rdp_of[k]`` (indexed by the order; 0 and 1
    unused): the binomial bound of Steinke (2022), never above ``rdp_of[alpha]``."""
    if alpha < 2:
        raise LocalUsageError("subsampled_rdp needs an integer order >= 2")
    if not 0 < q <= 1:
        raise LocalUsageError(f"sample rate must be in (0, 1], got {q}")
    if q == 1:
        return rdp_of[alpha]
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [(alpha - 1) * log_1q + math.log1p((alpha - 1) * q)]
    for order in range(2, alpha + 1):
        terms.append(
            _log_comb(alpha, order) + order * log_q + (alpha - order) * log_1q + (order - 1) * rdp_of[order]
        )
    return min(float(logsumexp(terms)) / (alpha - 1), rdp_of[alpha])


def _log_comb(n: int, k: int) -> float:
    return float(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))


SkellamEntry = tuple[float, float, float, float, int]
"""(variance μ, Δ2, Δ1, sample rate q, steps)."""


def rdp_curve(history: Sequence[SkellamEntry], orders: Sequence[int] = ORDERS) -> npt.NDArray[np.float64]:
    """Composed RDP of a history of Poisson-subsampled Skellam steps, at each order."""
    total = np.zeros(len(orders))
    for variance, l2, l1, q, steps in history:
        total += steps * _step_curve(float(variance), float(l2), float(l1), float(q), tuple(orders))
    return total


@functools.lru_cache(maxsize=256)
def _step_curve(
    variance: float, l2: float, l1: float, q: float, orders: tuple[int, ...]
) -> npt.NDArray[np.float64]:
    # One step's RDP at every order; cached because a history repeats the same step hundreds of times and
    # the accountant is asked before and after every one of them.
    top = max(orders)
    unsampled = [0.0, 0.0] + [skellam_rdp(a, variance=variance, l2=l2, l1=l1) for a in range(2, top + 1)]
    curve = np.array([subsampled_rdp(a, q, unsampled) for a in orders])
    curve.setflags(write=False)
    return curve


def epsilon(history: Sequence[SkellamEntry], delta: float, orders: Sequence[int] = ORDERS) -> float:
    """(ε, δ) of a history: the RDP curve converted as Opacus converts (Balle et al. 2020); 0 if empty."""
    if not history:
        return 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = get_privacy_spent(orders=list(orders), rdp=list(rdp_curve(history, orders)), delta=delta)
    return float(eps)


def plan_noise_multiplier(
    *,
    clip: float,
    scale: float,
    dimension: int,
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    tolerance: float = 1e-3,
) -> float:
    """The smallest noise multiplier z (to ``tolerance`` relative) for which ``steps`` steps at
    ``sample_rate`` stay within ``target_epsilon`` at ``delta``. ConfigurationError if none up to 1000 does."""

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigurationError(f"steps must be a positive integer, got {steps!r}")
    if not 0 < sample_rate <= 1:
        raise ConfigurationError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigurationError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ConfigurationError(f"delta must be in (0, 1), got {delta}")
    SkellamMechanism(clip=clip, scale=scale, dimension=dimension, noise_multiplier=1.0)  # validates the rest

    def eps_at(z: float) -> float:
        m = SkellamMechanism(clip=clip, scale=scale, dimension=dimension, noise_multiplier=z)
        return epsilon([m.entry(sample_rate, steps)], delta)

    low, high = 0.05, 1.0
    while eps_at(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1000:
            raise ConfigurationError(
                f"no noise multiplier up to 1000 keeps {steps} steps at sample rate {sample_rate:.4g} within "
                f"epsilon {target_epsilon} at delta {delta}: plan fewer steps or a lower sample rate"
            )
    while (high - low) / high > tolerance:
        middle = (low + high) / 2
        if eps_at(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


def log2_wrap_probability(
    mechanism: SkellamMechanism, *, records: int, noise_variance: float, ring_bits: int = RING_BITS
) -> float:
    """log2 of an upper bound on the probability that one aggregated vector wraps around modulo 2^ring_bits:
    ``records`` rounded vectors (each coordinate at most γC + 1 in magnitude) plus Skellam noise of
    ``noise_variance`` per coordinate, union-bounded over the coordinates. ``-inf`` when no wrap is possible."""
    data = records * (mechanism.scale * mechanism.clip + 1)
    room = 2.0 ** (ring_bits - 1) - 1 - data
    if room <= 0:
        return 0.0
    if noise_variance <= 0:
        return -math.inf
    # Chernoff with the Skellam MGF, minimised over λ at λ* = asinh(s/μ), where cosh λ* = sqrt(1 + (s/μ)²).
    ratio = room / noise_variance
    log_tail = noise_variance * (math.sqrt(1 + ratio * ratio) - 1) - room * math.asinh(ratio)
    return (math.log(2 * mechanism.dimension) + log_tail) / math.log(2)


def require_no_wrap(mechanism: SkellamMechanism, *, records: int, noise_variance: float) -> float:
    """Refuse (ConfigurationError) a federation whose aggregate could wrap around the 64-bit ring with
    probability above :data:`MAX_WRAP_PROBABILITY`; returns log2 of the bound otherwise."""
    log2_p = log2_wrap_probability(mechanism, records=records, noise_variance=noise_variance)
    if log2_p > math.log2(MAX_WRAP_PROBABILITY):
        raise ConfigurationError(
            f"the aggregate of {records} records could wrap around the {RING_BITS}-bit ring (probability up to "
            f"2^{log2_p:.1f}): lower the resolution or the largest member size (layout.max_weight)"
        )
    return log2_p


def round_conditionally(
    scaled: npt.NDArray[np.float64], *, bound_sq: float, rng: Csprng, max_attempts: int = 64
) -> npt.NDArray[np.int64]:
    """Randomised rounding of each row of ``scaled`` (up with probability equal to the fractional part),
    repeated for any row whose squared L2 norm after rounding exceeds ``bound_sq`` (Kairouz et al. 2021).

    Raises LocalUsageError if a row still exceeds the bound after ``max_attempts`` (only possible when the
    row's own norm is above the bound: the caller clipped wrongly).
    """
    floor = np.floor(scaled)
    frac = scaled - floor
    out = floor.astype(np.int64)
    out += rng.bernoulli(frac)
    pending = np.flatnonzero(_row_norms_sq(out) > bound_sq)
    attempts = 1
    while pending.size:
        if attempts >= max_attempts:
            raise LocalUsageError(f"{pending.size} rows exceed the rounding bound after {attempts} attempts")
        retry = floor[pending].astype(np.int64) + rng.bernoulli(frac[pending])
        out[pending] = retry
        pending = pending[_row_norms_sq(retry) > bound_sq]
        attempts += 1
    return out


def _row_norms_sq(rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    as_float = rows.astype(np.float64)
    norms: npt.NDArray[np.float64] = np.einsum("ij,ij->i", as_float, as_float)
    return norms


__all__ = [
    "MAX_WRAP_PROBABILITY",
    "ORDERS",
    "SkellamEntry",
    "SkellamMechanism",
    "epsilon",
    "log2_wrap_probability",
    "plan_noise_multiplier",
    "rdp_curve",
    "require_no_wrap",
    "round_conditionally",
    "skellam_rdp",
    "subsampled_rdp",
]
