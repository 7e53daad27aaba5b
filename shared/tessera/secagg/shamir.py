"""t-of-n Shamir secret sharing of 32-byte secrets over a 257-bit prime field.

SECAGG.md, "Concrete choices": the field must hold one 32-byte secret as one element, so the prime is the
smallest above 2^256 (2^256 + 297). Shares are points (x, f(x)) with x the holder's roster index (1-based,
never 0, since f(0) is the secret).

The curator reconstructs up to n secrets per round from the same set of responders, so Lagrange
coefficients at 0 are computed once per set of x-coordinates (:class:`LagrangeCache`) and reused for every
secret: one reconstruction is then t multiply-adds.

Reconstruction is *verified*: :func:`reconstruct_verified` takes a predicate (hash commitment, public key)
and, when more than t shares are at hand and a reconstruction fails the check, searches for a t-subset that
passes, avoiding shares already known to be bad. A bad share can therefore never yield a wrong secret: it is
routed around, or reconstruction fails loudly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tessera.crypto import RandomSource, system_random

PRIME = 2**256 + 297
"""The smallest prime above 2^256 (checked in the tests with a Miller-Rabin test)."""

SECRET_BYTES = 32
SHARE_BYTES = 33  # a field element below PRIME < 2^257 fits in 33 bytes
MAX_SUBSET_ATTEMPTS = 256


class ReconstructionFailed(Exception):
    """No subset of the shares at hand reconstructs a secret that passes its check."""


def share_secret(
    secret: bytes, *, threshold: int, xs: Sequence[int], rand: RandomSource = system_random
) -> dict[int, int]:
    """Split a 32-byte secret into shares f(x) for each x in ``xs``; any ``threshold`` of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError("a secret is 32 bytes")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares {len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share coordinates must be distinct and non-zero")
    # Coefficients from 48 random bytes each: the bias of reducing 384 bits mod a 257-bit prime is < 2^-127.
    coefficients = [int.from_bytes(secret, "big")] + [
        int.from_bytes(rand(48), "big") % PRIME for _ in range(threshold - 1)
    ]
    shares: dict[int, int] = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def encode_share(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def decode_share(raw: bytes) -> int:
    """Parse a share value; raises ValueError if it is not a field element."""
    if len(raw) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise ValueError("a share must be below the field prime")
    return y


def lagrange_at(xs: Sequence[int], point: int = 0) -> list[int]:
    """Coefficients l_i with f(point) = sum l_i f(x_i) for any polynomial of degree < len(xs)."""
    coefficients = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                numerator = numerator * (point - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        coefficients.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return coefficients


@dataclass
class LagrangeCache:
    """Lagrange coefficients at zero, computed once per set of x-coordinates."""

    _cache: dict[tuple[int, ...], list[int]] = field(default_factory=dict)

    def coefficients(self, xs: tuple[int, ...]) -> list[int]:
        return self.coefficients_at(xs, 0)

    def coefficients_at(self, xs: tuple[int, ...], point: int) -> list[int]:
        """Coefficients l_i with f(point) = sum l_i f(x_i)."""
        key = (*xs, -point) if point else xs
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = lagrange_at(xs, point)
        return found

    def combine(self, points: Sequence[tuple[int, int]]) -> bytes | None:
        """f(0) from exactly the given points, as 32 bytes; None if f(0) does not fit in 32 bytes."""
        xs = tuple(x for x, _ in points)
        total = sum(c * y for c, (_, y) in zip(self.coefficients(xs), points, strict=True)) % PRIME
        if total >= 2 ** (8 * SECRET_BYTES):
            return None
        return total.to_bytes(SECRET_BYTES, "big")


def reconstruct_verified(
    shares: Mapping[int, int],
    *,
    threshold: int,
    check: Callable[[bytes], bool],
    cache: LagrangeCache,
    suspects: Iterable[int] = (),
) -> tuple[bytes, frozenset[int]]:
    """Recover a secret from ``shares`` (x -> y) that passes ``check``.

    Tries the lowest ``threshold`` x-coordinates that are not ``suspects`` first (so the common case hits the
    cached coefficients shared by every secret of the round). If that fails the check and more shares exist,
    tries other t-subsets, up to :data:`MAX_SUBSET_ATTEMPTS`. Returns the secret and the x-coordinates whose
    shares are inconsistent with it (each one a participant that sent a bad share).

    Raises :class:`ReconstructionFailed` when fewer than ``threshold`` shares are given or no subset passes.
    """
    if len(shares) < threshold:
        raise ReconstructionFailed(f"{len(shares)} shares, {threshold} needed")
    suspect_set = set(suspects)
    ordered = sorted(shares, key=lambda x: (x in suspect_set, x))
    for attempt, subset in enumerate(itertools.combinations(ordered, threshold)):
        if attempt >= MAX_SUBSET_ATTEMPTS:
            break
        xs = tuple(sorted(subset))
        secret = cache.combine([(x, shares[x]) for x in xs])
        if secret is not None and check(secret):
            # Only a failed first attempt proves a bad share exists; then name every share off the polynomial.
            bad = _inconsistent_shares(shares, xs, cache) if attempt else frozenset()
            return secret, bad
    raise ReconstructionFailed(
        f"no subset of {len(shares)} shares (threshold {threshold}) reconstructs a verifiable secret"
    )


def _inconsistent_shares(
    shares: Mapping[int, int], good: tuple[int, ...], cache: LagrangeCache
) -> frozenset[int]:
    """x-coordinates whose shares do not lie on the polynomial through the ``good`` ones."""
    bad = set()
    for x in shares:
        if x in good:
            continue
        value = (
            sum(c * shares[xi] for c, xi in zip(cache.coefficients_at(good, x), good, strict=True)) % PRIME
        )
        if value != shares[x]:
            bad.add(x)
    return frozenset(bad)


__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "LagrangeCache",
    "ReconstructionFailed",
    "decode_share",
    "encode_share",
    "lagrange_at",
    "reconstruct_verified",
    "share_secret",
]
