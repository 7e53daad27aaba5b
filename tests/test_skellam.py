"""The distributed Skellam mechanism: its sensitivity after rounding, its accountant, its ring.

The accountant is checked three independent ways:
- plugged with the Gaussian mechanism's RDP, the subsampling bound is exactly the sampled Gaussian's RDP at
  integer orders that Opacus computes (Mironov, Talwar & Zhang 2019);
- the subsampling bound is never below the exact Rényi divergence, in either order, of the subsampled
  mixtures of small discrete mechanisms (the bound is a bound);
- the Skellam ε is recomputed here with mpmath at 50 digits from the formulas in the module docstring, and
  approaches the Gaussian ε as the resolution grows (the discretisation surcharge vanishes).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from tessera.csprng import Csprng
from tessera.errors import ConfigurationError
from tessera.skellam import (
    ORDERS,
    SkellamMechanism,
    epsilon,
    log2_wrap_probability,
    plan_noise_multiplier,
    require_no_wrap,
    round_conditionally,
    skellam_rdp,
    subsampled_rdp,
)


@pytest.mark.parametrize(("q", "sigma"), [(0.01, 1.1), (0.125, 5.39), (0.3, 2.0), (1.0, 3.0)])
def test_the_subsampling_bound_with_gaussian_rdp_is_opacus_sampled_gaussian(q: float, sigma: float) -> None:
    orders = list(range(2, 65))
    gaussian = [0.0, 0.0] + [a / (2 * sigma * sigma) for a in range(2, 65)]
    ours = np.array([subsampled_rdp(a, q, gaussian) for a in orders])
    theirs = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


def _divergence(p: np.ndarray, r: np.ndarray, order: int) -> float:
    return math.log(float(np.sum(p**order * r ** (1 - order)))) / (order - 1)


@settings(max_examples=300, deadline=None)
@given(
    p=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4),
    r=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4),
    q=st.floats(0.01, 0.95),
    order=st.integers(2, 8),
)
def test_the_subsampling_bound_bounds_the_exact_divergences_both_ways(p, r, q, order) -> None:
    size = min(len(p), len(r))
    base, shifted = np.array(p[:size]), np.array(r[:size])
    base, shifted = base / base.sum(), shifted / shifted.sum()
    mixture = (1 - q) * base + q * shifted
    # The base mechanism's RDP in both orders, as the bound requires.
    curve = [0.0, 0.0] + [
        max(_divergence(shifted, base, k), _divergence(base, shifted, k)) for k in range(2, order + 1)
    ]
    bound = subsampled_rdp(order, q, curve)
    assert _divergence(mixture, base, order) <= bound + 1e-12
    assert _divergence(base, mixture, order) <= bound + 1e-12


def _mp_epsilon(variance: float, l2: float, l1: float, q: float, steps: int, delta: float) -> float:
    """Independent recomputation at 50 digits: the Skellam RDP, the binomial subsampling bound, the
    Balle et al. conversion."""
    import mpmath as mp

    mp.mp.dps = 50
    v, d2, d1, qq = mp.mpf(variance), mp.mpf(l2), mp.mpf(l1), mp.mpf(q)

    def rdp(a: int):
        return a * d2**2 / (2 * v) + min(((2 * a - 1) * d2**2 + 6 * d1) / (4 * v**2), 3 * d1 / (2 * v))

    best = mp.inf
    for a in ORDERS:
        total = (1 - qq) ** (a - 1) * (1 + (a - 1) * qq)
        for k in range(2, a + 1):
            total += mp.binomial(a, k) * (1 - qq) ** (a - k) * qq**k * mp.e ** ((k - 1) * rdp(k))
        sub = min(mp.log(total) / (a - 1), rdp(a)) * steps
        eps = sub - (mp.log(delta) + mp.log(a)) / (a - 1) + mp.log(mp.mpf(a - 1) / a)
        best = min(best, eps)
    return float(best)


@pytest.mark.parametrize(
    ("resolution", "z", "q", "steps"),
    [(4096.0, 5.39, 0.125, 800), (64.0, 1.0, 0.02, 1500), (16.0, 0.8, 0.3, 50)],
)
def test_the_skellam_epsilon_equals_an_independent_recomputation(resolution, z, q, steps) -> None:
    m = SkellamMechanism(clip=1.0, scale=resolution, dimension=1794, noise_multiplier=z)
    ours = epsilon([m.entry(q, steps)], 1e-5)
    again = _mp_epsilon(m.variance, m.l2_sensitivity, m.l1_sensitivity, q, steps, 1e-5)
    assert ours == pytest.approx(again, rel=1e-7)


def test_the_skellam_epsilon_approaches_the_gaussian_one_as_the_resolution_grows() -> None:
    orders = list(ORDERS)
    gauss, _ = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=0.125, noise_multiplier=5.39, steps=800, orders=orders), delta=1e-5
    )
    gaps = []
    for resolution in (32.0, 512.0, 4096.0, 65536.0):
        m = SkellamMechanism(clip=1.0, scale=resolution, dimension=1794, noise_multiplier=5.39)
        gaps.append(epsilon([m.entry(0.125, 800)], 1e-5) - float(gauss))
    # Never below the Gaussian's: rounding can only add sensitivity and the surcharge is positive...
    assert all(g > -1e-9 for g in gaps)
    # ...and it vanishes: at the default resolution 4096 it is below 1e-5 of epsilon 3.
    assert gaps == sorted(gaps, reverse=True) and gaps[2] < 3e-5


def test_composition_and_merging() -> None:
    m = SkellamMechanism(clip=1.0, scale=4096, dimension=100, noise_multiplier=1.5)
    one = epsilon([m.entry(0.1, 100)], 1e-5)
    split = epsilon([m.entry(0.1, 40), m.entry(0.1, 60)], 1e-5)
    assert one == pytest.approx(split, rel=1e-12)
    assert epsilon([m.entry(0.1, 200)], 1e-5) > one
    assert epsilon([], 1e-5) == 0.0
    assert skellam_rdp(2, variance=m.variance, l2=m.l2_sensitivity, l1=m.l1_sensitivity) == pytest.approx(
        m.rdp(2)
    )


def test_planning_finds_the_smallest_noise_within_the_budget() -> None:
    kw = {"clip": 1.0, "scale": 4096.0, "dimension": 1794, "sample_rate": 0.125, "steps": 600}
    z = plan_noise_multiplier(**kw, target_epsilon=3.0, delta=1e-5)
    at = lambda noise: epsilon(  # noqa: E731
        [SkellamMechanism(clip=1.0, scale=4096.0, dimension=1794, noise_multiplier=noise).entry(0.125, 600)],
        1e-5,
    )
    assert at(z) <= 3.0 < at(z * 0.99)
    with pytest.raises(ConfigurationError, match="no noise multiplier"):
        plan_noise_multiplier(**{**kw, "steps": 10**9}, target_epsilon=0.01, delta=1e-12)


def test_sensitivity_after_rounding_and_conditional_rounding() -> None:
    m = SkellamMechanism(clip=1.0, scale=64.0, dimension=50, noise_multiplier=1.0)
    c, d = 64.0, 50
    beta = 2.0**-20
    expected = math.sqrt(c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2))
    assert m.l2_sensitivity == pytest.approx(min(expected, c + math.sqrt(d)))
    assert m.l1_sensitivity == pytest.approx(m.l2_sensitivity * min(math.sqrt(d), m.l2_sensitivity))
    rng = Csprng(bytes(32))
    # Rows of exactly the clipping norm: every rounded row meets the bound, and the rounding is unbiased.
    rows = np.random.default_rng(0).normal(size=(4000, d))
    rows *= c / np.linalg.norm(rows, axis=1, keepdims=True)
    rounded = round_conditionally(rows, bound_sq=m.rounding_bound_sq, rng=rng)
    assert (np.einsum("ij,ij->i", rounded.astype(float), rounded.astype(float)) <= m.rounding_bound_sq).all()
    assert np.abs(rounded - rows).max() < 1.0
    assert abs(float((rounded - rows).mean())) < 4 * 0.5 / math.sqrt(rows.size)
    # A bound no rounding can meet is reported, not looped on forever.
    from tessera.errors import LocalUsageError

    with pytest.raises(LocalUsageError, match="exceed the rounding bound"):
        round_conditionally(rows[:3], bound_sq=1.0, rng=rng, max_attempts=3)


def test_the_ring_has_room_and_a_configuration_that_could_wrap_is_refused() -> None:
    m = SkellamMechanism(clip=1.0, scale=4096.0, dimension=30_000, noise_multiplier=2.0)
    # 200 members of up to 65,535 records, noise variance for 200 shares sized for a threshold of 2.
    log2_p = require_no_wrap(m, records=200 * 65_535, noise_variance=200 * m.variance / 2)
    assert log2_p < -1e9
    with pytest.raises(ConfigurationError, match="wrap around"):
        require_no_wrap(
            SkellamMechanism(clip=1.0, scale=2.0**20, dimension=10, noise_multiplier=1.0),
            records=2**44,
            noise_variance=1.0,
        )
    assert log2_wrap_probability(m, records=0, noise_variance=0.0) == -math.inf
    with pytest.raises(ConfigurationError, match="no honest survivor"):
        m.share_variance(threshold=2, colluders=2)
    assert m.share_variance(threshold=4, colluders=1) == pytest.approx(m.variance / 3)
