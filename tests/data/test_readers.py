"""Tests for tessera.data.readers: CSV / IDX / NPZ files, their errors, and the real data sets."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from tessera.data import (
    MNIST_MEAN,
    MNIST_STD,
    default_labels_path,
    load_csv,
    load_dataset,
    load_idx,
    read_idx,
)
from tessera.errors import ConfigurationError

from .idx_files import write_idx
from .real_files import AI4I, MNIST, need

# -- CSV -------------------------------------------------------------------------------------------------


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
