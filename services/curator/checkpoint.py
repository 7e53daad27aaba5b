"""The curator's durable state: global model, completed rounds and metrics history, in one atomic file.

``checkpoint.npz`` holds the weights and a JSON document (rounds completed, history, status) together, so a
crash can never leave a model and a history that disagree. ``report.json`` (and ``report.png``) are derived
from it and rewritten after every round for people and dashboards.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tessera.errors import ConfigurationError
from tessera.storage import atomic_write_arrays, atomic_write_json

from .records import RoundRecord, Status

CHECKPOINT = "checkpoint.npz"
REPORT = "report.json"
FORMAT_VERSION = 1


@dataclass
class CuratorState:
    """Everything the curator must remember across restarts."""

    federation: str
    model: dict[str, Any]
    model_fingerprint: str
    weights: npt.NDArray[np.float32]
    rounds_completed: int = 0
    history: list[RoundRecord] = field(default_factory=list)
    status: Status = Status.RUNNING
    stop_reason: str | None = None
    restarts: int = 0
    # Active organisations that missed their last round and have sent nothing since (see Attendance).
    unresponsive: tuple[str, ...] = ()
    # Organisations excluded for repeated misbehaviour, with the reason (see Attendance).
    excluded: dict[str, str] = field(default_factory=dict)
    # The server optimiser's momentum buffer (distributed privacy mode), saved in the same write.
    momentum: npt.NDArray[np.float64] | None = None

    def document(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "federation": self.federation,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "rounds_completed": self.rounds_completed,
            "history": [record.to_json() for record in self.history],
            "status": self.status.value,
            "stop_reason": self.stop_reason,
            "restarts": self.restarts,
            "unresponsive": list(self.unresponsive),
            "excluded": dict(self.excluded),
        }


def save(state_dir: Path, state: CuratorState, *, report_extra: dict[str, Any] | None = None) -> None:
    """Write the checkpoint atomically, then the report derived from it."""
    meta = json.dumps(state.document(), allow_nan=False).encode()
    arrays: dict[str, npt.NDArray[Any]] = {
        "weights": state.weights,
        "meta": np.frombuffer(meta, dtype=np.uint8),
    }
    if state.momentum is not None:
        arrays["momentum"] = state.momentum
    atomic_write_arrays(state_dir / CHECKPOINT, **arrays)
    atomic_write_json(state_dir / REPORT, {**state.document(), **(report_extra or {})})


def load(state_dir: Path) -> CuratorState | None:
    """The saved state, or None on a first start. A damaged checkpoint is an error, never a silent reset."""
    path = state_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as archive:
            weights = archive["weights"].astype(np.float32)
            meta = json.loads(archive["meta"].tobytes().decode())
            momentum = archive["momentum"].astype(np.float64) if "momentum" in archive.files else None
    except (
        OSError,
        ValueError,
        KeyError,
        zipfile.BadZipFile,
        json.JSONDecodeError,
        UnicodeDecodeError,
    ) as exc:
        raise ConfigurationError(
            f"checkpoint {path} is damaged ({exc}); move it away to start the federation from scratch"
        ) from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigurationError(f"checkpoint {path} has format {meta.get('format_version')}, expected 1")
    try:
        return CuratorState(
            federation=meta["federation"],
            model=meta["model"],
            model_fingerprint=meta["model_fingerprint"],
            weights=weights,
            rounds_completed=int(meta["rounds_completed"]),
            history=[RoundRecord.from_json(record) for record in meta["history"]],
            status=Status(meta["status"]),
            stop_reason=meta.get("stop_reason"),
            restarts=int(meta.get("restarts", 0)),
            unresponsive=tuple(meta.get("unresponsive", ())),
            excluded=dict(meta.get("excluded", {})),
            momentum=momentum,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigurationError(
            f"checkpoint {path} is damaged ({type(exc).__name__}: {exc}); move it away to start the "
            "federation from scratch"
        ) from exc


__all__ = ["CHECKPOINT", "REPORT", "CuratorState", "load", "save"]
