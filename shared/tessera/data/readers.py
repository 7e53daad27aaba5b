"""Dataset files into :class:`~tessera.data.dataset.ArrayDataset`: CSV, MNIST-style IDX and NPZ.

:func:`load_dataset` picks the reader by ``format`` or by :func:`detect_format`; each reader checks its file
and raises :class:`~tessera.errors.ConfigurationError` naming the file (and the row and column where it
helps), so the operator knows what to fix before restarting.
"""

from __future__ import annotations

import csv
import gzip
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from tessera.data.dataset import ArrayDataset
from tessera.data.encoding import FeatureEncoding, encode_features, infer_encoding, parse_number
from tessera.errors import ConfigurationError

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

DataFormat = Literal["csv", "idx", "npz"]


# -- CSV -------------------------------------------------------------------------------------------------


def _parse_labels(
    values: Sequence[str], label_classes: Sequence[str] | None, source: str, column: str
) -> npt.NDArray[np.int64]:
    out = np.empty(len(values), dtype=np.int64)
    if label_classes is not None:
        index = {c: j for j, c in enumerate(label_classes)}
        for i, v in enumerate(values):
            j = index.get(v)
            if j is None:
                raise ConfigurationError(
                    f"{source}: row {i + 2}: label {v!r} in column {column!r} "
                    f"is not one of {list(label_classes)}"
                )
            out[i] = j
        return out
    for i, v in enumerate(values):
        parsed = parse_number(v)
        if parsed is None or parsed != int(parsed) or parsed < 0:
            raise ConfigurationError(
                f"{source}: row {i + 2}: label {v!r} in column {column!r} is not a non-negative integer; "
                "configure label_classes to map string labels to class indices"
            )
        out[i] = int(parsed)
    return out


def load_csv(
    path: str | Path,
    *,
    label_column: str,
    encoding: FeatureEncoding | None = None,
    drop_columns: Sequence[str] = (),
    label_classes: Sequence[str] | None = None,
) -> ArrayDataset:
    """Load a CSV file with a header row (UTF-8, optional BOM, any line endings).

    With ``encoding`` the features are exactly those it lists (other columns are ignored); without it every
    column except ``label_column`` and ``drop_columns`` is a feature and the encoding is inferred (see
    :mod:`tessera.data`). Labels are non-negative integers, or strings mapped through ``label_classes``.
    """
    p = Path(path)
    source = str(p)
    try:
        with p.open(encoding="utf-8-sig", newline="") as fh:
            rows = [r for r in csv.reader(fh) if r]
    except FileNotFoundError as exc:
        raise ConfigurationError(f"data file {source} not found") from exc
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{source}: not UTF-8 text ({exc})") from exc
    if not rows:
        raise ConfigurationError(f"{source}: empty file (no header)")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        raise ConfigurationError(f"{source}: duplicate column names in header {header}")
    body = rows[1:]
    if not body:
        raise ConfigurationError(f"{source}: no data rows")
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ConfigurationError(f"{source}: row {i + 2} has {len(r)} fields, header has {len(header)}")
    if label_column not in header:
        raise ConfigurationError(f"{source}: label column {label_column!r} not found; columns are {header}")
    missing_drop = [c for c in drop_columns if c not in header]
    if missing_drop:
        raise ConfigurationError(f"{source}: columns to drop {missing_drop} not found; columns are {header}")
    columns = {name: [r[j].strip() for r in body] for j, name in enumerate(header)}
    y = _parse_labels(columns[label_column], label_classes, source, label_column)
    if encoding is None:
        feature_cols = {k: v for k, v in columns.items() if k != label_column and k not in set(drop_columns)}
        encoding = infer_encoding(feature_cols)
    elif label_column in {f.name for f in encoding.features}:
        raise ConfigurationError(f"{source}: the label column {label_column!r} is listed as a feature")
    x, resolved = encode_features(columns, encoding, source=source)
    return ArrayDataset(x, y, resolved)


# -- IDX -------------------------------------------------------------------------------------------------

# IDX type codes (third byte of the magic number) → big-endian numpy dtypes.
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gzip(p: Path) -> bytes:
    try:
        raw = p.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigurationError(f"data file {p} not found") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ConfigurationError(f"{p}: damaged gzip stream ({exc})") from exc
    return raw


def read_idx(path: str | Path) -> tuple[int, np.ndarray]:
    """Read an IDX file (optionally gzip-compressed); return ``(magic, array)`` in native byte order.

    Raises:
        ConfigurationError: bad magic, unknown type code, or a size that does not match the header.
    """
    p = Path(path)
    raw = _read_maybe_gzip(p)
    if len(raw) < 4:
        raise ConfigurationError(f"{p}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\0\0" or type_code not in _IDX_DTYPES or ndim == 0:
        raise ConfigurationError(f"{p}: bad IDX magic number {magic} (0x{magic:08x}); not an IDX file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigurationError(f"{p}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise ConfigurationError(
            f"{p}: IDX header says {dims} ({expected} data bytes) but the file holds {len(raw) - header}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return magic, arr.astype(dtype.newbyteorder("="))


def default_labels_path(images_path: str | Path) -> Path:
    """The MNIST naming convention: ``…-images-idx3-ubyte[.gz]`` → ``…-labels-idx1-ubyte[.gz]``."""
    p = Path(images_path)
    if "images-idx3" not in p.name:
        raise ConfigurationError(
            f"cannot derive the labels file from {p.name!r} (expected '…images-idx3…'); set labels_path"
        )
    return p.with_name(p.name.replace("images-idx3", "labels-idx1"))


def load_idx(
    images_path: str | Path,
    labels_path: str | Path | None = None,
    *,
    mean: float = MNIST_MEAN,
    std: float = MNIST_STD,
) -> ArrayDataset:
    """Load an IDX image file (magic 2051, uint8 N×rows×cols) and its label file (magic 2049, uint8 N).

    Pixels become ``(pixel / 255 − mean) / std`` with shape ``N × 1 × rows × cols``.
    """
    ipath = Path(images_path)
    lpath = default_labels_path(ipath) if labels_path is None else Path(labels_path)
    magic, images = read_idx(ipath)
    if magic != IDX_IMAGES_MAGIC:
        raise ConfigurationError(f"{ipath}: magic number {magic}, expected {IDX_IMAGES_MAGIC} (images)")
    magic, labels = read_idx(lpath)
    if magic != IDX_LABELS_MAGIC:
        raise ConfigurationError(f"{lpath}: magic number {magic}, expected {IDX_LABELS_MAGIC} (labels)")
    if images.shape[0] != labels.shape[0]:
        raise ConfigurationError(
            f"{ipath} holds {images.shape[0]} images but {lpath} holds {labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise ConfigurationError(f"{ipath}: no images")
    x = (images.astype(np.float32) / np.float32(255.0) - np.float32(mean)) / np.float32(std)
    return ArrayDataset(x[:, None, :, :], labels.astype(np.int64))


# -- NPZ -------------------------------------------------------------------------------------------------


def load_npz(path: str | Path) -> ArrayDataset:
    """Load arrays ``x`` (features) and ``y`` (integer labels) from an ``.npz`` file, without pickle."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise ConfigurationError(f"{p}: missing arrays {missing}; found {npz.files}")
            x, y = npz["x"], npz["y"]
    except FileNotFoundError as exc:
        raise ConfigurationError(f"data file {p} not found") from exc
    except ValueError as exc:  # not an npz/npy file, or an object array that needs pickle
        if isinstance(exc, ConfigurationError):
            raise
        raise ConfigurationError(f"{p}: not a readable .npz file ({exc})") from exc
    if y.ndim != 1 or len(x) != len(y):
        raise ConfigurationError(f"{p}: x has shape {x.shape} but y has shape {y.shape}; need N and (N,)")
    if len(y) == 0:
        raise ConfigurationError(f"{p}: no examples")
    if not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)):
        raise ConfigurationError(f"{p}: labels y must be integers, got dtype {y.dtype}")
    return ArrayDataset(x.astype(np.float32), y.astype(np.int64))


# -- dispatch --------------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> DataFormat:
    """``csv`` / ``npz`` by suffix, ``idx`` for names containing ``idx`` or ending in ``ubyte``."""
    name = Path(path).name.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".npz"):
        return "npz"
    if "idx" in name or name.endswith("ubyte"):
        return "idx"
    raise ConfigurationError(f"cannot tell the format of {path}; set the format to csv, idx or npz")


def load_dataset(
    path: str | Path,
    *,
    label_column: str | None = None,
    format: DataFormat | None = None,
    labels_path: str | Path | None = None,
    encoding: FeatureEncoding | None = None,
    drop_columns: Sequence[str] = (),
    label_classes: Sequence[str] | None = None,
) -> ArrayDataset:
    """Load a dataset file; the format comes from ``format`` or :func:`detect_format`.

    - csv: ``label_column`` is required; see :func:`load_csv` for ``encoding``, ``drop_columns`` and
      ``label_classes``.
    - idx: ``path`` is the images file; ``labels_path`` defaults to the MNIST naming convention.
    - npz: arrays ``x`` and ``y``.

    Raises:
        ConfigurationError: any problem with the file or the settings (the message says which).
    """
    fmt = detect_format(path) if format is None else format
    if fmt == "csv":
        if label_column is None:
            raise ConfigurationError(f"{path}: a CSV dataset needs label_column")
        return load_csv(
            path,
            label_column=label_column,
            encoding=encoding,
            drop_columns=drop_columns,
            label_classes=label_classes,
        )
    if label_column is not None or encoding is not None or drop_columns or label_classes is not None:
        raise ConfigurationError(
            f"{path}: label_column/encoding/drop_columns/label_classes apply to CSV only"
        )
    if fmt == "idx":
        return load_idx(path, labels_path)
    if fmt == "npz":
        return load_npz(path)
    raise ConfigurationError(f"unknown data format {fmt!r}; choose csv, idx or npz")


__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MNIST_MEAN",
    "MNIST_STD",
    "DataFormat",
    "default_labels_path",
    "detect_format",
    "load_csv",
    "load_dataset",
    "load_idx",
    "load_npz",
    "read_idx",
]
