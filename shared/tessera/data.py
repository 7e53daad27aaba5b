"""Local data loading: CSV, MNIST-style IDX and NPZ files into one in-memory array dataset.

Contracts
---------
- Every loader returns an :class:`ArrayDataset`: ``x`` float32 of shape ``(N, ...)``, ``y`` int64 labels of
  shape ``(N,)``, both read-only. Loading never returns an empty dataset.
- Every problem with a file or with how it is configured (missing file, missing label column, bad IDX magic,
  truncated file, mismatched lengths, unknown category, non-integer label) raises
  :class:`~tessera.errors.ConfigurationError` naming the file and, where it helps, the row and column: fix the
  file or the data settings and restart.
- **CSV feature encoding is explicit and shared.** Organisations must encode features identically or the
  federated model sees different inputs at each site. A :class:`FeatureEncoding` lists the features in order:
  numeric ones are standardised as ``(v − mean) / std``; categorical ones are one-hot encoded over an
  explicit, ordered category list (a category absent at one organisation still gets its column, all zeros
  there). Without a configured encoding one is *inferred* from the local file (columns whose non-empty values
  all parse as numbers are numeric, with local mean/std; the others are categorical with their sorted local
  values) and attached to the dataset: publish that encoding (``encoding.model_dump_json()``) and configure it
  at every organisation. Numeric features configured without mean/std use local statistics, which differ
  between organisations; pin them for identical encodings.
- IDX images (magic 2051) are scaled to [0, 1] and normalised with the MNIST mean 0.1307 and std 0.3081,
  shaped ``N × 1 × rows × cols``; labels (magic 2049) become int64. ``.gz`` files are detected by content.
- NPZ files hold arrays ``x`` and ``y`` and are read with ``allow_pickle=False``; ``x`` is cast to float32
  without any normalisation.
- Splits (:func:`train_validation_split`, :func:`split_indices`, :func:`split_across_organisations`) are
  deterministic functions of their arguments and seed.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tessera.errors import ConfigurationError

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

DataFormat = Literal["csv", "idx", "npz"]
SplitMethod = Literal["iid", "dirichlet", "contiguous", "fractions"]


def _frozen(a: npt.ArrayLike, dtype: type[np.generic]) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != dtype or arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=dtype, order="C", copy=True)
    arr.setflags(write=False)
    return arr


# -- the dataset -----------------------------------------------------------------------------------------


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

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one example's features (e.g. ``(1, 28, 28)`` or ``(d,)``)."""
        return tuple(int(s) for s in self.x.shape[1:])

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


# -- CSV feature encoding --------------------------------------------------------------------------------


class NumericFeature(BaseModel):
    """A numeric column, standardised as ``(value − mean) / std``; mean/std ``None`` means "use local"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["numeric"] = "numeric"
    name: str = Field(min_length=1)
    mean: float | None = Field(default=None, allow_inf_nan=False)
    std: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class CategoricalFeature(BaseModel):
    """A string column, one-hot encoded over ``categories`` in the given order (unique, non-empty list)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["categorical"] = "categorical"
    name: str = Field(min_length=1)
    categories: tuple[str, ...] = Field(min_length=1)

    @field_validator("categories")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"categories must be unique, got {list(v)}")
        return v


Feature = Annotated[NumericFeature | CategoricalFeature, Field(discriminator="kind")]


class FeatureEncoding(BaseModel):
    """The ordered list of input features of a CSV dataset and how each becomes numbers.

    Output columns follow the feature order; a categorical feature expands to one column per category, in its
    category order. :meth:`output_names` describes them; :meth:`fingerprint` identifies the encoding.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    features: tuple[Feature, ...] = Field(min_length=1)

    @field_validator("features")
    @classmethod
    def _unique_names(cls, v: tuple[Feature, ...]) -> tuple[Feature, ...]:
        names = [f.name for f in v]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")
        return v

    @property
    def width(self) -> int:
        """Number of output columns."""
        return len(self.output_names())

    def output_names(self) -> tuple[str, ...]:
        """Names of the output columns: ``name`` for numeric, ``name=category`` for one-hot columns."""
        out: list[str] = []
        for f in self.features:
            if isinstance(f, NumericFeature):
                out.append(f.name)
            else:
                out.extend(f"{f.name}={c}" for c in f.categories)
        return tuple(out)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical JSON of this encoding."""
        doc = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()


def _parse_float(value: str) -> float | None:
    try:
        v = float(value)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def infer_encoding(columns: Mapping[str, Sequence[str]]) -> FeatureEncoding:
    """Infer an encoding from raw string columns (in mapping order): numeric where every non-empty value
    parses as a finite number, categorical (sorted distinct values) otherwise. Numeric mean/std stay ``None``
    (filled from the data when encoding)."""
    features: list[NumericFeature | CategoricalFeature] = []
    for name, values in columns.items():
        non_empty = [v for v in values if v != ""]
        if non_empty and all(_parse_float(v) is not None for v in non_empty):
            features.append(NumericFeature(name=name))
        else:
            features.append(CategoricalFeature(name=name, categories=tuple(sorted(set(values)))))
    if not features:
        raise ConfigurationError("no feature columns left after removing the label and dropped columns")
    return FeatureEncoding(features=tuple(features))


def encode_features(
    columns: Mapping[str, Sequence[str]], encoding: FeatureEncoding, *, source: str = "data"
) -> tuple[npt.NDArray[np.float32], FeatureEncoding]:
    """Encode raw string columns with ``encoding``; return the matrix and the fully specified encoding.

    Numeric features without mean/std get them from these rows (std 0 becomes 1). Rows are numbered from 2
    in messages (line 1 is the header).

    Raises:
        ConfigurationError: a feature column is missing, a numeric value is empty or not a number, or a
            categorical value is not in the feature's category list (add it to the configured list).
    """
    blocks: list[npt.NDArray[np.float32]] = []
    resolved: list[NumericFeature | CategoricalFeature] = []
    for f in encoding.features:
        if f.name not in columns:
            raise ConfigurationError(
                f"{source}: feature column {f.name!r} not found; columns are {sorted(columns)}"
            )
        values = columns[f.name]
        if isinstance(f, NumericFeature):
            nums = np.empty(len(values), dtype=np.float64)
            for i, v in enumerate(values):
                parsed = _parse_float(v)
                if parsed is None:
                    raise ConfigurationError(
                        f"{source}: row {i + 2}, column {f.name!r}: {v!r} is not a finite number"
                    )
                nums[i] = parsed
            mean = float(nums.mean()) if f.mean is None else f.mean
            std = f.std
            if std is None:
                local = float(nums.std())
                std = local if local > 0 else 1.0
            blocks.append(((nums - mean) / std).astype(np.float32)[:, None])
            resolved.append(NumericFeature(name=f.name, mean=mean, std=std))
        else:
            index = {c: j for j, c in enumerate(f.categories)}
            onehot = np.zeros((len(values), len(f.categories)), dtype=np.float32)
            for i, v in enumerate(values):
                j = index.get(v)
                if j is None:
                    raise ConfigurationError(
                        f"{source}: row {i + 2}, column {f.name!r}: category {v!r} is not in the configured "
                        f"list {list(f.categories)}; add it to the feature encoding"
                    )
                onehot[i, j] = 1.0
            blocks.append(onehot)
            resolved.append(f)
    return np.concatenate(blocks, axis=1), FeatureEncoding(features=tuple(resolved))


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
        parsed = _parse_float(v)
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
    column except ``label_column`` and ``drop_columns`` is a feature and the encoding is inferred (see the
    module docstring). Labels are non-negative integers, or strings mapped through ``label_classes``.
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


def write_idx(path: str | Path, array: npt.ArrayLike, *, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (gzip-compressed if ``compress``); uint8 arrays give the MNIST magics.

    Raises:
        ConfigurationError: a dtype IDX cannot hold (use uint8, int8, int16, int32,
            float32 or float64) or an array with no dimensions.
    """
    arr = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    code = codes.get(arr.dtype.newbyteorder("="))
    if code is None or arr.ndim == 0 or arr.ndim > 255:
        raise ConfigurationError(f"cannot write dtype {arr.dtype} with {arr.ndim} dimensions as IDX")
    head = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.astype(np.dtype(_IDX_DTYPES[code])).tobytes()
    Path(path).write_bytes(gzip.compress(data, mtime=0) if compress else data)


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


# -- splits ----------------------------------------------------------------------------------------------


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


def split_across_organisations(
    dataset: ArrayDataset,
    k: int,
    *,
    method: SplitMethod = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    fractions: Sequence[float] | None = None,
    min_size: int = 1,
) -> list[ArrayDataset]:
    """Split a dataset across ``k`` organisations with :func:`split_indices` (demos and benchmarks)."""
    parts = split_indices(
        dataset.y, k, method=method, seed=seed, alpha=alpha, fractions=fractions, min_size=min_size
    )
    return [dataset.subset(p) for p in parts]


__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MNIST_MEAN",
    "MNIST_STD",
    "ArrayDataset",
    "CategoricalFeature",
    "DataFormat",
    "FeatureEncoding",
    "NumericFeature",
    "SplitMethod",
    "default_labels_path",
    "detect_format",
    "encode_features",
    "infer_encoding",
    "load_csv",
    "load_dataset",
    "load_idx",
    "load_npz",
    "read_idx",
    "split_across_organisations",
    "split_indices",
    "train_validation_split",
    "write_idx",
]
