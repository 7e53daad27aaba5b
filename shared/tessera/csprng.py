"""Random numbers for differential privacy from a cryptographically secure generator (OpenSSL AES-256-CTR).

The privacy of a DP mechanism rests on its noise and its sampling being unpredictable. torch's and numpy's
generators (Mersenne Twister, PCG64) are statistically fine but not cryptographically secure: their state
can be reconstructed from enough outputs. Everything here draws its bits from the same AES-256-CTR
keystream :mod:`tessera.crypto` uses for masks (OpenSSL), keyed by 32 bytes from the operating system's
CSPRNG; a given seed (tests only) makes it reproducible.

Samplers, vectorised with numpy and exact up to float64 arithmetic:

- :meth:`Csprng.uniform`: doubles in [0, 1) with 53 random bits each;
- :meth:`Csprng.bernoulli`: ``uniform < p`` element-wise;
- :meth:`Csprng.poisson`: Knuth's multiplication method below mean 10, Hörmann's transformed rejection with
  squeeze (PTRS, "The transformed rejection method for generating Poisson random variables", Insurance:
  Mathematics and Economics 12, 1993) from 10 on -- the algorithm numpy uses, on our bits;
- :meth:`Csprng.skellam`: Poisson(μ/2) − Poisson(μ/2), the symmetric Skellam distribution of variance μ;
- :meth:`Csprng.normal`: standard normal by the Box-Muller transform.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy.special import gammaln

_BLOCK = 1 << 20  # keystream bytes per OpenSSL call
_ZEROS = memoryview(bytes(_BLOCK))
_PTRS_FROM = 10.0


class Csprng:
    """A stream of random bits from AES-256-CTR keyed by ``seed`` (default: 32 bytes from the OS)."""

    def __init__(self, seed: bytes | None = None) -> None:
        key = secrets.token_bytes(32) if seed is None else seed
        if len(key) != 32:
            raise ValueError("a Csprng seed is 32 bytes")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._fill(bytearray(n)).tobytes()

    def _fill(self, out: bytearray) -> memoryview:
        """Overwrite ``out`` with keystream bytes, block by block (no temporary buffers)."""
        view = memoryview(out)
        scratch = bytearray(min(len(out), _BLOCK) + 15)
        for start in range(0, len(out), _BLOCK):
            part = view[start : start + _BLOCK]
            written = self._encryptor.update_into(_ZEROS[: len(part)], scratch)
            part[:] = memoryview(scratch)[:written]
        return view

    def uint64(self, n: int) -> npt.NDArray[np.uint64]:
        buffer = bytearray(8 * n)
        self._fill(buffer)
        return np.frombuffer(buffer, dtype="<u8").astype(np.uint64, copy=False)

    def uint32(self, n: int) -> npt.NDArray[np.uint32]:
        buffer = bytearray(4 * n)
        self._fill(buffer)
        return np.frombuffer(buffer, dtype="<u4").astype(np.uint32, copy=False)

    def uniform(self, n: int) -> npt.NDArray[np.float64]:
        """``n`` doubles uniform in [0, 1): the top 53 bits of 64 random bits, times 2^-53."""
        words = self.uint64(n)
        words >>= np.uint64(11)
        out = words.astype(np.float64)
        out *= 1.0 / (1 << 53)
        return out

    def bernoulli(self, p: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.bool_]:
        """One Bernoulli(p_i) draw per element of ``p`` (which must lie in [0, 1])."""
        flat = np.asarray(p, dtype=np.float64).ravel()
        return (self.uniform(flat.size) < flat).reshape(np.shape(p))

    def normal(self, n: int) -> npt.NDArray[np.float64]:
        """``n`` standard normal draws (Box-Muller on uniforms in (0, 1])."""
        half = (n + 1) // 2
        u1 = 1.0 - self.uniform(half)  # (0, 1]: log is finite
        u2 = self.uniform(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        out = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
        return out[:n]

    def poisson(self, lam: float, n: int) -> npt.NDArray[np.int64]:
        """``n`` draws of Poisson(``lam``), ``lam`` >= 0."""
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"a Poisson mean must be finite and >= 0, got {lam}")
        if n == 0 or lam == 0:
            return np.zeros(n, dtype=np.int64)
        return self._ptrs(lam, n) if lam >= _PTRS_FROM else self._multiplication(lam, n)

    def skellam(self, variance: float, n: int) -> npt.NDArray[np.int64]:
        """``n`` draws of the symmetric Skellam distribution of ``variance``: Poisson(v/2) − Poisson(v/2)."""
        return self.poisson(variance / 2, n) - self.poisson(variance / 2, n)

    # --- the two Poisson algorithms -----------------------------------------------------------------------

    def _multiplication(self, lam: float, n: int) -> npt.NDArray[np.int64]:
        """Knuth: the number of uniforms whose running product stays above e^-lam (lam < 10)."""
        limit = math.exp(-lam)
        out = np.zeros(n, dtype=np.int64)
        product = self.uniform(n)
        pending = np.flatnonzero(product > limit)
        while pending.size:
            out[pending] += 1
            product[pending] *= self.uniform(pending.size)
            pending = pending[product[pending] > limit]
        return out

    def _ptrs(self, lam: float, n: int) -> npt.NDArray[np.int64]:
        """Hörmann's PTRS, vectorised: draw for every pending position, keep the accepted ones, repeat."""
        slam, loglam = math.sqrt(lam), math.log(lam)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
        vr = 0.9277 - 3.6224 / (b - 2)
        out = np.empty(n, dtype=np.int64)
        pending = np.arange(n)
        while pending.size:
            u = self.uniform(pending.size) - 0.5
            v = self.uniform(pending.size)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / np.where(us > 0, us, 1.0) + b) * u + lam + 0.43)
            quick = (us >= 0.07) & (v <= vr)
            hopeless = (k < 0) | ((us < 0.013) & (v > us)) | (us <= 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.log(v) + log_inv_alpha - np.log(
                    a / np.where(us > 0, us * us, 1.0) + b
                ) <= -lam + k * loglam - gammaln(np.maximum(k, 0) + 1)
            accepted = quick | (~hopeless & ratio)
            out[pending[accepted]] = k[accepted].astype(np.int64)
            pending = pending[~accepted]
        return out


__all__ = ["Csprng"]
