"""Tests for tessera.data.encoding: inferred and configured CSV feature encodings, through the CSV reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tessera.data import CategoricalFeature, FeatureEncoding, NumericFeature, load_csv, load_dataset
from tessera.errors import ConfigurationError


def test_csv_inferred_encoding_one_hot_and_standardised(csv_path: Path) -> None:
    ds = load_dataset(csv_path, label_column="label", drop_columns=["id"])
    assert ds.encoding is not None
    assert ds.encoding.output_names() == ("kind=H", "kind=L", "kind=M", "temp", "speed")
    np.testing.assert_array_equal(ds.x[:, :3], [[0, 1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(ds.x[:, 3:].mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(ds.x[:, 3:].std(axis=0), 1, atol=1e-6)
    np.testing.assert_array_equal(ds.y, [0, 1, 0, 1])
    temp = ds.encoding.features[1]
    assert isinstance(temp, NumericFeature) and temp.mean == pytest.approx(300.0)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64


def test_csv_configured_encoding_is_identical_across_organisations(tmp_path: Path) -> None:
    """Site B has no 'H' rows and different local statistics; the pinned encoding still gives the same
    columns and the same numbers for the same raw values."""
    enc = FeatureEncoding(
        features=(
            CategoricalFeature(name="kind", categories=("L", "M", "H")),
            NumericFeature(name="temp", mean=300.0, std=2.0),
        )
    )
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    a.write_text("kind,temp,label\nH,302,1\nL,300,0\n")
    b.write_text("label,temp,kind,extra\n0,300,L,x\n1,310,M,y\n")
    da = load_dataset(a, label_column="label", encoding=enc)
    db = load_dataset(b, label_column="label", encoding=enc)
    assert da.encoding == db.encoding == enc
    assert da.encoding.fingerprint() == db.encoding.fingerprint()
    np.testing.assert_array_equal(da.x, [[0, 0, 1, 1.0], [1, 0, 0, 0.0]])
    np.testing.assert_array_equal(db.x, [[1, 0, 0, 0.0], [0, 1, 0, 5.0]])
    # The encoding survives a JSON round trip (it is published through configuration).
    assert FeatureEncoding.model_validate_json(enc.model_dump_json()) == enc


def test_csv_unknown_category_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text("kind,label\nL,0\nX,1\n")
    enc = FeatureEncoding(features=(CategoricalFeature(name="kind", categories=("L", "M")),))
    with pytest.raises(ConfigurationError, match=r"row 3, column 'kind': category 'X'"):
        load_csv(p, label_column="label", encoding=enc)


def test_csv_missing_numeric_value_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("a,label\n1,0\n,1\n")
    enc = FeatureEncoding(features=(NumericFeature(name="a"),))
    with pytest.raises(ConfigurationError, match=r"row 3, column 'a': '' is not a finite number"):
        load_csv(p, label_column="label", encoding=enc)
