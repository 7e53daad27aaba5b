"""The crypto recipes against published test vectors (RFC 7748, RFC 8032, RFC 5869) and misuse."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.crypto import (
    AgreementKey,
    CryptoFailure,
    RingBits,
    SigningKey,
    add_mask_stream,
    hkdf,
    hkdf_sha256,
    open_sealed,
    public_key_matches,
    ring_dtype,
    seal,
    verify_signature,
)


def mask_stream(seed: bytes, length: int, ring_bits: RingBits) -> np.ndarray:
    """The mask stream alone, to compare with other AES-CTR implementations: added onto zeros."""
    stream = np.zeros(length, dtype=ring_dtype(ring_bits))
    add_mask_stream(stream, seed)
    return stream


# RFC 7748 section 6.1
ALICE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUB = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748_vector() -> None:
    alice, bob = AgreementKey(ALICE), AgreementKey(BOB)
    assert alice.public_bytes == ALICE_PUB and bob.public_bytes == BOB_PUB
    expected = hkdf(SHARED, context=b"ctx", purpose=b"p")
    assert alice.derive(BOB_PUB, context=b"ctx", purpose=b"p") == expected
    assert bob.derive(ALICE_PUB, context=b"ctx", purpose=b"p") == expected
    assert alice.derive(BOB_PUB, context=b"ctx", purpose=b"q") != expected
    assert public_key_matches(ALICE, ALICE_PUB) and not public_key_matches(BOB, ALICE_PUB)


def test_x25519_rejects_low_order_points() -> None:
    with pytest.raises(CryptoFailure):
        AgreementKey(ALICE).derive(bytes(32), context=b"", purpose=b"")


def test_ed25519_rfc8032_test_1() -> None:
    key = SigningKey(bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
    assert key.public_bytes.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    signature = key.sign(b"")
    assert signature.hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    verify_signature(key.public_bytes, b"", signature)
    for bad in (b"x", signature[:-1] + bytes([signature[-1] ^ 1])):
        with pytest.raises(CryptoFailure):
            verify_signature(
                key.public_bytes, b"" if bad != b"x" else b"x", signature if bad == b"x" else bad
            )
    with pytest.raises(CryptoFailure):
        verify_signature(key.public_bytes, b"", b"")


def test_hkdf_rfc5869_case_1() -> None:
    okm = hkdf_sha256(
        bytes.fromhex("0b" * 22),
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        length=42,
    )
    assert okm.hex() == "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"


def test_seal_requires_matching_associated_data_and_detects_tampering() -> None:
    key = bytes(range(32))
    sealed = seal(key, b"secret share", associated_data=b"fed/1/a0|1->2")
    assert open_sealed(key, sealed, associated_data=b"fed/1/a0|1->2") == b"secret share"
    for tampered_ad in (b"fed/2/a0|1->2", b""):
        with pytest.raises(CryptoFailure):
            open_sealed(key, sealed, associated_data=tampered_ad)
    flipped = sealed[:15] + bytes([sealed[15] ^ 1]) + sealed[16:]
    with pytest.raises(CryptoFailure):
        open_sealed(key, flipped, associated_data=b"fed/1/a0|1->2")
    with pytest.raises(CryptoFailure):
        open_sealed(key, b"short", associated_data=b"")


@settings(max_examples=30, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    length=st.sampled_from([0, 1, 3, 65_535, 65_536, 65_537, 200_003]),
    ring_bits=st.sampled_from([32, 64]),
)
def test_the_openssl_keystream_is_pycryptodomes_aes_256_ctr(seed: bytes, length: int, ring_bits: int) -> None:
    # Two independent AES-CTR implementations agree: the PRG is exactly AES-256-CTR from a zero counter.
    from Crypto.Cipher import AES

    width = ring_bits // 8
    expected = AES.new(seed, AES.MODE_CTR, nonce=b"", initial_value=0).encrypt(bytes(length * width))
    stream = mask_stream(seed, length, ring_bits)  # type: ignore[arg-type]
    assert stream.shape == (length,) and stream.tobytes() == expected
    # Added block by block in place (both signs), the same stream arrives, wrapping mod 2^ring_bits.
    dtype = np.uint32 if ring_bits == 32 else np.uint64
    start = np.random.default_rng(length).integers(0, np.iinfo(dtype).max, length, dtype=dtype, endpoint=True)
    acc = start.copy()
    add_mask_stream(acc, seed)
    np.testing.assert_array_equal(acc, start + stream)
    add_mask_stream(acc, seed, subtract=True)
    np.testing.assert_array_equal(acc, start)


def test_add_mask_stream_rejects_a_bad_accumulator_or_seed() -> None:
    with pytest.raises(ValueError, match="accumulator"):
        add_mask_stream(np.zeros(4, dtype=np.int64), bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        add_mask_stream(np.zeros(4, dtype=np.uint32), bytes(31))


def test_mask_stream_is_aes_ctr_keyed_by_the_whole_seed() -> None:
    seed = bytes(range(32))
    a = mask_stream(seed, 1000, 32)
    assert a.dtype == np.dtype("<u4") and a.shape == (1000,)
    assert np.array_equal(a[:10], mask_stream(seed, 10, 32))
    # Changing only the last byte of the seed changes the stream (no folding of the seed).
    other = mask_stream(seed[:-1] + b"\xff", 1000, 32)
    assert np.count_nonzero(a == other) < 5
    wide = mask_stream(seed, 500, 64)
    assert wide.tobytes() == a.tobytes()[:4000]
    # Known answer: AES-256-CTR of zeros with key 00..1f and a zero counter block.
    from Crypto.Cipher import AES

    expected = AES.new(seed, AES.MODE_ECB).encrypt(bytes(16))
    assert a[:4].tobytes() == expected
