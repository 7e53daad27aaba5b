"""``tessera model export``: the federation's model as files any PyTorch user can load.

From a curator's state directory: the final model (the weights in ``checkpoint.npz``) or, with ``round``,
the weights after an earlier round kept in ``rounds/`` (``rounds.keep_weights``). From a participant's state
directory: the last model the curator announced to it (``announced-model.npz``, one round behind the final
one, since the curator sends no weights after the last round).

Written into the output directory:

- ``model.pt``: the ``state_dict`` (``torch.save``; load with ``torch.load(..., weights_only=True)``);
- ``model.safetensors``: the same tensors (``safetensors.torch.load_file``), no pickle at all;
- ``model.json``: the model spec (``ModelSpec``: build the module with ``tessera.models.build_model``), the
  round, the fingerprint, the tensor names and shapes, and the SHA-256 of every file written;
- ``model.onnx`` with ``onnx=True`` (needs the ``onnx`` and ``onnxscript`` packages: the ``onnx`` extra).

Everything is checked (checkpoint readable, round kept, model rebuilt with the recorded fingerprint) and
written into a temporary directory beside the output first; only then are the files moved into place, so
an error leaves the output directory as it was. docs/model.md shows how to load and use the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from tessera.errors import ConfigurationError, LocalUsageError

EXPORT_FORMAT = "tessera-model-export/1"
FILES = ("model.pt", "model.safetensors", "model.json")
ONNX_FILE = "model.onnx"
Source = Literal["curator", "participant"]


@dataclass(frozen=True)
class _Snapshot:
    """Weights and what they belong to, as read from a state directory."""

    source: Source
    federation: str
    round: int
    model: dict[str, Any]
    model_fingerprint: str
    weights: npt.NDArray[np.float32]
    extra: dict[str, Any]


@dataclass(frozen=True)
class Exported:
    directory: Path
    files: tuple[Path, ...]
    source: Source
    round: int


def detect_source(state_dir: Path) -> Source:
    from tessera.curator.checkpoint import CHECKPOINT
    from tessera.participant.announced import FILE_NAME

    if (state_dir / CHECKPOINT).exists():
        return "curator"
    if (state_dir / FILE_NAME).exists():
        return "participant"
    if not state_dir.is_dir():
        raise ConfigurationError(f"state directory {state_dir} does not exist")
    raise ConfigurationError(
        f"{state_dir} holds neither a curator checkpoint ({CHECKPOINT}) nor a participant's announced model "
        f"({FILE_NAME}): is it the service's state directory, and has a round been announced?"
    )


def _from_curator(state_dir: Path, round_number: int | None) -> _Snapshot:
    from tessera.curator import checkpoint

    state = checkpoint.load(state_dir)
    if state is None:
        raise ConfigurationError(f"no curator checkpoint in {state_dir} ({checkpoint.CHECKPOINT} is missing)")
    latest = state.rounds_completed
    kept = checkpoint.saved_rounds(state_dir)
    if round_number is None:
        if latest == 0:
            raise ConfigurationError(
                f"the checkpoint in {state_dir} holds no trained model yet: no round has completed"
            )
        round_number = latest
    if round_number == latest and latest > 0:
        weights = state.weights
    elif round_number in kept and round_number <= latest:
        weights, fingerprint = checkpoint.load_round_weights(state_dir, round_number)
        if fingerprint != state.model_fingerprint:
            raise ConfigurationError(
                f"round {round_number}'s weights belong to model {fingerprint[:12]}, the checkpoint's model is "
                f"{state.model_fingerprint[:12]}"
            )
    else:
        available = sorted({*[r for r in kept if r <= latest], *([latest] if latest else [])})
        raise ConfigurationError(
            f"round {round_number} cannot be exported from {state_dir}: {latest} rounds completed, weights kept "
            f"for rounds {available or 'none'} (keep more with rounds.keep_weights)"
        )
    record = next((r for r in state.history if r.round == round_number), None)
    extra: dict[str, Any] = {
        "rounds_completed": latest,
        "status": state.status.value,
        "stop_reason": state.stop_reason,
    }
    if record is not None and record.curator_validation is not None:
        extra["curator_validation"] = record.curator_validation.to_json()
    return _Snapshot(
        "curator", state.federation, round_number, state.model, state.model_fingerprint, weights, extra
    )


def _from_participant(state_dir: Path, round_number: int | None) -> _Snapshot:
    from tessera.participant import announced

    saved = announced.load(state_dir)
    if round_number is not None and round_number != saved.round:
        raise ConfigurationError(
            f"a participant keeps only the last model announced to it (round {saved.round}), not round "
            f"{round_number}; export earlier rounds from the curator's state directory"
        )
    return _Snapshot(
        "participant",
        saved.federation,
        saved.round,
        saved.model,
        saved.model_fingerprint,
        saved.weights,
        {
            "organisation": saved.organisation,
            "num_classes": saved.num_classes,
            "note": "the model announced in this round, before its update",
        },
    )


def _example_input(spec: Any, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape:
        return tuple(input_shape)
    if spec.name == "mlp" and isinstance(spec.kwargs.get("input_dim"), int):
        return (1, int(spec.kwargs["input_dim"]))
    if spec.name == "cnn28":
        return (1, 1, 28, 28)
    raise ConfigurationError(f"ONNX export of model {spec.name!r} needs an input shape (--input-shape)")


def _write_onnx(model: Any, shape: tuple[int, ...], path: Path) -> None:
    import torch

    try:
        import onnx  # noqa: F401  (the exporter needs it; say so before torch's longer message)
    except ImportError as exc:
        raise ConfigurationError(
            "ONNX export needs the onnx and onnxscript packages: pip install 'tessera-fl[onnx]'"
        ) from exc
    # A batch of 2 as the example: torch.export specialises a dimension of size 1, so the batch would not
    # stay dynamic.
    example = torch.zeros((max(2, shape[0]), *shape[1:]), dtype=torch.float32)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
        dynamo=True,
        verbose=False,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_model(
    state_dir: Path,
    out_dir: Path,
    *,
    source: Source | None = None,
    round_number: int | None = None,
    onnx: bool = False,
    input_shape: Sequence[int] | None = None,
    force: bool = False,
    allowed_imports: Collection[str] = (),
) -> Exported:
    """Export a model from ``state_dir`` into ``out_dir`` (created if needed).

    Raises:
        ConfigurationError: no or a damaged checkpoint, a round not kept, a model that cannot be rebuilt
            with its recorded fingerprint, or output files that exist (without ``force``). Nothing is
            written then.
    """
    import torch
    from safetensors.torch import save_file
    from tessera.models import ModelSpec, build_model, load_flat_parameters, model_fingerprint

    state_dir, out_dir = Path(state_dir), Path(out_dir)
    source = source or detect_source(state_dir)
    snapshot = (
        _from_curator(state_dir, round_number)
        if source == "curator"
        else _from_participant(state_dir, round_number)
    )
    names = (*FILES, ONNX_FILE) if onnx else FILES
    clashes = [n for n in names if (out_dir / n).exists()]
    if clashes and not force:
        raise ConfigurationError(
            f"{out_dir} already holds {', '.join(clashes)}; pass --force to replace them"
        )

    spec = ModelSpec.model_validate(snapshot.model)
    model = build_model(spec, allowed_imports=allowed_imports)
    if model_fingerprint(spec, model) != snapshot.model_fingerprint:
        raise ConfigurationError(
            f"model {spec.canonical_json()} built here has fingerprint {model_fingerprint(spec, model)[:12]}, "
            f"the weights were trained for {snapshot.model_fingerprint[:12]}: another tessera version?"
        )
    try:
        load_flat_parameters(model, snapshot.weights)
    except LocalUsageError as exc:
        raise ConfigurationError(f"the saved weights do not fit the model: {exc}") from exc
    model.eval()
    # Contiguous copies: safetensors refuses shared or strided storage.
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    shape = _example_input(spec, input_shape) if onnx else None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        torch.save(state_dict, staging / "model.pt")
        save_file(
            state_dict,
            str(staging / "model.safetensors"),
            metadata={"format": EXPORT_FORMAT, "model": spec.canonical_json(), "round": str(snapshot.round)},
        )
        if shape is not None:
            _write_onnx(model, shape, staging / ONNX_FILE)
        document = {
            "format": EXPORT_FORMAT,
            "source": snapshot.source,
            "federation": snapshot.federation,
            "round": snapshot.round,
            "model": spec.model_dump(),
            "model_fingerprint": snapshot.model_fingerprint,
            "parameters": int(snapshot.weights.size),
            "tensors": {k: list(v.shape) for k, v in state_dict.items()},
            **({"onnx_input_shape": list(shape)} if shape is not None else {}),
            **snapshot.extra,
            "sha256": {n: _sha256(staging / n) for n in names if n != "model.json"},
        }
        (staging / "model.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Exported(out_dir, tuple(out_dir / n for n in names), snapshot.source, snapshot.round)


def load_exported(directory: Path, *, allowed_imports: Collection[str] = ()) -> Any:
    """The exported model as an ``nn.Module`` in eval mode (from ``model.json`` and ``model.safetensors``)."""
    from safetensors.torch import load_file
    from tessera.models import ModelSpec, build_model

    directory = Path(directory)
    meta = json.loads((directory / "model.json").read_text())
    model = build_model(ModelSpec.model_validate(meta["model"]), allowed_imports=allowed_imports)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()


__all__ = ["EXPORT_FORMAT", "Exported", "detect_source", "export_model", "load_exported"]
