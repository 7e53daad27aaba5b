"""Tests for tessera.data.dataset: the array dataset's checks, immutability and fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
from tessera.data import ArrayDataset
from tessera.errors import ConfigurationError


def test_dataset_rejects_mismatched_lengths_and_is_read_only() -> None:
    with pytest.raises(ConfigurationError, match="differ in length"):
        ArrayDataset(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ConfigurationError, match="integers"):
        ArrayDataset(np.zeros((2, 2)), np.array([0.0, 1.5]))
    with pytest.raises(ConfigurationError, match="non-negative"):
        ArrayDataset(np.zeros((2, 2)), np.array([0, -1]))
    mine = np.zeros((2, 2), dtype=np.float32)
    ds = ArrayDataset(mine, np.zeros(2))
    with pytest.raises(ValueError):
        ds.x[0, 0] = 1.0
    mine[0, 0] = 1.0  # the caller's array is neither frozen nor aliased
    assert ds.x[0, 0] == 0.0


def test_fingerprint_identifies_the_data() -> None:
    a = ArrayDataset(np.zeros((2, 2)), np.array([0, 1]))
    assert a.fingerprint() == ArrayDataset(np.zeros((2, 2)), np.array([0, 1])).fingerprint()
    assert a.fingerprint() != ArrayDataset(np.zeros((2, 2)), np.array([1, 0])).fingerprint()
    # Same bytes, different shape: still a different dataset.
    assert a.fingerprint() != ArrayDataset(np.zeros((2, 2, 1)), np.array([0, 1])).fingerprint()
