"""The submitted vector's layout: secure sums decode to the sample-weighted average and exact counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.errors import ConfigurationError, LocalUsageError
from tessera.evaluation import EvalCounts
from tessera.fedavg import UpdateLayout, largest_value_bits


def _layout(params: int = 50, classes: int = 3, ring: int = 32, participants: int = 8) -> UpdateLayout:
    return UpdateLayout(
        num_params=params,
        num_classes=classes,
        clip=0.5,
        ring_bits=32 if ring == 32 else 64,
        value_bits=largest_value_bits(
            ring_bits=32 if ring == 32 else 64, max_weight=5000, max_participants=participants
        ),
        max_weight=5000,
        max_participants=participants,
    )


def _counts(rng: np.random.Generator, classes: int, n: int) -> EvalCounts:
    confusion = rng.multinomial(n, np.ones(classes * classes) / classes**2).reshape(classes, classes)
    return EvalCounts(int(np.trace(confusion)), n, float(rng.uniform(0, 3 * n)), confusion.astype(np.int64))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.sampled_from([32, 64]), st.integers(0, 2**32))
def test_sum_of_vectors_decodes_to_weighted_mean_and_exact_counts(k: int, ring: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    layout = _layout(ring=ring)
    weights = rng.integers(1, 5001, k)
    updates = rng.uniform(-0.4, 0.4, (k, layout.num_params))
    evals = [_counts(rng, 3, int(rng.integers(0, 3000))) for _ in range(k)]
    epsilons = rng.uniform(0, 10, k)
    total = np.zeros(layout.length, dtype=np.uint32 if ring == 32 else np.uint64)
    for i in range(k):
        vector, clipped = layout.encode(
            updates[i], weight=int(weights[i]), evaluation=evals[i], epsilon=float(epsilons[i]), rng=rng
        )
        assert clipped == 0 and vector.shape == (layout.length,)
        total += vector
    out = layout.decode(total)
    assert out.total_weight == weights.sum()
    expected_mean = (weights[:, None] * updates).sum(axis=0) / weights.sum()
    step = layout.clip / (2 ** (layout.value_bits - 1) - 1)
    assert np.abs(out.mean_update - expected_mean).max() <= step * 1.0001
    assert out.evaluation.correct == sum(e.correct for e in evals)
    assert out.evaluation.total == sum(e.total for e in evals)
    assert np.array_equal(out.evaluation.confusion, sum(e.confusion for e in evals))
    assert out.evaluation.loss_sum == pytest.approx(sum(e.loss_sum for e in evals), abs=k * 1e-3)
    assert out.epsilon_sum == pytest.approx(epsilons.sum(), abs=k * 1e-4)
    assert out.non_private == 0 and out.clipped == 0


def test_counts_larger_than_one_coordinate_still_sum_exactly() -> None:
    layout = _layout(ring=32, participants=8)
    limit = layout.quantizer.max_integer
    rng = np.random.default_rng(0)
    big = limit * 50
    evaluation = EvalCounts(big, big, 0.0, np.diag([big, 0, 0]).astype(np.int64))
    total = np.zeros(layout.length, dtype=np.uint32)
    for _ in range(3):
        total += layout.encode(np.zeros(50), weight=1, evaluation=evaluation, epsilon=None, rng=rng)[0]
    out = layout.decode(total)
    assert out.evaluation.correct == 3 * big and out.evaluation.confusion[0, 0] == 3 * big
    assert out.non_private == 3


def test_clipping_is_counted_and_bad_shapes_rejected() -> None:
    layout = _layout()
    rng = np.random.default_rng(1)
    update = np.zeros(50)
    update[:7] = 9.0
    zero = EvalCounts.zero(3)
    vector, clipped = layout.encode(update, weight=2, evaluation=zero, epsilon=1.0, rng=rng)
    assert clipped == 7
    assert layout.decode(vector).clipped == 7
    with pytest.raises(LocalUsageError, match="expects \\(50,\\)"):
        layout.encode(np.zeros(49), weight=1, evaluation=zero, epsilon=1.0, rng=rng)
    with pytest.raises(LocalUsageError, match="3x3"):
        layout.encode(update, weight=1, evaluation=EvalCounts.zero(2), epsilon=1.0, rng=rng)
    with pytest.raises(LocalUsageError, match="expects"):
        layout.decode(vector[:-1])


def test_a_budget_that_could_overflow_is_rejected_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="32-bit ring"):
        UpdateLayout(
            num_params=5,
            num_classes=2,
            clip=1.0,
            ring_bits=32,
            value_bits=20,
            max_weight=10_000,
            max_participants=100,
        )
