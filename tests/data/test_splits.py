"""Tests for tessera.data.splits: seeded, deterministic splits within and across organisations."""

from __future__ import annotations

import numpy as np
import pytest
from tessera.data import ArrayDataset, SplitMethod, split_indices, train_validation_split
from tessera.errors import ConfigurationError


def split_across_organisations(
    dataset: ArrayDataset, k: int, *, method: SplitMethod, seed: int
) -> list[ArrayDataset]:
    """One dataset per organisation, cut by :func:`split_indices` (as bench/mnist.py does)."""
    return [dataset.subset(p) for p in split_indices(dataset.y, k, method=method, seed=seed)]


def _toy(n: int = 1000, classes: int = 10) -> ArrayDataset:
    return ArrayDataset(np.arange(n, dtype=np.float32)[:, None], np.arange(n) % classes)


def test_train_validation_split_is_deterministic_and_disjoint() -> None:
    ds = _toy(101)
    tr, va = train_validation_split(ds, 0.2, seed=7)
    tr2, va2 = train_validation_split(ds, 0.2, seed=7)
    np.testing.assert_array_equal(tr.x, tr2.x)
    np.testing.assert_array_equal(va.x, va2.x)
    assert len(va) == 20 and len(tr) == 81
    ids = np.concatenate([tr.x[:, 0], va.x[:, 0]])
    assert sorted(ids.tolist()) == list(range(101))
    _, va3 = train_validation_split(ds, 0.2, seed=8)
    assert not np.array_equal(va.x, va3.x)
    with pytest.raises(ConfigurationError):
        train_validation_split(ds, 1.0, seed=0)


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("iid", {}),
        ("fractions", {"fractions": [0.5, 0.3, 0.2]}),
        ("contiguous", {}),
        ("contiguous", {"fractions": [0.6, 0.2, 0.2]}),
        ("dirichlet", {"alpha": 0.5}),
    ],
)
def test_org_splits_partition_deterministically(method: str, kwargs: dict[str, object]) -> None:
    y = np.arange(1000) % 10
    parts = split_indices(y, 3, method=method, seed=3, **kwargs)  # type: ignore[arg-type]
    again = split_indices(y, 3, method=method, seed=3, **kwargs)  # type: ignore[arg-type]
    assert len(parts) == 3
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    if "fractions" in kwargs:
        assert [len(p) for p in parts] == [round(f * 1000) for f in kwargs["fractions"]]  # type: ignore[attr-defined]
    if method == "contiguous":
        assert all(np.array_equal(p, np.arange(p[0], p[-1] + 1)) for p in parts)


def test_dirichlet_alpha_controls_label_skew() -> None:
    y = np.arange(5000) % 10

    def skew(alpha: float) -> float:
        parts = split_indices(y, 5, method="dirichlet", alpha=alpha, seed=1)
        shares = np.array([np.bincount(y[p], minlength=10) / len(p) for p in parts])
        return float(np.abs(shares - 0.1).sum(axis=1).mean())

    assert skew(0.1) > 3 * skew(100.0)
    assert skew(100.0) < 0.15


def test_split_errors() -> None:
    y = np.arange(10) % 2
    with pytest.raises(ConfigurationError, match="fractions"):
        split_indices(y, 2, method="fractions", fractions=[0.5, 0.6])
    with pytest.raises(ConfigurationError, match="at least 3"):
        split_indices(y, 5, method="iid", min_size=3)
    with pytest.raises(ConfigurationError, match="raise alpha"):
        split_indices(y, 5, method="dirichlet", alpha=0.01, min_size=2, max_attempts=5)
    orgs = split_across_organisations(_toy(30, 3), 3, method="iid", seed=0)
    assert [len(o) for o in orgs] == [10, 10, 10]
