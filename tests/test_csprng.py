"""The DP noise and sampling generator: AES-256-CTR bits, and samplers with the distributions they claim.

Goodness of fit by chi-square tests against the exact probability mass functions (scipy.stats) at a fixed
seed: a sampler with a wrong distribution fails them (the significance level 1e-4 makes a false alarm at a
fixed seed impossible to hit by chance on later runs: the seed fixes the sample).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from tessera.csprng import Csprng

SEED = bytes(range(32))


def _chi(sample: np.ndarray, pmf, low: int, high: int) -> float:
    """p-value of a chi-square test of ``sample`` against ``pmf`` on the bins low..high, tails pooled."""
    edges = np.arange(low, high + 1)
    inner = pmf(edges)
    below = sum_pmf_below(pmf, low)
    above = 1.0 - below - inner.sum()
    expected = np.array([below, *inner, above]) * sample.size
    observed = np.array([(sample < low).sum(), *((sample == k).sum() for k in edges), (sample > high).sum()])
    keep = expected > 5  # the chi-square approximation needs it; pooled tails usually qualify
    return float(
        stats.chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue
    )


def sum_pmf_below(pmf, low: int) -> float:
    return float(pmf(np.arange(low - 10**5, low)).sum()) if low > -(10**5) else 0.0


@pytest.mark.parametrize("lam", [0.3, 2.5, 9.9, 10.0, 37.5, 400.0, 1.0e5])
def test_poisson_matches_its_distribution(lam: float) -> None:
    n = 1_000_000
    sample = Csprng(SEED).poisson(lam, n)
    spread = int(5 * np.sqrt(lam)) + 5
    low, high = max(0, int(lam) - spread), int(lam) + spread
    assert _chi(sample, lambda k: stats.poisson.pmf(k, lam), low, high) > 1e-4
    # Four standard errors: a bias of a few hundredths (a wrong constant in the rejection sampler) fails.
    assert abs(sample.mean() - lam) < 4 * np.sqrt(lam / n)
    assert abs(sample.var() - lam) < 4 * np.sqrt((2 * lam * lam + lam) / n)


@pytest.mark.parametrize("variance", [3.0, 80.0, 2.0e4])
def test_skellam_matches_its_distribution_and_moments(variance: float) -> None:
    sample = Csprng(SEED).skellam(variance, 200_000)
    half = variance / 2
    spread = int(5 * np.sqrt(variance)) + 3
    assert _chi(sample, lambda k: stats.skellam.pmf(k, half, half), -spread, spread) > 1e-4
    assert abs(sample.mean()) < 5 * np.sqrt(variance / sample.size)
    assert sample.var() == pytest.approx(variance, rel=0.02)
    # Excess kurtosis of a symmetric Skellam of variance v is 1 / v.
    assert stats.kurtosis(sample) == pytest.approx(1 / variance, abs=0.05)


def test_uniform_and_bernoulli() -> None:
    rng = Csprng(SEED)
    u = rng.uniform(200_000)
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    p = np.linspace(0, 1, 11).repeat(20_000)
    b = rng.bernoulli(p)
    assert np.allclose([b[p == v].mean() for v in np.unique(p)], np.unique(p), atol=0.012)
    assert not b[p == 0].any() and b[p == 1].all()
    z = rng.normal(200_000)
    assert stats.kstest(z, "norm").pvalue > 1e-4


def test_a_seed_fixes_the_stream_and_none_draws_a_fresh_one() -> None:
    a, b = Csprng(SEED), Csprng(SEED)
    assert a.bytes(100) == b.bytes(40) + b.bytes(60)
    assert not np.array_equal(Csprng().uint64(4), Csprng().uint64(4))
    with pytest.raises(ValueError):
        Csprng(b"short")
    with pytest.raises(ValueError):
        Csprng(SEED).poisson(-1.0, 3)
