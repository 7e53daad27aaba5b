"""The curator's durable state: global model, completed rounds and metrics history, in one atomic file.

``checkpoint.npz`` holds the weights and a JSON document (rounds completed, history, status) together, so a
crash can never leave a model and a history that disagree. ``report.json`` (and ``report.png``) are derived
from it and rewritten after every round for people and dashboards.

``rounds/round-NNNNNN.npz`` keep the global weights after each of the last ``rounds.keep_weights`` rounds
(with the model's fingerprint), so an earlier round's model can be exported (``tessera model export
--round N``). They are written after the checkpoint and never read back by the curator: the checkpoint alone
is its state, and a missing or pruned round file only means that round can no longer be exported.
"""

from __future__ import annotations

import io
import json
import re
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
ROUNDS_DIR = "rounds"
FORMAT_VERSION = 1
_ROUND_FILE = re.compile(r"^round-(\d{6,})\.npz$")


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


def round_weights_path(state_dir: Path, round_number: int) -> Path:
    return state_dir / ROUNDS_DIR / f"round-{round_number:06d}.npz"


def save_round_weights(
    state_dir: Path, round_number: int, weights: npt.NDArray[np.float32], fingerprint: str, *, keep: int
) -> None:
    """Keep the weights after ``round_number``, and delete round files older than the last ``keep``."""
    if keep <= 0:
        return
    atomic_write_arrays(
        round_weights_path(state_dir, round_number),
        weights=np.asarray(weights, dtype=np.float32),
        fingerprint=np.frombuffer(fingerprint.encode(), dtype=np.uint8),
    )
    for old in saved_rounds(state_dir):
        if old <= round_number - keep:
            round_weights_path(state_dir, old).unlink(missing_ok=True)


def saved_rounds(state_dir: Path) -> list[int]:
    """The rounds whose weights are kept in ``rounds/``, ascending."""
    directory = state_dir / ROUNDS_DIR
    if not directory.is_dir():
        return []
    found = (_ROUND_FILE.match(p.name) for p in directory.iterdir())
    return sorted(int(m[1]) for m in found if m)


def load_round_weights(state_dir: Path, round_number: int) -> tuple[npt.NDArray[np.float32], str]:
    """The kept weights after ``round_number`` and the model fingerprint they belong to.

    Raises:
        ConfigurationError: no such file, or a damaged one.
    """
    path = round_weights_path(state_dir, round_number)
    if not path.exists():
        raise ConfigurationError(f"no weights kept for round {round_number} ({path} does not exist)")
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as archive:
            weights = archive["weights"].astype(np.float32)
            fingerprint = archive["fingerprint"].tobytes().decode()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"round weights {path} are damaged ({exc})") from exc
    return weights, fingerprint


__all__ = [
    "CHECKPOINT",
    "REPORT",
    "ROUNDS_DIR",
    "CuratorState",
    "load",
    "load_round_weights",
    "round_weights_path",
    "save",
    "save_round_weights",
    "saved_rounds",
]
