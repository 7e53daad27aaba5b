"""The one in-memory dataset type every loader returns and every trainer and evaluator takes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tessera.data.encoding import FeatureEncoding
from tessera.errors import ConfigurationError


def _frozen(a: npt.ArrayLike, dtype: type[np.generic]) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != dtype or arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=dtype, order="C", copy=True)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Features ``x`` (float32, ``(N, ...)``) and integer labels ``y`` (int64, ``(N,)``), read-only.

    ``encoding`` is the CSV feature encoding that produced ``x`` (``None`` for IDX/NPZ). The arrays are
    read-only; construction copies an input array unless it is already read-only with the right dtype, so
    the caller's arrays are never frozen or aliased by surprise.

    Raises:
        ConfigurationError: ``x`` and ``y`` differ in length, ``y`` is not 1-D, or labels are negative.
    """

    x: np.ndarray  # any array-like of numbers; stored as read-only float32
    y: np.ndarray  # any array-like of integers; stored as read-only int64
    encoding: FeatureEncoding | None = field(default=None)

    def __post_init__(self) -> None:
        raw_y = np.asarray(self.y)
        if raw_y.size and not np.issubdtype(raw_y.dtype, np.integer):
            integral = np.issubdtype(raw_y.dtype, np.number) and bool(np.all(np.mod(raw_y, 1) == 0))
            if not integral:
                raise ConfigurationError(f"labels must be integers, got {raw_y.dtype} values with fractions")
        x, y = _frozen(self.x, np.float32), _frozen(raw_y, np.int64)
        if y.ndim != 1:
            raise ConfigurationError(f"labels must be one-dimensional, got shape {y.shape}")
        if x.ndim < 1 or x.shape[0] != y.shape[0]:
            raise ConfigurationError(f"features and labels differ in length: x {x.shape}, y {y.shape}")
        if y.size and int(y.min()) < 0:
            raise ConfigurationError(f"labels must be non-negative integers, found {int(y.min())}")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: npt.ArrayLike) -> ArrayDataset:
        """The examples at ``indices`` (in that order), with the same encoding."""
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.x[idx], self.y[idx], self.encoding)

    def fingerprint(self) -> str:
        """SHA-256 (hex) over shapes, dtypes and bytes of ``x`` and ``y``: identifies the exact data."""
        h = hashlib.sha256(b"tessera.dataset.v1\0")
        for arr in (self.x, self.y):
            h.update(f"{arr.dtype.str}{arr.shape}\0".encode())
            h.update(arr.tobytes())
        return h.hexdigest()


__all__ = ["ArrayDataset"]
