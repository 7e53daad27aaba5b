"""A small CSV file shared by the encoding and reader tests."""

from __future__ import annotations

from pathlib import Path

import pytest

CSV = "\ufeffid,kind,temp,speed,label\r\n1,L,300.0,10,0\r\n2,M,302.0,20,1\r\n3,L,298.0,30,0\r\n4,H,300.0,40,1\r\n"


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    p = tmp_path / "site.csv"
    p.write_bytes(CSV.encode("utf-8"))
    return p
