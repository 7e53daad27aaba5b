"""Seeded splits of a dataset: training vs validation at one organisation, and examples across organisations.

Every split is a deterministic function of its arguments and seed, so a run can be repeated exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from tessera.data.dataset import ArrayDataset
from tessera.errors import ConfigurationError

SplitMethod = Literal["iid", "dirichlet", "contiguous", "fractions"]


def train_validation_split(
    dataset: ArrayDataset, validation_fraction: float, seed: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """Split into (train, validation) by a seeded random permutation; each part keeps file order.

    The validation part has ``round(N × validation_fraction)`` examples (possibly 0).

    Raises:
        ConfigurationError: fraction outside [0, 1) or a split that leaves no training example.
    """
    if not 0 <= validation_fraction < 1:
        raise ConfigurationError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    n = len(dataset)
    n_val = round(n * validation_fraction)
    if n - n_val < 1:
        raise ConfigurationError(f"validation_fraction {validation_fraction} leaves no training data of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return dataset.subset(np.sort(perm[n_val:])), dataset.subset(np.sort(perm[:n_val]))


def _check_fractions(fractions: Sequence[float] | None, k: int) -> npt.NDArray[np.float64]:
    if fractions is None:
        return np.full(k, 1.0 / k)
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (k,) or np.any(f <= 0) or not math.isclose(float(f.sum()), 1.0, abs_tol=1e-6):
        raise ConfigurationError(
            f"fractions must be {k} positive numbers summing to 1, got {list(fractions)}"
        )
    return f


def _cut(indices: npt.NDArray[np.int64], fractions: npt.NDArray[np.float64]) -> list[npt.NDArray[np.int64]]:
    bounds = np.round(np.cumsum(fractions)[:-1] * len(indices)).astype(np.int64)
    return list(np.split(indices, bounds))


def split_indices(
    labels: npt.ArrayLike,
    k: int,
    *,
    method: SplitMethod = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    fractions: Sequence[float] | None = None,
    min_size: int = 1,
    max_attempts: int = 100,
) -> list[npt.NDArray[np.int64]]:
    """Partition ``range(len(labels))`` into ``k`` sorted index arrays, one per organisation.

    - ``iid``: seeded random permutation cut into equal parts (or ``fractions``).
    - ``fractions``: like ``iid`` with uneven ``fractions`` (required).
    - ``contiguous``: consecutive ranges in file order, equal or by ``fractions`` (e.g. AI4I by ID range).
    - ``dirichlet``: per class, proportions drawn from Dirichlet(alpha · 1ₖ) (smaller alpha = more skewed,
      non-IID); redrawn (same seeded stream) until every part has ``min_size`` examples.

    Raises:
        ConfigurationError: k < 1, bad fractions or alpha, or parts smaller than ``min_size``
            (after ``max_attempts`` draws for Dirichlet): use fewer organisations or a larger alpha.
    """
    y = np.asarray(labels)
    n = len(y)
    if k < 1:
        raise ConfigurationError(f"need at least one organisation, got k={k}")
    rng = np.random.default_rng(seed)
    parts: list[npt.NDArray[np.int64]]
    if method in ("iid", "fractions"):
        if method == "fractions" and fractions is None:
            raise ConfigurationError("method 'fractions' needs fractions")
        parts = _cut(rng.permutation(n).astype(np.int64), _check_fractions(fractions, k))
    elif method == "contiguous":
        parts = _cut(np.arange(n, dtype=np.int64), _check_fractions(fractions, k))
    elif method == "dirichlet":
        if not alpha > 0:
            raise ConfigurationError(f"Dirichlet alpha must be > 0, got {alpha}")
        classes = np.unique(y)
        for _ in range(max_attempts):
            buckets: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(k)]
            for c in classes:
                idx = rng.permutation(np.flatnonzero(y == c)).astype(np.int64)
                for j, piece in enumerate(_cut(idx, rng.dirichlet(np.full(k, alpha)))):
                    buckets[j].append(piece)
            parts = [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
            if min(len(p) for p in parts) >= min_size:
                break
        else:
            raise ConfigurationError(
                f"Dirichlet(alpha={alpha}) split of {n} examples over {k} organisations left one with fewer "
                f"than {min_size} examples in {max_attempts} draws; raise alpha or lower k"
            )
    else:
        raise ConfigurationError(
            f"unknown split method {method!r}; choose iid, dirichlet, contiguous, fractions"
        )
    sizes = [len(p) for p in parts]
    if min(sizes) < min_size:
        raise ConfigurationError(f"split gives part sizes {sizes}; every part needs at least {min_size}")
    return [np.sort(p) for p in parts]


__all__ = ["SplitMethod", "split_indices", "train_validation_split"]
