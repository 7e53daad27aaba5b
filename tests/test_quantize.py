"""Tests for tessera.quantize: the bit budget, fixed-point encoding and two's complement decoding."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tessera.errors import ConfigurationError, LocalUsageError
from tessera.quantize import MAX_VALUE_BITS, BitBudget, Quantizer, RingBits

RINGS: tuple[RingBits, RingBits] = (32, 64)


def choose_ring_bits(budget: BitBudget) -> RingBits:
    """The smallest ring (32 or 64 bits) that fits ``budget``; :class:`ConfigurationError` if none does."""
    if budget.required_ring_bits <= 32:
        return 32
    budget.check(64)  # raises with the arithmetic if even 64 bits are too few
    return 64


def ring_sum(vectors: list[npt.NDArray[Any]], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """What the curator gets after unmasking: the element-wise sum mod R (numpy's unsigned sum wraps)."""
    total: npt.NDArray[Any] = np.sum(np.stack(vectors), axis=0, dtype=dtype)
    return total


def ring_sum_of_copies(vector: npt.NDArray[Any], copies: int) -> npt.NDArray[Any]:
    """The sum mod R of ``copies`` identical vectors (multiplication wraps exactly like repeated addition)."""
    total: npt.NDArray[Any] = vector * vector.dtype.type(copies)
    return total


def quantizer(value_bits: int = 16, max_weight: int = 1, max_participants: int = 1, clip: float = 1.0,
              ring_bits: RingBits = 64) -> Quantizer:  # fmt: skip
    budget = BitBudget(value_bits=value_bits, max_weight=max_weight, max_participants=max_participants)
    return Quantizer(clip=clip, budget=budget, ring_bits=ring_bits)


# --- The bit budget ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value_bits", "max_weight", "max_participants", "required"),
    [
        (20, 10_000, 100, 20 + 14 + 7 + 1),
        (2, 1, 1, 2 + 1 + 0 + 1),  # bits(1) = 1, ceil(log2(1)) = 0
        (16, 2, 2, 16 + 2 + 1 + 1),
        (16, 255, 3, 16 + 8 + 2 + 1),
        (16, 256, 4, 16 + 9 + 2 + 1),
        (16, 1, 5, 16 + 1 + 3 + 1),
        (16, 1, 1024, 16 + 1 + 10 + 1),
        (16, 1, 1025, 16 + 1 + 11 + 1),
    ],
)
def test_required_ring_bits_follows_the_formula(
    value_bits: int, max_weight: int, max_participants: int, required: int
) -> None:
    budget = BitBudget(value_bits=value_bits, max_weight=max_weight, max_participants=max_participants)
    assert budget.required_ring_bits == required


def test_choose_ring_bits_picks_the_smallest_ring_that_fits() -> None:
    assert choose_ring_bits(BitBudget(value_bits=16, max_weight=1000, max_participants=32)) == 32  # 32 bits
    assert choose_ring_bits(BitBudget(value_bits=16, max_weight=1000, max_participants=33)) == 64  # 33 bits
    assert choose_ring_bits(BitBudget(value_bits=40, max_weight=4095, max_participants=2048)) == 64  # 64 bits
    with pytest.raises(ConfigurationError, match=r"= 65 > 64-bit ring"):
        choose_ring_bits(BitBudget(value_bits=40, max_weight=4095, max_participants=2049))


def test_check_explains_the_arithmetic() -> None:
    budget = BitBudget(value_bits=20, max_weight=10_000, max_participants=100)
    message = (
        "value_bits 20 + weight bits 14 + participant bits 7 + 1 sign = 42 > 32-bit ring; "
        "lower value_bits or use a 64-bit ring"
    )
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        budget.check(32)
    budget.check(64)


# A budget that fits its ring exactly, and the same budget with one of its three terms one bit larger.
FITS_EXACTLY = {
    32: {"value_bits": 16, "max_weight": 1023, "max_participants": 32},  # 16 + 10 + 5 + 1 = 32
    64: {"value_bits": 40, "max_weight": 4095, "max_participants": 2048},  # 40 + 12 + 11 + 1 = 64
}


@pytest.mark.parametrize("ring_bits", RINGS)
@pytest.mark.parametrize("field", ["value_bits", "max_weight", "max_participants"])
def test_a_budget_one_bit_too_large_is_rejected_at_construction(ring_bits: RingBits, field: str) -> None:
    fits = FITS_EXACTLY[ring_bits]
    Quantizer(clip=1.0, budget=BitBudget(**fits), ring_bits=ring_bits)  # accepted: exactly ring_bits

    too_large = dict(fits)
    too_large[field] += 1  # 1023 -> 1024 and 2048 -> 2049 each take one more bit
    budget = BitBudget(**too_large)
    expected = (
        f"value_bits {too_large['value_bits']} + weight bits {too_large['max_weight'].bit_length()} + "
        f"participant bits {(too_large['max_participants'] - 1).bit_length()} + 1 sign = {ring_bits + 1} > "
        f"{ring_bits}-bit ring"
    )
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        Quantizer(clip=1.0, budget=budget, ring_bits=ring_bits)


@st.composite
def extreme_budgets(draw: st.DrawFn) -> tuple[RingBits, BitBudget]:
    """A ring and a budget that fills it exactly, with the weight and participant count at their extremes."""
    ring_bits: RingBits = draw(st.sampled_from(RINGS))
    value_bits = draw(st.integers(2, min(MAX_VALUE_BITS, ring_bits - 2)))
    weight_bits = draw(st.integers(1, ring_bits - 1 - value_bits))
    participant_bits = ring_bits - 1 - value_bits - weight_bits
    max_weight = draw(st.sampled_from([2**weight_bits - 1, 2 ** (weight_bits - 1)]))
    max_participants = draw(
        st.sampled_from([2**participant_bits, 2 ** (participant_bits - 1) + 1] if participant_bits else [1])
    )
    budget = BitBudget(value_bits=value_bits, max_weight=max_weight, max_participants=max_participants)
    return ring_bits, budget


@settings(max_examples=300, deadline=None)
@given(extreme_budgets())
def test_the_extreme_sum_never_wraps(case: tuple[RingBits, BitBudget]) -> None:
    """max_participants participants, all at +max (or all at -max) with max weight, decode exactly."""
    ring_bits, budget = case
    assert budget.required_ring_bits == ring_bits  # the strategy fills the ring exactly
    q = Quantizer(clip=1.0, budget=budget, ring_bits=ring_bits)  # accepted
    n = budget.max_participants
    rng = np.random.default_rng(0)

    # Quantised floats at +-clip: each participant sends +-max_level * max_weight.
    encoded = q.encode(np.array([1.0, -1.0, 5.0, -math.inf]), weight=budget.max_weight, rng=rng)
    total = q.decode_integers(ring_sum_of_copies(encoded.values, n))
    extreme = n * q.max_level * budget.max_weight
    assert [int(v) for v in total] == [extreme, -extreme, extreme, -extreme]
    assert q.decode_sum(ring_sum_of_copies(encoded.values, n)) == pytest.approx(
        [n * budget.max_weight, -n * budget.max_weight] * 2, rel=1e-12
    )

    # Exact integers at the per-participant limit 2^(value_bits-1) * max_weight - 1.
    limit = 2 ** (budget.value_bits - 1) * budget.max_weight - 1
    assert q.max_integer == limit
    integers = q.encode_integers(np.array([limit, -limit, 0], dtype=np.int64))
    total = q.decode_integers(ring_sum_of_copies(integers, n))
    assert [int(v) for v in total] == [n * limit, -n * limit, 0]


# --- Encoding and decoding -----------------------------------------------------------------------------


@st.composite
def federations(draw: st.DrawFn) -> tuple[Quantizer, list[npt.NDArray[np.float64]], list[int]]:
    """A quantiser whose budget fits its ring, and participants' vectors and weights within that budget."""
    ring_bits: RingBits = draw(st.sampled_from(RINGS))
    n = draw(st.integers(1, 6))
    participant_bits = (n - 1).bit_length()
    value_bits = draw(st.integers(2, min(MAX_VALUE_BITS, ring_bits - 2 - participant_bits)))
    weight_bits = draw(st.integers(1, ring_bits - 1 - participant_bits - value_bits))
    max_weight = draw(st.integers(2 ** (weight_bits - 1), 2**weight_bits - 1))
    clip = draw(st.floats(1e-3, 1e3))
    budget = BitBudget(value_bits=value_bits, max_weight=max_weight, max_participants=n)
    q = Quantizer(clip=clip, budget=budget, ring_bits=ring_bits)
    m = draw(st.integers(0, 20))
    element = st.floats(allow_nan=False, allow_infinity=True) | st.floats(-2 * clip, 2 * clip)
    xs = [draw(hnp.arrays(np.float64, m, elements=element)) for _ in range(n)]
    weights = [draw(st.integers(1, max_weight)) for _ in range(n)]
    return q, xs, weights


@settings(max_examples=200, deadline=None)
@given(federations(), st.integers(0, 2**32 - 1))
def test_sum_of_encodings_decodes_to_the_weighted_sum_within_the_quantisation_error(
    case: tuple[Quantizer, list[npt.NDArray[np.float64]], list[int]], seed: int
) -> None:
    q, xs, weights = case
    rng = np.random.default_rng(seed)
    encoded = [q.encode(x, weight=w, rng=rng) for x, w in zip(xs, weights, strict=True)]
    assert all(e.values.dtype == q.dtype for e in encoded)
    decoded = q.decode_sum(ring_sum([e.values for e in encoded], q.dtype))

    expected = sum(
        (w * np.clip(x, -q.clip, q.clip) for x, w in zip(xs, weights, strict=True)), np.zeros_like(xs[0])
    )
    # Each participant's integer is within one step of w * x * scale (stochastic rounding), plus the float
    # rounding of x * scale, which reaches 2^(value_bits-54) steps when value_bits approaches 53. The last
    # term covers the float rounding of the reference sum and of the final division.
    sum_w = sum(weights)
    steps = sum_w * (1 + 2.0 ** (q.budget.value_bits - 53))
    assert sum_w <= q.budget.max_participants * q.budget.max_weight
    tolerance = steps / q.scale + 2.0**-45 * sum_w * q.clip
    np.testing.assert_allclose(decoded, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("ring_bits", RINGS)
@pytest.mark.parametrize("level", [10.3, 10.5, 10.9, -10.3, -0.7])
def test_stochastic_rounding_is_unbiased(ring_bits: RingBits, level: float) -> None:
    """Many encodings of a value between two grid points average to the value.

    Each coordinate rounds to floor(level) or floor(level) + 1, a Bernoulli(frac) trial: standard deviation
    at most 0.5 step, so the mean of 200,000 independent trials has a standard deviation of at most
    0.5 / sqrt(200,000) ≈ 0.0011 step. A tolerance of 0.01 step is 9 standard deviations (a false failure has
    probability < 1e-18, and the seed is fixed anyway), while any biased rounding (floor, ceil, to nearest,
    towards zero) is off by at least 0.1 step for these levels.
    """
    q = quantizer(value_bits=8, max_weight=3, ring_bits=ring_bits, clip=2.0)
    x = np.full(200_000, level / q.scale)
    integers = q.decode_integers(q.encode(x, weight=3, rng=np.random.default_rng(1234)).values)
    assert set(np.unique(integers).tolist()) == {3 * math.floor(level), 3 * math.floor(level) + 3}
    assert np.mean(integers) / 3 == pytest.approx(level, abs=0.01)
    decoded = q.decode_sum(q.encode(x, weight=1, rng=np.random.default_rng(99)).values)
    assert np.mean(decoded) * q.scale == pytest.approx(level, abs=0.01)


def test_a_value_on_the_grid_is_encoded_exactly_and_the_input_is_not_modified() -> None:
    q = quantizer(value_bits=8, clip=1.0)
    x = np.array([0.0, 1 / 127, -5 / 127, 0.5, -2.0])
    before = x.copy()
    encoded = q.encode(x, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(x, before)
    assert q.decode_integers(encoded.values).tolist()[:3] == [0, 1, -5]


CLIP_CASES = [
    # (values, how many are clipped); clip = 0.37
    ([0.1, -0.2, 0.37, -0.37], 0),  # the end points are inside the range
    ([0.5, -0.5, 1e300, -1e300], 4),
    ([math.nan, 0.0, math.nan], 2),
    ([math.inf, -math.inf, 0.36, math.nan, 0.38], 4),
    ([], 0),
]


@pytest.mark.parametrize("ring_bits", RINGS)
@pytest.mark.parametrize(("values", "clipped"), CLIP_CASES)
def test_clipping_count_is_exact_and_clipped_values_decode_to_the_clip(
    ring_bits: RingBits, values: list[float], clipped: int
) -> None:
    q = quantizer(value_bits=24, clip=0.37, ring_bits=ring_bits)
    x = np.array(values, dtype=np.float64)
    encoded = q.encode(x, rng=np.random.default_rng(5))
    assert encoded.clipped == clipped
    decoded = q.decode_sum(encoded.values)
    integers = q.decode_integers(encoded.values)
    for value, got, level in zip(values, decoded, integers, strict=True):
        if math.isnan(value):
            assert level == 0  # NaN is encoded as 0
        elif abs(value) > 0.37:
            assert level == math.copysign(q.max_level, value)  # exactly on the end of the grid
            assert got == pytest.approx(math.copysign(0.37, value), rel=1e-15)
        else:
            assert abs(got - value) <= 1 / q.scale


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, st.integers(0, 50), elements=st.floats(allow_nan=True, allow_infinity=True)))
def test_clipping_count_matches_the_number_of_values_outside_the_range(x: npt.NDArray[np.float64]) -> None:
    q = quantizer(value_bits=16, clip=2.5)
    outside = sum(1 for v in x.tolist() if math.isnan(v) or abs(v) > 2.5)
    assert q.encode(x, rng=np.random.default_rng(0)).clipped == outside


def reference_encode(q: Quantizer, x: npt.NDArray[Any], weight: int, rng: np.random.Generator) -> Any:
    """The encoding written as plainly as possible, on whole float64 arrays: clip count, scale, clip, NaN to
    0, stochastic rounding, weight, two's complement."""
    x64 = np.asarray(x, dtype=np.float64)
    clipped = int(np.count_nonzero(~(np.abs(x64) <= q.clip)))
    with np.errstate(over="ignore", invalid="ignore"):
        y = np.nan_to_num(np.clip(x64 * q.scale, -q.max_level, q.max_level), nan=0.0)
    low = np.floor(y)
    q_int = (low + (rng.random(y.shape[0]) < (y - low))).astype(np.int64) * weight
    return q_int.astype(q.dtype), clipped


@pytest.mark.parametrize("ring_bits", RINGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1, 32_767, 32_768, 32_769, 100_001])
def test_blockwise_encoding_equals_the_plain_formula_bit_for_bit(
    ring_bits: RingBits, dtype: type[Any], length: int
) -> None:
    # encode_into works in blocks of 2^15 coordinates; block edges must change nothing, noise draws included.
    q = quantizer(value_bits=11, max_weight=1000, max_participants=16, clip=0.7, ring_bits=ring_bits)
    x = np.random.default_rng(length).normal(0, 0.5, length)
    x[:: max(1, length // 7)] = np.nan
    x[1 :: max(1, length // 5)] = -np.inf
    x = x.astype(dtype)
    encoded = q.encode(x, weight=777, rng=np.random.default_rng(11))
    expected, clipped = reference_encode(q, x, 777, np.random.default_rng(11))
    assert encoded.clipped == clipped
    np.testing.assert_array_equal(encoded.values, expected)


def test_encode_into_writes_into_the_given_buffer_and_checks_it() -> None:
    q = quantizer(value_bits=11, max_weight=4, ring_bits=32)
    x = np.linspace(-2, 2, 1000)
    out = np.zeros(1000, dtype=np.uint32)
    assert (
        q.encode_into(x, out, weight=4, rng=np.random.default_rng(3))
        == q.encode(x, weight=4, rng=np.random.default_rng(3)).clipped
    )
    np.testing.assert_array_equal(out, q.encode(x, weight=4, rng=np.random.default_rng(3)).values)
    for bad in (np.zeros(1000, dtype=np.uint64), np.zeros(999, dtype=np.uint32), [0] * 1000):
        with pytest.raises(LocalUsageError, match="out must be"):
            q.encode_into(x, bad, rng=np.random.default_rng(3))  # type: ignore[arg-type]


@pytest.mark.parametrize(("ring_bits", "dtype"), [(32, np.uint32), (64, np.uint64)])
def test_negatives_are_twos_complement_and_round_trip(ring_bits: RingBits, dtype: type[Any]) -> None:
    q = quantizer(value_bits=20, max_weight=100, max_participants=4, ring_bits=ring_bits)
    counts = np.array([-1, -2, 0, 1, -q.max_integer, q.max_integer], dtype=np.int64)
    encoded = q.encode_integers(counts)
    assert encoded.dtype == dtype
    ring = 2**ring_bits
    assert [int(v) for v in encoded] == [ring - 1, ring - 2, 0, 1, ring - q.max_integer, q.max_integer]
    np.testing.assert_array_equal(q.decode_integers(encoded), counts)
    # Sums cross zero correctly: (-5) + 3 + (-7) + 10 = 1, and -5 + 3 = -2.
    parts = [q.encode_integers(np.array([-5, -5], dtype=np.int16)), q.encode_integers(np.array([3, 3]))]
    parts += [q.encode_integers(np.array([-7, 0])), q.encode_integers(np.array([10, 0], dtype=np.uint8))]
    assert q.decode_integers(ring_sum(parts, q.dtype)).tolist() == [1, -2]

    floats = q.encode(np.array([-0.25, -1.0, 0.75]), weight=4, rng=np.random.default_rng(0)).values
    assert int(floats[1]) == ring - 4 * q.max_level
    np.testing.assert_allclose(q.decode_sum(floats), [-1.0, -4.0, 3.0], atol=4 / q.scale)


@pytest.mark.parametrize("ring_bits", RINGS)
def test_encode_integers_accepts_the_limit_and_rejects_beyond_it(ring_bits: RingBits) -> None:
    q = quantizer(value_bits=10, max_weight=6, max_participants=2, ring_bits=ring_bits)
    limit = 2**9 * 6 - 1
    assert q.max_integer == limit
    q.encode_integers(np.array([limit, -limit]))
    for bad in (limit + 1, -limit - 1):
        with pytest.raises(LocalUsageError, match=rf"limit \+-{limit}.*counts\[1\] = {bad}"):
            q.encode_integers(np.array([0, bad]))
    with pytest.raises(LocalUsageError, match="limit"):
        q.encode_integers(np.array([2**64 - 1], dtype=np.uint64))  # does not wrap to -1 on the way in


# --- Bad arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0, -1, 11, True, 2.0])
def test_weight_must_be_an_int_between_1_and_max_weight(weight: Any) -> None:
    q = quantizer(max_weight=10)
    with pytest.raises(LocalUsageError, match="weight"):
        q.encode(np.zeros(3), weight=weight, rng=np.random.default_rng(0))
    q.encode(np.zeros(3), weight=10, rng=np.random.default_rng(0))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((2, 3)), r"x must be 1-D, got shape \(2, 3\)"),
        (np.float64(1.0), "x must be a numpy array"),
        (np.array(1.0), r"x must be 1-D, got shape \(\)"),
        ([1.0, 2.0], "x must be a numpy array, got list"),
        (np.array(["a"]), "dtype"),
        (np.array([1 + 1j]), "dtype"),
    ],
)
def test_encode_rejects_anything_but_a_1d_real_array(x: Any, match: str) -> None:
    with pytest.raises(LocalUsageError, match=match):
        quantizer().encode(x, rng=np.random.default_rng(0))


def test_encode_needs_a_numpy_generator() -> None:
    with pytest.raises(LocalUsageError, match="Generator"):
        quantizer().encode(np.zeros(3), rng=np.random.RandomState(0))


@pytest.mark.parametrize("counts", [np.zeros(3), np.zeros((2, 2), dtype=np.int64), [1, 2]])
def test_encode_integers_rejects_non_integer_or_non_1d_input(counts: Any) -> None:
    with pytest.raises(LocalUsageError, match="counts"):
        quantizer().encode_integers(counts)


@pytest.mark.parametrize("summed", [np.zeros(3, dtype=np.uint32), np.zeros(3, dtype=np.int64), [0, 1]])
def test_decoders_want_the_rings_dtype(summed: Any) -> None:
    q = quantizer(ring_bits=64)
    for decode in (q.decode_sum, q.decode_integers):
        with pytest.raises(LocalUsageError, match="uint64 ring elements"):
            decode(summed)


@pytest.mark.parametrize("clip", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_clip_must_be_finite_and_positive(clip: float) -> None:
    with pytest.raises(ConfigurationError, match="clip must be finite and > 0"):
        quantizer(clip=clip)


@pytest.mark.parametrize("clip", ["1.0", True, None])
def test_clip_must_be_a_number(clip: Any) -> None:
    with pytest.raises(ConfigurationError, match="clip must be a float"):
        quantizer(clip=clip)


def test_a_clip_too_small_for_the_scale_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="too small"):
        quantizer(value_bits=53, clip=1e-300)


@pytest.mark.parametrize("ring_bits", [16, 48, 128, "64"])
def test_ring_bits_must_be_32_or_64(ring_bits: Any) -> None:
    with pytest.raises(ConfigurationError, match="ring_bits must be 32 or 64"):
        quantizer(ring_bits=ring_bits)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("value_bits", 1, "value_bits must be between 2 .* got 1"),
        ("value_bits", 0, "value_bits must be between 2 .* got 0"),
        ("value_bits", MAX_VALUE_BITS + 1, f"value_bits must be between 2 .* and {MAX_VALUE_BITS}"),
        ("max_weight", 0, "max_weight must be at least 1, got 0"),
        ("max_participants", 0, "max_participants must be at least 1, got 0"),
        ("max_participants", -3, "max_participants must be at least 1, got -3"),
        ("max_weight", 2.0, "max_weight must be an int, got float"),
        ("value_bits", True, "value_bits must be an int, got bool"),
    ],
)
def test_bit_budget_validates_each_field(field: str, value: Any, match: str) -> None:
    arguments: dict[str, Any] = {"value_bits": 16, "max_weight": 1, "max_participants": 1}
    arguments[field] = value
    with pytest.raises(ConfigurationError, match=match):
        BitBudget(**arguments)


def test_bit_budget_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        BitBudget(16, 1, 1)
    budget = BitBudget(value_bits=16, max_weight=1, max_participants=1)
    with pytest.raises(AttributeError):
        budget.value_bits = 17
