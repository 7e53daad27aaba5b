"""Where the tests find the real data sets (MNIST, AI4I 2020), and the skip when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The shared data folder sits next to the repository unless TESSERA_DATA_DIR says otherwise.
DATA_DIR = Path(os.environ.get("TESSERA_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))
MNIST = DATA_DIR / "mnist"
AI4I = DATA_DIR / "ai4i2020" / "ai4i2020.csv"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data {path} absent (set TESSERA_DATA_DIR to the shared data folder)")
    return path
