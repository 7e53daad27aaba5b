"""Differential-privacy budget planning and persistent accounting (around Opacus' accountants).

One participant has one privacy budget for the whole federation, not one per round (PITFALLS.md, "ε per
round instead of cumulative"), and its accountant survives restarts ("No accountant survives a restart").
This module holds the bookkeeping; the maths is Opacus' (``opacus.accountants``). It never imports
``PrivacyEngine``: DP-SGD itself lives in ``tessera.participant.training``.

Rules
-----
- :class:`PrivacyBudget` fixes the target (ε, δ), the clipping norm, and the training plan: ``planned_rounds``
  rounds of ``local_epochs`` epochs each, Poisson sampling at ``sample_rate = batch_size / n_train``, hence
  ``steps_per_round = ceil(local_epochs / sample_rate)`` DP-SGD steps per round.
- :func:`plan_noise_multiplier` finds the smallest noise multiplier σ (to a small tolerance) such that
  ``planned_rounds × steps_per_round`` steps at that sample rate stay within the target ε.
- :class:`PersistentAccountant` keeps the accountant's history ``[(σ, q, steps), ...]`` in a JSON file written
  atomically (temp file in the same folder, fsync, ``os.replace``, fsync of the folder) after every
  recorded round. A round is recorded *before* it is trained (write-ahead): a crash after recording can only
  over-count spent privacy, never under-count it.
- The file pins the parameters that give ε its meaning: δ, the target ε, the clipping norm, the accounting
  mechanism and (optionally) a fingerprint of the training data. Loading it under different values raises
  :class:`~tessera.errors.ConfigurationError` naming each difference; a corrupt file raises too. Nothing is
  ever silently reset.

File format (version 1), a JSON object::

    {"format": "tessera.dp.accountant", "version": 1, "mechanism": "rdp",
     "budget": {<PrivacyBudget fields>}, "dataset_fingerprint": "<hex>" | null,
     "rounds_done": 3, "history": [[sigma, sample_rate, steps], ...], "checksum": "<sha256 hex>"}

``checksum`` is the SHA-256 of the canonical JSON (sorted keys, no spaces) of all the other fields.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tessera import skellam
from tessera.errors import ConfigurationError, LocalUsageError
from tessera.storage import atomic_write_bytes

AccountantKind = Literal["rdp", "prv", "skellam"]
"""Accounting mechanisms we allow: Opacus' ``rdp`` and ``prv`` for the (local) Gaussian mechanism, and
``skellam`` for distributed DP-SGD's Poisson-subsampled Skellam mechanism (:mod:`tessera.skellam`). Opacus'
``gdp`` is an asymptotic approximation, not an upper bound."""

_FORMAT = "tessera.dp.accountant"
_VERSION = 1
# Fields of the budget that give ε its meaning: changing any of them under an existing history is refused.
_PINNED_FIELDS = ("target_epsilon", "delta", "max_grad_norm")

HistoryEntry = tuple[float, ...]
"""One accountant history entry. Gaussian mechanisms: (noise multiplier σ, sample rate q, steps); Skellam:
(variance μ, L2 sensitivity Δ2, L1 sensitivity Δ1, sample rate q, steps). The last field is always the
number of steps, the one before it the sample rate."""

_ENTRY_FIELDS = {"rdp": 3, "prv": 3, "skellam": 5}


def steps_for_epochs(epochs: float, *, n_train: int, batch_size: int) -> int:
    """Optimiser steps that make ``epochs`` passes over ``n_train`` records in (expected) batches of
    ``batch_size``: ceil(epochs · n_train / batch_size), at least 1. The same plan with or without DP."""
    # Rounded before ceil so that e.g. 3 epochs at q = 0.03 gives 100 steps, not 101 from float noise.
    return max(1, math.ceil(round(epochs * n_train / batch_size, 9)))


class PrivacyBudget(BaseModel):
    """A participant's privacy budget and training plan (frozen, validated).

    ``sample_rate`` is ``batch_size / n_train`` (the Poisson sampling probability of one record per step) and
    ``steps_per_round`` is ``ceil(local_epochs / sample_rate)``. Invalid values (including
    ``batch_size > n_train``) raise pydantic's ``ValidationError``, a ``ValueError`` naming the field.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_epsilon: float = Field(gt=0, allow_inf_nan=False, description="Total ε for the whole federation.")
    delta: float = Field(gt=0, lt=1, description="δ of the (ε, δ) guarantee; well below 1 / n_train.")
    max_grad_norm: float = Field(gt=0, allow_inf_nan=False, description="Per-sample gradient clipping norm.")
    planned_rounds: int = Field(ge=1, description="Rounds the budget must last.")
    local_epochs: float = Field(gt=0, allow_inf_nan=False, description="Epochs of local training per round.")
    batch_size: int = Field(ge=1, description="Expected (Poisson) batch size.")
    n_train: int = Field(ge=1, description="Size of this participant's training split.")

    def model_post_init(self, __context: Any) -> None:
        if self.batch_size > self.n_train:
            raise ConfigurationError(
                f"batch_size {self.batch_size} exceeds the training set size {self.n_train}: "
                "the sample rate batch_size / n_train must be at most 1; lower batch_size"
            )

    @property
    def sample_rate(self) -> float:
        """Poisson sampling rate q = batch_size / n_train, in (0, 1]."""
        return self.batch_size / self.n_train

    @property
    def steps_per_round(self) -> int:
        """DP-SGD steps per round: ceil(local_epochs / sample_rate), at least 1."""
        return steps_for_epochs(self.local_epochs, n_train=self.n_train, batch_size=self.batch_size)

    @property
    def planned_steps(self) -> int:
        """Total DP-SGD steps of the plan: planned_rounds × steps_per_round."""
        return self.planned_rounds * self.steps_per_round


def _check_mechanism(accountant: str) -> AccountantKind:
    if accountant not in get_args(AccountantKind):
        raise ConfigurationError(
            f"unknown accountant {accountant!r}; choose one of {', '.join(get_args(AccountantKind))}"
        )
    return accountant  # type: ignore[return-value]


def _epsilon_of(mechanism: AccountantKind, history: Sequence[HistoryEntry], delta: float) -> float:
    """ε of a history under a mechanism; 0.0 for an empty history."""
    if not history:
        return 0.0
    if mechanism == "skellam":
        return skellam.epsilon([_skellam_entry(h) for h in history], delta)
    acc: IAccountant = create_accountant(mechanism=mechanism)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def plan_noise_multiplier(
    budget: PrivacyBudget,
    accountant: AccountantKind = "rdp",
    *,
    epsilon_tolerance: float | None = None,
) -> float:
    """Return the noise multiplier σ that makes the whole plan fit the budget.

    After ``budget.planned_steps`` DP-SGD steps at ``budget.sample_rate`` with this σ, the accountant's ε at
    ``budget.delta`` is at most ``budget.target_epsilon`` and at least ``target_epsilon − epsilon_tolerance``
    (binary search over σ, Opacus' ``get_noise_multiplier``). The default tolerance is
    ``target_epsilon / 1000``, tight enough that one round beyond the plan normally overshoots the target.

    Raises:
        ConfigurationError: unknown accountant, or a budget that no σ up to 10⁶ can meet (raise ε or δ,
            or train fewer steps).
    """
    mechanism = _check_mechanism(accountant)
    if mechanism == "skellam":
        raise ConfigurationError(
            "the Skellam mechanism's noise is planned for the whole federation (tessera.skellam."
            "plan_noise_multiplier, `tessera roster build --privacy-mode distributed`), not per organisation"
        )
    tol = budget.target_epsilon / 1000 if epsilon_tolerance is None else epsilon_tolerance
    if not tol > 0:
        raise ConfigurationError(f"epsilon_tolerance must be > 0, got {tol}")
    try:
        with warnings.catch_warnings():
            # The search visits very large σ, where Opacus warns that the best RDP order is the largest one.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=budget.target_epsilon,
                    target_delta=budget.delta,
                    sample_rate=budget.sample_rate,
                    steps=budget.planned_steps,
                    accountant=mechanism,
                    epsilon_tolerance=tol,
                )
            )
    except ValueError as exc:
        raise ConfigurationError(
            f"privacy budget ε={budget.target_epsilon}, δ={budget.delta} cannot be met for "
            f"{budget.planned_steps} steps at sample rate {budget.sample_rate:.6g} ({exc}); "
            "raise target_epsilon, or lower planned_rounds, local_epochs or batch_size"
        ) from exc
    spent = _epsilon_of(mechanism, [(sigma, budget.sample_rate, budget.planned_steps)], budget.delta)
    if not spent <= budget.target_epsilon:  # defensive: the search must return a feasible σ
        raise ConfigurationError(
            f"noise planning failed: σ={sigma} gives ε={spent} > target {budget.target_epsilon}"
        )
    return sigma


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _merge(history: list[HistoryEntry], entry: HistoryEntry) -> list[HistoryEntry]:
    """Append an entry, merging with the last one when all but the step count are equal (as Opacus'
    ``step`` does)."""
    out = list(history)
    if out and out[-1][:-1] == entry[:-1]:
        last = out.pop()
        out.append((*last[:-1], int(last[-1]) + int(entry[-1])))
    else:
        out.append(entry)
    return out


def _validate_entry(noise_multiplier: float, sample_rate: float, steps: int) -> HistoryEntry:
    """A Gaussian entry (σ, q, steps)."""
    return _validate("rdp", (noise_multiplier, sample_rate, steps))


def _validate(mechanism: str, entry: Sequence[Any]) -> HistoryEntry:
    """Check an entry of ``mechanism``'s history; LocalUsageError names the bad field."""
    if len(entry) != _ENTRY_FIELDS[mechanism]:
        raise LocalUsageError(
            f"a {mechanism} history entry has {_ENTRY_FIELDS[mechanism]} fields, got {entry!r}"
        )
    *scales, sample_rate, steps = entry
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LocalUsageError(f"steps must be a positive integer, got {steps!r}")
    for name, value in zip(
        ("noise_multiplier",) if mechanism != "skellam" else ("variance", "l2", "l1"), scales, strict=True
    ):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise LocalUsageError(f"{name} must be finite and > 0, got {value!r}")
    if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
        raise LocalUsageError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return (*(float(v) for v in scales), float(sample_rate), int(steps))


def _skellam_entry(entry: HistoryEntry) -> skellam.SkellamEntry:
    variance, l2, l1, q, steps = entry
    return (variance, l2, l1, q, int(steps))


class PersistentAccountant:
    """An Opacus accountant whose history lives in a JSON file and survives restarts.

    Build it with :meth:`load_or_create`. Every :meth:`record_round` saves the file atomically before it
    returns; a new object loaded from the same path reports the same ε. Not safe for two processes sharing one
    file at the same time (one participant, one accountant file).
    """

    def __init__(
        self,
        path: Path,
        budget: PrivacyBudget,
        mechanism: AccountantKind,
        history: list[HistoryEntry],
        rounds_done: int,
        dataset_fingerprint: str | None,
    ) -> None:
        """Internal: use :meth:`load_or_create`."""
        self._path = path
        self._budget = budget
        self._mechanism = mechanism
        self._history = history
        self._rounds_done = rounds_done
        self._dataset_fingerprint = dataset_fingerprint

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls,
        path: str | os.PathLike[str],
        budget: PrivacyBudget,
        *,
        accountant: AccountantKind = "rdp",
        dataset_fingerprint: str | None = None,
    ) -> PersistentAccountant:
        """Load the accountant stored at ``path``, or create (and immediately save) an empty one.

        Planning fields of the budget (planned_rounds, local_epochs, batch_size, n_train) may change between
        runs: every history entry carries its own σ, q and step count. The pinned ones may not.

        Raises:
            ConfigurationError: the file is corrupt or of an unknown format (restore it from a backup;
                deleting it forfeits the record of privacy already spent), or it was recorded under a
                different δ, target ε, clipping norm, mechanism or dataset fingerprint (the message names
                each stored and configured value; go back to the stored settings).
            OSError: the file or its folder cannot be read or written.
        """
        mechanism = _check_mechanism(accountant)
        p = Path(path)
        if not p.exists():
            acc = cls(p, budget, mechanism, [], 0, dataset_fingerprint)
            acc._save()
            return acc
        raw = p.read_bytes()
        stored = _parse(p, raw)
        differences: list[str] = []
        for name in _PINNED_FIELDS:
            old, new = stored["budget"][name], getattr(budget, name)
            if old != new:
                differences.append(f"{name}: stored {old!r}, configured {new!r}")
        if stored["mechanism"] != mechanism:
            differences.append(f"accountant: stored {stored['mechanism']!r}, configured {mechanism!r}")
        if stored["dataset_fingerprint"] != dataset_fingerprint:
            differences.append(
                f"dataset fingerprint: stored {stored['dataset_fingerprint']!r}, "
                f"configured {dataset_fingerprint!r}"
            )
        if differences:
            raise ConfigurationError(
                f"privacy accountant {p} was recorded under different settings ("
                + "; ".join(differences)
                + "). The ε already spent is only meaningful under the stored settings: restore them. "
                "Deleting the file does not give the data its privacy back."
            )
        acc = cls(p, budget, mechanism, stored["history"], stored["rounds_done"], dataset_fingerprint)
        if budget != stored["budget_model"]:
            acc._save()  # record the new plan; the pinned fields are unchanged
        return acc

    # -- queries -----------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The accountant file."""
        return self._path

    @property
    def budget(self) -> PrivacyBudget:
        """The budget this accountant enforces."""
        return self._budget

    @property
    def mechanism(self) -> AccountantKind:
        """The accounting mechanism ("rdp", "prv" or "skellam"): what the history entries mean."""
        return self._mechanism

    @property
    def rounds_done(self) -> int:
        """Rounds recorded so far, across restarts."""
        return self._rounds_done

    @property
    def history(self) -> tuple[HistoryEntry, ...]:
        """A copy of the accountant history, ``(σ, q, steps)`` entries, merged as Opacus merges them."""
        return tuple(self._history)

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the budget's δ); 0.0 before the first round."""
        return _epsilon_of(self._mechanism, self._history, self._budget.delta if delta is None else delta)

    def would_exceed(self, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        """Whether one more round of ``steps`` steps at (σ, q) would push ε above the target ε."""
        return self.would_exceed_entry((noise_multiplier, sample_rate, steps))

    def would_exceed_entry(self, entry: Sequence[Any]) -> bool:
        """Whether recording ``entry`` (see :data:`HistoryEntry`) would push ε above the target ε."""
        checked = _validate(self._mechanism, entry)
        eps = _epsilon_of(self._mechanism, _merge(self._history, checked), self._budget.delta)
        return eps > self._budget.target_epsilon

    def epsilon_after(self, entry: Sequence[Any]) -> float:
        """ε the history would have with ``entry`` recorded (nothing is recorded)."""
        return _epsilon_of(
            self._mechanism, _merge(self._history, _validate(self._mechanism, entry)), self._budget.delta
        )

    # -- updates -----------------------------------------------------------------------------------

    def record_round(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record one round of DP-SGD, save the file, and return ε after it.

        Call it *before* releasing anything trained in the round (the training module calls it before it
        trains). Nothing changes, in memory or on disk, when it raises.

        Raises:
            LocalUsageError: invalid arguments, or the round would exceed the target ε (check
                :meth:`would_exceed` first; the budget is spent, stop training).
            OSError: the file could not be written.
        """
        return self.record_entry((noise_multiplier, sample_rate, steps))

    def record_entry(self, entry: Sequence[Any]) -> float:
        """Record ``entry`` (see :data:`HistoryEntry`) as one round, save the file, return ε after it.
        The same contract as :meth:`record_round`."""
        checked = _validate(self._mechanism, entry)
        new_history = _merge(self._history, checked)
        eps = _epsilon_of(self._mechanism, new_history, self._budget.delta)
        if eps > self._budget.target_epsilon:
            raise LocalUsageError(
                f"recording {checked[-1]} steps ({self._mechanism} entry {checked}) would spend ε={eps:.4g} "
                f"> target {self._budget.target_epsilon} (after {self._rounds_done} rounds); "
                "the privacy budget is spent"
            )
        old = (self._history, self._rounds_done)
        self._history, self._rounds_done = new_history, self._rounds_done + 1
        try:
            self._save()
        except BaseException:
            self._history, self._rounds_done = old
            raise
        return eps

    def _document(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "mechanism": self._mechanism,
            "budget": self._budget.model_dump(),
            "dataset_fingerprint": self._dataset_fingerprint,
            "rounds_done": self._rounds_done,
            "history": [list(h) for h in self._history],
        }

    def _save(self) -> None:
        doc = self._document()
        doc["checksum"] = hashlib.sha256(_canonical(doc)).hexdigest()
        atomic_write_bytes(self._path, json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n")


def _corrupt(path: Path, why: str) -> ConfigurationError:
    return ConfigurationError(
        f"privacy accountant file {path} is corrupt ({why}); refusing to start from a fresh budget. "
        "Restore the file from a backup; deleting it forfeits the record of privacy already spent"
    )


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    """Parse and validate an accountant file; raise ConfigurationError on anything unexpected."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _corrupt(path, "top level is not an object")
    if doc.get("format") != _FORMAT or doc.get("version") != _VERSION:
        raise _corrupt(path, f"unknown format {doc.get('format')!r} version {doc.get('version')!r}")
    checksum = doc.pop("checksum", None)
    if not isinstance(checksum, str) or hashlib.sha256(_canonical(doc)).hexdigest() != checksum:
        raise _corrupt(path, "checksum mismatch")
    try:
        budget = PrivacyBudget.model_validate(doc["budget"])
        mechanism = doc["mechanism"]
        if mechanism not in get_args(AccountantKind):
            raise ValueError(f"unknown mechanism {mechanism!r}")
        fp = doc["dataset_fingerprint"]
        if fp is not None and not isinstance(fp, str):
            raise ValueError("dataset_fingerprint is not a string")
        rounds = doc["rounds_done"]
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError("rounds_done is not a non-negative integer")
        history: list[HistoryEntry] = []
        for item in doc["history"]:
            if not isinstance(item, list):
                raise ValueError(f"bad history entry {item!r}")
            history.append(_validate(mechanism, [*(float(v) for v in item[:-1]), item[-1]] if item else item))
    except (KeyError, TypeError, ValueError, ValidationError, LocalUsageError) as exc:
        raise _corrupt(path, str(exc)) from exc
    return {
        "budget": doc["budget"],
        "budget_model": budget,
        "mechanism": mechanism,
        "dataset_fingerprint": fp,
        "rounds_done": rounds,
        "history": history,
    }


__all__ = [
    "AccountantKind",
    "HistoryEntry",
    "PersistentAccountant",
    "PrivacyBudget",
    "plan_noise_multiplier",
    "steps_for_epochs",
]
