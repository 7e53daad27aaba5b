"""Tests for tessera.data: CSV / IDX / NPZ loading, encodings and splits."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from tessera.data import (
    MNIST_MEAN,
    MNIST_STD,
    ArrayDataset,
    CategoricalFeature,
    FeatureEncoding,
    NumericFeature,
    default_labels_path,
    load_csv,
    load_dataset,
    load_idx,
    read_idx,
    split_across_organisations,
    split_indices,
    train_validation_split,
    write_idx,
)
from tessera.errors import ConfigurationError

DATA_DIR = Path(os.environ.get("TESSERA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
MNIST = DATA_DIR / "mnist"
AI4I = DATA_DIR / "ai4i2020" / "ai4i2020.csv"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data {path} absent (set TESSERA_DATA_DIR to the shared data folder)")
    return path


# -- CSV -------------------------------------------------------------------------------------------------

CSV = "\ufeffid,kind,temp,speed,label\r\n1,L,300.0,10,0\r\n2,M,302.0,20,1\r\n3,L,298.0,30,0\r\n4,H,300.0,40,1\r\n"


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    p = tmp_path / "site.csv"
    p.write_bytes(CSV.encode("utf-8"))
    return p


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


def test_csv_missing_label_column(csv_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="label column 'target' not found"):
        load_dataset(csv_path, label_column="target")
    with pytest.raises(ConfigurationError, match="needs label_column"):
        load_dataset(csv_path)


def test_csv_string_labels_need_an_explicit_class_list(tmp_path: Path) -> None:
    p = tmp_path / "s.csv"
    p.write_text("f,label\n1,yes\n2,no\n")
    with pytest.raises(ConfigurationError, match="not a non-negative integer"):
        load_csv(p, label_column="label")
    ds = load_csv(p, label_column="label", label_classes=["no", "yes"])
    np.testing.assert_array_equal(ds.y, [1, 0])
    with pytest.raises(ConfigurationError, match="not one of"):
        load_csv(p, label_column="label", label_classes=["no"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("a,label\n", "no data rows"),
        ("a,label\n1,0\n2\n", "row 3 has 1 fields"),
        ("a,a,label\n1,2,0\n", "duplicate column"),
        ("a,label\n1,0.5\n", "not a non-negative integer"),
    ],
)
def test_csv_malformed(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        load_csv(p, label_column="label")


def test_csv_missing_numeric_value_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("a,label\n1,0\n,1\n")
    enc = FeatureEncoding(features=(NumericFeature(name="a"),))
    with pytest.raises(ConfigurationError, match=r"row 3, column 'a': '' is not a finite number"):
        load_csv(p, label_column="label", encoding=enc)


def test_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not found"):
        load_dataset(tmp_path / "nope.csv", label_column="y")


# -- IDX -------------------------------------------------------------------------------------------------


def _mnist_like(
    tmp_path: Path, n: int = 7, compress: bool = True
) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    ip = tmp_path / f"toy-images-idx3-ubyte{suffix}"
    lp = tmp_path / f"toy-labels-idx1-ubyte{suffix}"
    write_idx(ip, images, compress=compress)
    write_idx(lp, labels, compress=compress)
    return ip, lp, images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip_and_normalisation(tmp_path: Path, compress: bool) -> None:
    ip, lp, images, labels = _mnist_like(tmp_path, compress=compress)
    raw = ip.read_bytes()
    header = gzip.decompress(raw)[:16] if compress else raw[:16]
    assert header == bytes.fromhex("00000803") + (7).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    ds = load_dataset(ip)  # labels file found by the MNIST naming convention
    assert ds.x.shape == (7, 1, 28, 28)
    np.testing.assert_allclose(ds.x[:, 0], (images / 255.0 - MNIST_MEAN) / MNIST_STD, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ds.y, labels)
    assert default_labels_path(ip) == lp


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_handles_every_type_code(tmp_path: Path, dtype: type) -> None:
    arr = (
        (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        if dtype != np.uint8
        else np.arange(24, dtype=np.uint8)
    )
    write_idx(tmp_path / "a.idx", arr)
    _, back = read_idx(tmp_path / "a.idx")
    np.testing.assert_array_equal(back, arr)
    assert back.dtype == np.dtype(dtype)


def test_idx_bad_magic_truncation_and_length_mismatch(tmp_path: Path) -> None:
    ip, lp, _, _ = _mnist_like(tmp_path, compress=False)
    with pytest.raises(ConfigurationError, match="expected 2051"):
        load_idx(lp, lp)  # a labels file where images are expected
    with pytest.raises(ConfigurationError, match="expected 2049"):
        load_idx(ip, ip)
    junk = tmp_path / "junk-images-idx3-ubyte"
    junk.write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(ConfigurationError, match="bad IDX magic"):
        read_idx(junk)
    short = tmp_path / "short-images-idx3-ubyte"
    short.write_bytes(ip.read_bytes()[:-1])
    with pytest.raises(ConfigurationError, match="header says"):
        load_idx(short, lp)
    fewer = tmp_path / "fewer-labels-idx1-ubyte"
    write_idx(fewer, np.zeros(6, dtype=np.uint8))
    with pytest.raises(ConfigurationError, match=r"7 images but .* 6 labels"):
        load_idx(ip, fewer)


def test_real_mnist_headers_and_contents() -> None:
    mnist = need(MNIST)
    for stem, n in (("train", 60000), ("t10k", 10000)):
        with gzip.open(mnist / f"{stem}-images-idx3-ubyte.gz", "rb") as fh:
            head = fh.read(16)
        assert int.from_bytes(head[:4], "big") == 2051
        assert [int.from_bytes(head[i : i + 4], "big") for i in (4, 8, 12)] == [n, 28, 28]
        with gzip.open(mnist / f"{stem}-labels-idx1-ubyte.gz", "rb") as fh:
            head = fh.read(8)
        assert int.from_bytes(head[:4], "big") == 2049 and int.from_bytes(head[4:8], "big") == n
    test = load_dataset(mnist / "t10k-images-idx3-ubyte.gz")
    assert test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # Normalised with the training set's mean/std, the test set is close to (0, 1) too.
    assert abs(float(test.x.mean())) < 0.02 and abs(float(test.x.std()) - 1) < 0.02


def test_real_ai4i_csv() -> None:
    path = need(AI4I)
    ds = load_dataset(
        path,
        label_column="Machine failure",
        drop_columns=["UDI", "Product ID", "TWF", "HDF", "PWF", "OSF", "RNF"],
    )
    assert len(ds) == 10000 and int(ds.y.sum()) == 339
    assert ds.encoding is not None
    assert ds.encoding.output_names()[:3] == ("Type=H", "Type=L", "Type=M")
    assert ds.x.shape == (10000, 8)
    np.testing.assert_array_equal(ds.x[:, :3].sum(axis=0), [1003, 6000, 2997])


# -- NPZ -------------------------------------------------------------------------------------------------


def test_npz_round_trip_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=np.ones((3, 2), dtype=np.float64), y=np.array([0, 2, 1]))
    ds = load_dataset(p)
    assert ds.x.dtype == np.float32 and ds.x.shape == (3, 2)
    np.testing.assert_array_equal(ds.y, [0, 2, 1])
    np.savez(tmp_path / "noy.npz", x=np.ones((3, 2)))
    with pytest.raises(ConfigurationError, match="missing arrays"):
        load_dataset(tmp_path / "noy.npz")
    np.savez(tmp_path / "len.npz", x=np.ones((3, 2)), y=np.zeros(2))
    with pytest.raises(ConfigurationError, match="shape"):
        load_dataset(tmp_path / "len.npz")
    np.savez(tmp_path / "empty.npz", x=np.ones((0, 2)), y=np.zeros(0))
    with pytest.raises(ConfigurationError, match="no examples"):
        load_dataset(tmp_path / "empty.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(ConfigurationError, match="not a readable"):
        load_dataset(tmp_path / "obj.npz")


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


# -- splits ----------------------------------------------------------------------------------------------


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
