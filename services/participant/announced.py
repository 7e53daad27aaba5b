"""The last model the curator announced and this organisation accepted, kept for ``tessera model export``.

A participant never sees the weights after the final round (the curator keeps them; ``Finished`` carries
none), so what it can export is the model of the last round it was invited to: one round behind the
curator's final model. ``<state_dir>/announced-model.npz`` holds the weights and a JSON document (federation,
organisation, round, model spec, fingerprint, classes); it is rewritten atomically for every accepted
announcement and never read back by the participant itself.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tessera.errors import ConfigurationError
from tessera.storage import atomic_write_arrays

FILE_NAME = "announced-model.npz"


@dataclass(frozen=True)
class AnnouncedModel:
    federation: str
    organisation: str
    round: int
    model: dict[str, Any]
    model_fingerprint: str
    num_classes: int
    weights: npt.NDArray[np.float32]

    def document(self) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "organisation": self.organisation,
            "round": self.round,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "num_classes": self.num_classes,
        }


def save(state_dir: Path, announced: AnnouncedModel) -> None:
    meta = json.dumps(announced.document(), allow_nan=False).encode()
    atomic_write_arrays(
        state_dir / FILE_NAME,
        weights=np.asarray(announced.weights, dtype=np.float32),
        meta=np.frombuffer(meta, dtype=np.uint8),
    )


def load(state_dir: Path) -> AnnouncedModel:
    """Raises ConfigurationError when there is none (no round announced yet) or it is damaged."""
    path = state_dir / FILE_NAME
    if not path.exists():
        raise ConfigurationError(
            f"{path} does not exist: this participant has not accepted a round's model yet "
            "(or its state directory is another one)"
        )
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as archive:
            weights = archive["weights"].astype(np.float32)
            meta = json.loads(archive["meta"].tobytes().decode())
        return AnnouncedModel(
            federation=str(meta["federation"]),
            organisation=str(meta["organisation"]),
            round=int(meta["round"]),
            model=dict(meta["model"]),
            model_fingerprint=str(meta["model_fingerprint"]),
            num_classes=int(meta["num_classes"]),
            weights=weights,
        )
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        zipfile.BadZipFile,
        json.JSONDecodeError,
        UnicodeDecodeError,
    ) as exc:
        raise ConfigurationError(f"{path} is damaged ({type(exc).__name__}: {exc})") from exc


__all__ = ["FILE_NAME", "AnnouncedModel", "load", "save"]
