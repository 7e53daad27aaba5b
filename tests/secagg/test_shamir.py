"""Prime-field Shamir sharing with verified reconstruction."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.crypto import digest
from tessera.secagg.shamir import (
    PRIME,
    LagrangeCache,
    ReconstructionFailed,
    decode_share,
    encode_share,
    reconstruct_verified,
    share_secret,
)


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    if n % 2 == 0:
        return False
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    rng = random.Random(0)
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_the_smallest_prime_above_2_256() -> None:
    assert _is_probable_prime(PRIME)
    assert PRIME > 2**256
    assert not any(_is_probable_prime(c) for c in range(2**256 + 1, PRIME, 2))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.data())
def test_any_t_shares_recover_the_secret(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    secret = data.draw(st.binary(min_size=32, max_size=32))
    xs = data.draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    shares = share_secret(secret, threshold=t, xs=xs, rand=random.Random(n).randbytes)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
    check = lambda s: digest(s) == digest(secret)  # noqa: E731
    got, bad = reconstruct_verified(
        {x: shares[x] for x in subset}, threshold=t, check=check, cache=LagrangeCache()
    )
    assert got == secret and not bad


def test_fewer_than_t_shares_fail_and_do_not_leak_by_interpolation() -> None:
    secret = bytes(range(32))
    shares = share_secret(secret, threshold=3, xs=[1, 2, 3, 4])
    with pytest.raises(ReconstructionFailed, match="2 shares, 3 needed"):
        reconstruct_verified(
            {1: shares[1], 2: shares[2]}, threshold=3, check=lambda s: True, cache=LagrangeCache()
        )
    assert LagrangeCache().combine([(1, shares[1]), (2, shares[2])]) != secret


def test_bad_shares_are_routed_around_and_named() -> None:
    secret = bytes(range(32))
    xs = list(range(1, 11))
    shares = share_secret(secret, threshold=6, xs=xs)
    shares[2] = (shares[2] + 12345) % PRIME
    shares[7] = (shares[7] + 999) % PRIME
    got, bad = reconstruct_verified(shares, threshold=6, check=lambda s: s == secret, cache=LagrangeCache())
    assert got == secret
    assert bad == {2, 7}
    # Suspects go last, so with them known the first attempt succeeds.
    got, bad = reconstruct_verified(
        shares, threshold=6, check=lambda s: s == secret, cache=LagrangeCache(), suspects={2, 7}
    )
    assert got == secret and bad == frozenset()


def test_unverifiable_reconstruction_fails_loudly() -> None:
    secret = bytes(32)
    shares = share_secret(secret, threshold=3, xs=[1, 2, 3])
    shares[1] ^= 1
    with pytest.raises(ReconstructionFailed, match="no subset"):
        reconstruct_verified(shares, threshold=3, check=lambda s: s == secret, cache=LagrangeCache())


def test_share_encoding_rejects_non_field_elements() -> None:
    assert decode_share(encode_share(PRIME - 1)) == PRIME - 1
    with pytest.raises(ValueError, match="below the field prime"):
        decode_share(PRIME.to_bytes(33, "big"))
    with pytest.raises(ValueError, match="33 bytes"):
        decode_share(b"\x00" * 32)


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        share_secret(b"short", threshold=1, xs=[1])
    with pytest.raises(ValueError, match="threshold 3"):
        share_secret(bytes(32), threshold=3, xs=[1, 2])
    with pytest.raises(ValueError, match="distinct and non-zero"):
        share_secret(bytes(32), threshold=1, xs=[0, 1])
