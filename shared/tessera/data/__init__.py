"""Local data loading: CSV, MNIST-style IDX and NPZ files into one in-memory array dataset.

One module per job: :mod:`~tessera.data.dataset` (the :class:`ArrayDataset` type),
:mod:`~tessera.data.encoding` (CSV feature encoding), :mod:`~tessera.data.readers` (the file readers and
:func:`load_dataset`) and :mod:`~tessera.data.splits` (seeded splits). Import from this package; the names
below are its public surface.

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
- Splits (:func:`train_validation_split`, :func:`split_indices`) are deterministic functions of their
  arguments and seed.
"""

from tessera.data.dataset import ArrayDataset
from tessera.data.encoding import (
    CategoricalFeature,
    FeatureEncoding,
    NumericFeature,
    encode_features,
    infer_encoding,
)
from tessera.data.readers import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    MNIST_MEAN,
    MNIST_STD,
    DataFormat,
    default_labels_path,
    detect_format,
    load_csv,
    load_dataset,
    load_idx,
    load_npz,
    read_idx,
)
from tessera.data.splits import SplitMethod, split_indices, train_validation_split

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
    "split_indices",
    "train_validation_split",
]
