"""Fixed-point encoding of float vectors into the ring Z_R (R = 2^32 or 2^64) for secure aggregation.

SECAGG.md, "Encoding floats into the ring". Secure aggregation adds the participants' vectors modulo R, so a
float vector must first become a vector of ring elements:

1. **Clip** every coordinate to the declared range [-clip, clip] and *count* the coordinates that were
   outside it (``Encoded.clipped``; the count is meant to be summed securely too, never sent in the clear).
   NaN counts as clipped and is encoded as 0; +inf and -inf count as clipped and become +clip and -clip.
2. **Scale** by ``scale = (2^(value_bits-1) - 1) / clip`` and round to an integer with *unbiased stochastic
   rounding* (``floor(y) + (u < y - floor(y))`` with u uniform in [0, 1)), so E[q] = y exactly and the
   rounding errors of many participants average out instead of adding a bias. |q| <= 2^(value_bits-1) - 1.
3. **Weight**: multiply by an integer weight (e.g. the sample count n_k of FedAvg), 1 <= weight <= max_weight.
4. **Two's complement** mod R: a negative integer -a becomes R - a. Ring addition is then ordinary integer
   addition as long as the true sum stays in [-R/2, R/2); :meth:`Quantizer.decode_sum` reads it back.

The bit budget
--------------
If the true sum ever leaves [-R/2, R/2) it wraps around *silently*: a large positive update decodes as a
large negative one and the aggregate is corrupted with no error anywhere. This is a known failure of deployed
systems (Fed-BioMed's 32-bit budget overflowed; Flower clips weights to +-8 without saying so, see
PITFALLS.md). Tessera therefore makes the budget explicit and checks it at configuration time::

    value_bits + bits(max_weight) + ceil(log2(max_participants)) + 1 <= log2(R)

where ``value_bits`` counts the bits of one quantised coordinate including its sign and
``bits(w) = w.bit_length()``. Why it suffices, writing v = value_bits, b = bits(max_weight),
p = ceil(log2(max_participants)) and r = log2(R): one participant contributes less than
2^(v-1) * max_weight < 2^(v-1+b) in magnitude, so max_participants <= 2^p of them less than 2^(v-1+b+p),
which the inequality v + b + p + 1 <= r keeps at or below 2^(r-2) = R/4. Two's complement only needs the sum
below R/2, so the final ``+ 1`` (called the sign bit in SECAGG.md; the value's own sign is already inside
``value_bits``) is one bit of headroom on top of an already sufficient budget. A budget that does not fit
raises :class:`~tessera.errors.ConfigurationError` at start-up, with the arithmetic in its message.

Exact integer fields (sample counts, correct-prediction counts, confusion-matrix entries) share the same
vector and the same budget: :meth:`Quantizer.encode_integers` encodes them without scaling and rejects any
magnitude above ``2^(value_bits-1) * max_weight - 1``, the per-participant bound the budget was computed for.

Everything is vectorised with numpy and exact: quantised levels are integers below 2^52 in float64, weighting
happens in the ring's signed integer type (see :meth:`Quantizer.encode_into`). Randomness is a parameter (a :class:`numpy.random.Generator`), so tests are
deterministic; in production pass a generator seeded from the system's entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from tessera.errors import ConfigurationError, LocalUsageError

RingBits: TypeAlias = Literal[32, 64]
"""log2(R) of the ring Z_R the masked vectors live in."""

RING_BITS: tuple[RingBits, ...] = (32, 64)

MAX_VALUE_BITS = 53
"""float64 carries 53 significant bits. With more value bits the scaled value ``x * scale`` is already rounded
to a coarser grid than the integers before the stochastic rounding sees it, so the rounding would no longer be
unbiased; and 53 value bits already resolve 2^-52 of the clip range."""

_BLOCK = 1 << 15
"""Coordinates :meth:`Quantizer.encode_into` works on at a time (256 KiB per float64 buffer)."""

_RING_DTYPES: dict[int, type[np.unsignedinteger[Any]]] = {32: np.uint32, 64: np.uint64}
_SIGNED_DTYPES: dict[int, type[np.signedinteger[Any]]] = {32: np.int32, 64: np.int64}


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


@dataclass(frozen=True, kw_only=True)
class BitBudget:
    """How many bits a sum of weighted, quantised values can need; see the module docstring.

    ``value_bits``: bits of one quantised coordinate including its sign (2..53). ``max_weight``: the largest
    integer weight one participant may multiply its values by (e.g. its sample count), >= 1.
    ``max_participants``: the most participants whose vectors are summed, >= 1.

    Raises :class:`ConfigurationError` naming the field and its limit; fix the setting.
    """

    value_bits: int
    max_weight: int
    max_participants: int

    def __post_init__(self) -> None:
        for name in ("value_bits", "max_weight", "max_participants"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ConfigurationError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            object.__setattr__(self, name, int(value))
        if not 2 <= self.value_bits <= MAX_VALUE_BITS:
            raise ConfigurationError(
                f"value_bits must be between 2 (a sign and one magnitude bit) and {MAX_VALUE_BITS} "
                f"(the precision of a float64), got {self.value_bits}"
            )
        if self.max_weight < 1:
            raise ConfigurationError(f"max_weight must be at least 1, got {self.max_weight}")
        if self.max_participants < 1:
            raise ConfigurationError(f"max_participants must be at least 1, got {self.max_participants}")

    @property
    def weight_bits(self) -> int:
        """bits(max_weight) = max_weight.bit_length() (so 1 for max_weight 1)."""
        return self.max_weight.bit_length()

    @property
    def participant_bits(self) -> int:
        """ceil(log2(max_participants)), exactly (0 for a single participant)."""
        return (self.max_participants - 1).bit_length()

    @property
    def required_ring_bits(self) -> int:
        """value_bits + bits(max_weight) + ceil(log2(max_participants)) + 1."""
        return self.value_bits + self.weight_bits + self.participant_bits + 1

    def check(self, ring_bits: int) -> None:
        """Raise :class:`ConfigurationError`, with the arithmetic, unless the budget fits the ring.

        Recover by lowering ``value_bits`` (coarser quantisation), ``max_weight`` (e.g. weight by a capped or
        rescaled sample count) or ``max_participants``, or by using the 64-bit ring.
        """
        if ring_bits not in RING_BITS:
            raise ConfigurationError(f"ring_bits must be 32 or 64, got {ring_bits!r}")
        required = self.required_ring_bits
        if required > ring_bits:
            advice = (
                "lower value_bits or use a 64-bit ring"
                if ring_bits == 32 and required <= 64
                else "lower value_bits, max_weight or max_participants"
            )
            raise ConfigurationError(
                f"value_bits {self.value_bits} + weight bits {self.weight_bits} + participant bits "
                f"{self.participant_bits} + 1 sign = {required} > {ring_bits}-bit ring; {advice} "
                f"(max_weight {self.max_weight} takes {self.weight_bits} bits, max_participants "
                f"{self.max_participants} takes {self.participant_bits})"
            )


@dataclass(frozen=True)
class Encoded:
    """One participant's encoded vector: ring elements and the number of coordinates that were clipped.

    ``values`` is uint32 for the 32-bit ring and uint64 for the 64-bit ring. ``clipped`` counts coordinates
    outside [-clip, clip], NaN and +-inf included.
    """

    values: npt.NDArray[np.unsignedinteger[Any]]
    clipped: int


@dataclass(frozen=True, kw_only=True)
class Quantizer:
    """Fixed-point encoder/decoder for one aggregation: clip range, bit budget and ring.

    ``clip`` (finite, > 0): coordinates are clipped to [-clip, clip]. ``budget``: the :class:`BitBudget`.
    ``ring_bits``: 32 or 64 (at least :attr:`BitBudget.required_ring_bits`). Construction checks the
    budget against the ring and raises :class:`ConfigurationError` if a sum could overflow.
    """

    clip: float
    budget: BitBudget
    ring_bits: RingBits

    def __post_init__(self) -> None:
        if not isinstance(self.clip, int | float | np.floating) or isinstance(self.clip, bool):
            raise ConfigurationError(f"clip must be a float, got {type(self.clip).__name__} {self.clip!r}")
        clip = float(self.clip)
        if not (math.isfinite(clip) and clip > 0):
            raise ConfigurationError(f"clip must be finite and > 0, got {clip!r}")
        object.__setattr__(self, "clip", clip)
        if not isinstance(self.budget, BitBudget):
            raise ConfigurationError(f"budget must be a BitBudget, got {type(self.budget).__name__}")
        self.budget.check(self.ring_bits)
        if not math.isfinite(self.scale):
            raise ConfigurationError(
                f"clip {clip!r} is too small for value_bits {self.budget.value_bits}: the scale "
                f"(2^{self.budget.value_bits - 1} - 1) / clip overflows a float64; use a larger clip"
            )

    @property
    def max_level(self) -> int:
        """2^(value_bits-1) - 1: the largest magnitude of one quantised, unweighted coordinate."""
        return (1 << (self.budget.value_bits - 1)) - 1

    @property
    def scale(self) -> float:
        """(2^(value_bits-1) - 1) / clip: one quantisation step is 1/scale in the float domain."""
        return self.max_level / self.clip

    @property
    def max_integer(self) -> int:
        """2^(value_bits-1) * max_weight - 1: the largest magnitude :meth:`encode_integers` accepts."""
        return (1 << (self.budget.value_bits - 1)) * self.budget.max_weight - 1

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger[Any]]:
        """numpy dtype of ring elements: uint32 or uint64."""
        return np.dtype(_RING_DTYPES[self.ring_bits])

    def encode(
        self, x: npt.NDArray[np.floating[Any]], *, weight: int = 1, rng: np.random.Generator
    ) -> Encoded:
        """Clip, scale, stochastically round, multiply by ``weight`` and map to the ring.

        ``x``: 1-D float array (integer arrays are accepted and converted to float64; it is not modified).
        ``weight``: integer, 1 <= weight <= budget.max_weight. ``rng``: the source of the rounding noise.
        Raises :class:`LocalUsageError` on a wrong argument; fix the call.
        """
        _check_1d(x, "x", kinds="fiu")
        values = np.empty(x.shape[0], dtype=self.dtype)
        clipped = self.encode_into(x, values, weight=weight, rng=rng)
        return Encoded(values=values, clipped=clipped)

    def encode_into(
        self,
        x: npt.NDArray[np.floating[Any]],
        out: npt.NDArray[np.unsignedinteger[Any]],
        *,
        weight: int = 1,
        rng: np.random.Generator,
    ) -> int:
        """:meth:`encode` writing the ring elements into ``out`` (same length, this ring's dtype), so a caller
        that assembles a longer vector avoids a copy. Returns the number of clipped coordinates.

        The same ``rng`` draws give the same output as :meth:`encode`.
        """
        _check_1d(x, "x", kinds="fiu")
        if not isinstance(out, np.ndarray) or out.dtype != self.dtype or out.shape != x.shape:
            raise LocalUsageError(f"out must be a {self.dtype} array of shape {x.shape}")
        if not _is_int(weight):
            raise LocalUsageError(f"weight must be an int, got {type(weight).__name__} {weight!r}")
        weight = int(weight)
        if not 0 < weight <= self.budget.max_weight:
            raise LocalUsageError(
                f"weight must be between 1 and max_weight {self.budget.max_weight} of the bit budget, "
                f"got {weight}; raise max_weight in the budget or cap the weight"
            )
        if not isinstance(rng, np.random.Generator):
            raise LocalUsageError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

        if x.dtype.kind != "f":
            x = x.astype(np.float64)  # |int8(-128)| would overflow in the integer type
        # Blocks of _BLOCK coordinates through small reused buffers: a 1M-coordinate update in one piece would
        # page-fault in some 30 MB of fresh temporaries, which took longer than the arithmetic (this runs on
        # every participant in every round). Drawing the rounding noise block by block gives the same numbers
        # as one draw of the whole length.
        n = x.shape[0]
        block = max(1, min(n, _BLOCK))
        y = np.empty(block, dtype=np.float64)
        low = np.empty(block, dtype=np.float64)
        noise = np.empty(block, dtype=np.float64)
        flags = np.empty(block, dtype=np.bool_)
        level = float(self.max_level)  # exact: max_level < 2^52 since value_bits <= 53
        clip = np.float64(self.clip)  # a float64 scalar: float32 input is compared in float64 too
        signed = out.view(_SIGNED_DTYPES[self.ring_bits])
        clipped = 0
        for start in range(0, n, block):
            stop = min(start + block, n)
            xs, ys, lows, us, fs = (
                x[start:stop],
                y[: stop - start],
                low[: stop - start],
                noise[: stop - start],
                flags[: stop - start],
            )
            # `not (|x| <= clip)` is also true for NaN, which is counted as clipped on purpose.
            np.abs(xs, out=ys, dtype=np.float64)
            np.less_equal(ys, clip, out=fs)
            clipped += (stop - start) - int(np.count_nonzero(fs))
            # Clip in the scaled domain: a coordinate at or beyond +-clip lands exactly on +-max_level whatever
            # the float rounding of x * scale, so clipped values (+-inf too) decode to exactly
            # max_level / scale.
            with np.errstate(over="ignore", invalid="ignore"):  # huge finite x -> +-inf, clipped below
                np.multiply(xs, self.scale, out=ys, dtype=np.float64)
            np.clip(ys, -level, level, out=ys)
            np.isnan(ys, out=fs)  # NaN survives the clip; it encodes as 0 (and was counted above)
            if fs.any():
                ys[fs] = 0.0
            np.floor(ys, out=lows)
            # Unbiased stochastic rounding: round up with probability frac = y - floor(y), so E[q] = y.
            # |y| <= max_level, an integer, so q never exceeds max_level (frac is 0 at the end points).
            np.subtract(ys, lows, out=ys)  # frac, exact: y and floor(y) are within 1 of each other
            rng.random(out=us)
            np.less(us, ys, out=fs)
            np.add(lows, fs, out=lows)  # q: integers of magnitude <= max_level < 2^52, exact in float64
            # Two's complement mod R by writing q into the signed view of the ring buffer (casting a
            # negative float straight to an unsigned type is undefined in C). |q| < 2^(ring_bits - 1).
            np.copyto(signed[start:stop], lows, casting="unsafe")
        if weight != 1:
            # Exact in the signed ring type: |q * weight| <= (2^(value_bits-1) - 1) * max_weight, below
            # 2^(value_bits-1+weight_bits), and the budget check at construction gives
            # value_bits + weight_bits <= ring_bits - 1.
            np.multiply(signed, weight, out=signed)
        return clipped

    def encode_integers(self, counts: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.unsignedinteger[Any]]:
        """Encode exact integers (counts, confusion-matrix entries), signed or not, without scaling.

        ``counts``: 1-D integer array with every |value| <= :attr:`max_integer`, that is
        2^(value_bits-1) * max_weight - 1, the per-participant bound of the budget. Raises
        :class:`LocalUsageError` otherwise: raise max_weight or value_bits in the budget.
        """
        _check_1d(counts, "counts", kinds="iu")
        limit = self.max_integer  # < 2^62, see encode(): fits int64 and uint64
        if counts.dtype == np.uint64:
            too_big = counts > np.uint64(limit)
            values = counts.astype(np.int64)  # only trusted where not too_big
        else:
            values = counts.astype(np.int64)  # lossless for every other integer dtype
            too_big = (values > limit) | (values < -limit)
        if too_big.any():
            index = int(np.flatnonzero(too_big)[0])
            raise LocalUsageError(
                f"{int(np.count_nonzero(too_big))} integer(s) exceed the budget's per-participant limit "
                f"+-{limit} (2^{self.budget.value_bits - 1} * max_weight {self.budget.max_weight} - 1), e.g. "
                f"counts[{index}] = {counts[index]}; raise max_weight or value_bits in the budget"
            )
        return self._to_ring(values)

    def decode_sum(self, summed: npt.NDArray[np.unsignedinteger[Any]]) -> npt.NDArray[np.float64]:
        """Read a ring sum of :meth:`encode` outputs as float64: Σ weight_k · x_k (up to quantisation).

        ``summed`` must have this ring's dtype (uint32 / uint64); its shape is kept.
        """
        result: npt.NDArray[np.float64] = self.decode_integers(summed).astype(np.float64)
        result /= self.scale
        return result

    def decode_integers(self, summed: npt.NDArray[np.unsignedinteger[Any]]) -> npt.NDArray[np.int64]:
        """Read ring elements as two's complement signed integers (int64), without scaling."""
        if not isinstance(summed, np.ndarray) or summed.dtype != self.dtype:
            got = summed.dtype if isinstance(summed, np.ndarray) else type(summed).__name__
            raise LocalUsageError(
                f"expected an array of {self.dtype} ring elements ({self.ring_bits}-bit ring), got {got}; "
                f"pass the unmasked ring sum unchanged"
            )
        # Casting uintN to intN reinterprets the bits: values >= R/2 become value - R (two's complement).
        return summed.astype(_SIGNED_DTYPES[self.ring_bits]).astype(np.int64, copy=False)

    def _to_ring(self, q: npt.NDArray[np.int64]) -> npt.NDArray[np.unsignedinteger[Any]]:
        # Casting int64 to uintN keeps the low N bits: -a becomes R - a (two's complement mod R).
        return q.astype(self.dtype)


def _check_1d(array: object, name: str, *, kinds: str) -> None:
    if not isinstance(array, np.ndarray):
        raise LocalUsageError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 1:
        raise LocalUsageError(f"{name} must be 1-D, got shape {array.shape}; flatten it first (ravel())")
    if array.dtype.kind not in kinds:
        expected = "an integer" if kinds == "iu" else "a float or integer"
        raise LocalUsageError(f"{name} must have {expected} dtype, got {array.dtype}")


__all__ = [
    "MAX_VALUE_BITS",
    "RING_BITS",
    "BitBudget",
    "Encoded",
    "Quantizer",
    "RingBits",
]
