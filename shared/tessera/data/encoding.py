"""CSV feature encoding: which columns are features and how each becomes numbers, shared by every site.

Organisations must encode features identically or the federated model sees different inputs at each site, so
the encoding is an explicit, serialisable value (:class:`FeatureEncoding`) that one organisation publishes and
the others configure. :func:`infer_encoding` proposes one from local columns; :func:`encode_features` applies
one and fills in local statistics where the encoding leaves them open.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tessera.errors import ConfigurationError


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


def parse_number(value: str) -> float | None:
    """``value`` as a finite float, or ``None`` when it is empty, not a number, NaN or infinite.

    The one rule for what a CSV cell counts as a number: the CSV reader's label parser uses it too, so a
    column inferred as numeric and a label column accept exactly the same text.
    """
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
        if non_empty and all(parse_number(v) is not None for v in non_empty):
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
                parsed = parse_number(v)
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


__all__ = [
    "CategoricalFeature",
    "Feature",
    "FeatureEncoding",
    "NumericFeature",
    "encode_features",
    "infer_encoding",
    "parse_number",
]
