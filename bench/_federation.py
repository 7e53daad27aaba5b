"""Shared by the accuracy benchmarks (``bench/mnist.py``, ``bench/ai4i.py``): where the data is, and one
federation run in process with the real curator and participants (:func:`tessera.apps.local_federation.
run_local_federation`: secure aggregation, DP-SGD and FedAvg exactly as in the services), with its progress
on stderr and its history returned."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_ENV = "TESSERA_DATA_DIR"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
"""``../shared/data`` relative to the repository (the repository is ``bench/..``)."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def privacy_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The participants' ``privacy`` settings from a benchmark's command line (``--privacy``, ``--epsilon``,
    ``--delta``, the training options); DP-SGD plans its budget for ``--rounds``."""
    if args.privacy == "distributed":
        weights = None if args.class_weight == 1.0 else [1.0] * (args.num_classes - 1) + [args.class_weight]
        return {
            "enabled": True,
            "target_epsilon": args.epsilon,
            "delta": args.delta,
            "planned_rounds": args.rounds,
            "batch_size": args.batch_size,
            "class_weights": weights,
        }
    return {
        "enabled": args.privacy == "local",
        "target_epsilon": args.epsilon,
        "delta": args.delta,
        "max_grad_norm": args.max_grad_norm,
        "planned_rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lr_decay": args.lr_decay,
        "momentum": args.momentum,
    }


def data_dir(option: Path | None) -> Path:
    """``--data-dir``, else ``$TESSERA_DATA_DIR``, else ``../shared/data`` next to the repository."""
    if option is not None:
        return option
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else DEFAULT_DATA_DIR


def require_files(folder: Path, names: list[str], what: str) -> list[Path]:
    """The files ``folder/name``; exit with a clear message (status 2) if any is missing."""
    paths = [folder / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        say(
            f"{what} not found: missing {', '.join(missing)}.\n"
            f"Point --data-dir or ${DATA_ENV} at the shared data folder (default {DEFAULT_DATA_DIR}); "
            "see its README.md for the expected layout."
        )
        raise SystemExit(2)
    return paths


class _Progress:
    """Prints each round of the curator's report once, as it is written."""

    def __init__(self, report: Path, label: str) -> None:
        self.report = report
        self.label = label
        self.shown = 0
        self.started = time.monotonic()

    def poll(self) -> None:
        try:
            document = json.loads(self.report.read_text())
        except (OSError, ValueError):
            return
        for record in document["history"][self.shown :]:
            parts = [f"{self.label} round {record['round']:>3}"]
            validation = record.get("curator_validation") or {}
            if validation.get("accuracy") is not None:
                parts.append(f"test acc {validation['accuracy']:.4f}")
            if record.get("accuracy") is not None:
                parts.append(f"secure-avg acc {record['accuracy']:.4f}")
            if len(record.get("recall") or []) == 2:
                parts.append(
                    f"recall[-1] {record['recall'][-1]:.3f} precision[-1] {record['precision'][-1]:.3f}"
                )
            if record.get("epsilon_mean"):
                parts.append(f"eps {record['epsilon_mean']:.2f}")
            parts.append(f"clipped {record['clipped_fraction']:.2e}")
            parts.append(f"round {sum(record['seconds'].values()):.1f} s")
            parts.append(f"elapsed {time.monotonic() - self.started:.0f} s")
            say(" | ".join(parts))
        self.shown = len(document["history"])


@dataclass(frozen=True)
class FederationRun:
    """What one federation run leaves: the curator's final report, the final global model, each
    organisation's ε as its own accountant recorded it (empty without DP), and the wall time."""

    document: dict[str, Any]
    weights: Any  # numpy float32 vector, the order of tessera.models.flatten_parameters
    epsilon: dict[str, float]
    wall: float


def run_federation(**kwargs: Any) -> tuple[dict[str, Any], float]:
    """Run the federation to its end; returns (the curator's final report document, wall seconds). The
    arguments are those of :func:`run_federation_full`."""
    run = run_federation_full(**kwargs)
    return run.document, run.wall


def _accountant_epsilon(state_dir: Path) -> float | None:
    """ε spent as the organisation's persistent accountant file records it (None when there is none)."""
    from tessera.dp import PersistentAccountant, PrivacyBudget
    from tessera.participant.plan import ACCOUNTANT_FILE

    path = state_dir / ACCOUNTANT_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return PersistentAccountant.load_or_create(
        path,
        PrivacyBudget(**saved["budget"]),
        accountant=saved["mechanism"],
        dataset_fingerprint=saved["dataset_fingerprint"],
    ).epsilon()


def run_federation_full(
    *,
    federation: str,
    organisations: list[str],
    datasets: Mapping[str, tuple[Any, Any]],
    model: dict[str, Any],
    num_classes: int,
    rounds: int,
    secagg: dict[str, Any],
    privacy: dict[str, Any],
    roster: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    privacy_per_org: Mapping[str, dict[str, Any]] | None = None,
    data: Mapping[str, dict[str, Any]],
    curator_validation: Any = None,
    validation_settings: dict[str, Any] | None = None,
    training_seed: int = 0,
    model_seed: int = 0,
    label: str = "",
    allowed_imports: tuple[str, ...] = (),
) -> FederationRun:
    """Run the federation to its end.

    ``secagg`` holds the curator's secure-aggregation settings, ``roster`` the roster's parameters (the layout:
    ``{"layout": {"clip": ..., "ring_bits": ...}}``, the threshold, the privacy mode).
    ``privacy`` is the participants' ``privacy`` settings (the same for every organisation); ``data`` maps each
    organisation to its ``data`` settings, which document where its data is and how it is read: the datasets
    themselves are handed over in memory, already loaded that way. ``privacy_per_org`` overrides
    fields of ``privacy`` for the organisations it names. ``allowed_imports`` is every participant's list of trusted
    ``import:`` model factories.
    """
    from tessera.apps.local_federation import run_local_federation
    from tessera.curator.settings import CuratorSettings
    from tessera.participant.settings import ParticipantSettings
    from tessera.roster import FederationParameters, create_demo_federation
    from tessera.settings import LoggingSettings, configure_logging

    configure_logging(LoggingSettings(level="error"))
    with tempfile.TemporaryDirectory(prefix=f"tessera-bench-{federation}-") as tmp:
        work = Path(tmp)
        fingerprint = create_demo_federation(
            federation,
            organisations,
            work / "federation",
            parameters=FederationParameters.model_validate(roster or {}),
        ).fingerprint()
        common: dict[str, Any] = {
            "federation": federation,
            "roster_file": str(work / "federation" / "roster.json"),
            "model": model,
            "num_classes": num_classes,
            "health": {"enabled": False},
            "logging": {"level": "error"},
        }
        curator = CuratorSettings(
            **common,
            state_dir=str(work / "curator"),
            rounds={
                "max_rounds": rounds,
                "min_participants": 3,
                "training_timeout": 1800,
                "seed": model_seed,
            },
            secagg=secagg,
            validation=validation_settings,
            roster_fingerprint=fingerprint,
            server=server or {},
        )
        participants = {
            o: ParticipantSettings(
                **common,
                organisation=o,
                roster_fingerprint=fingerprint,
                identity_key_file=str(work / "federation" / "keys" / f"{o}.key"),
                state_dir=str(work / "participants" / o),
                data=data[o],
                privacy={**privacy, **(privacy_per_org or {}).get(o, {})},
                training_seed=training_seed * 1000 + i,
                allowed_imports=allowed_imports,
            )
            for i, o in enumerate(organisations)
        }
        progress = _Progress(work / "curator" / "report.json", label)
        done = threading.Event()

        def show() -> None:
            while not done.wait(1.0):
                progress.poll()

        watcher = threading.Thread(target=show, daemon=True)
        watcher.start()
        started = time.monotonic()
        try:
            result = run_local_federation(
                curator, participants, dict(datasets), curator_validation=curator_validation
            )
        finally:
            done.set()
            watcher.join()
        wall = time.monotonic() - started
        progress.poll()
        if result.errors:
            raise RuntimeError(f"participants failed: {result.errors}")
        document: dict[str, Any] = json.loads((work / "curator" / "report.json").read_text())
        spent = {o: _accountant_epsilon(work / "participants" / o) for o in organisations}
        return FederationRun(
            document=document,
            weights=result.state.weights.copy(),
            epsilon={o: e for o, e in spent.items() if e is not None},
            wall=wall,
        )


def round_seconds(record: Mapping[str, Any]) -> float:
    """A round's duration as the curator measured it: training plus every secure-aggregation phase."""
    return float(sum(record["seconds"].values()))
