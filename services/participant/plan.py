"""The training mode an organisation's privacy settings ask for, planned and loaded at start-up.

Local DP-SGD plans its noise multiplier for the whole federation (``planned_rounds`` rounds of
``local_epochs`` epochs) and loads the persistent accountant, so ε continues across restarts; switching
privacy off is possible only explicitly and is logged as loudly as it deserves.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import structlog
from tessera.csprng import Csprng
from tessera.data import ArrayDataset
from tessera.dp import PersistentAccountant, PrivacyBudget, plan_noise_multiplier
from tessera.errors import ConfigurationError
from tessera.roster import PrivacyMode, RosterFile
from tessera.skellam import require_no_wrap

from .distributed import DistributedDpSgd
from .settings import PrivacySettings
from .training import LocalDpSgd, NonPrivate, TrainingMode

log = structlog.get_logger("tessera.participant")

ACCOUNTANT_FILE = "accountant.json"


def training_mode(
    privacy: PrivacySettings,
    *,
    train: ArrayDataset,
    state_dir: Path,
    roster: RosterFile,
    num_params: int,
    seed: int | None = None,
) -> TrainingMode:
    """The mode the roster's privacy mode and this organisation's ``privacy`` settings describe for a
    training split ``train``; the accountant lives in ``state_dir``.

    Raises ConfigurationError for a budget no noise can meet, an accountant file recorded under other
    settings (see :class:`tessera.dp.PersistentAccountant`), or a distributed mechanism whose aggregate could
    wrap around the ring.
    """
    batch_size = min(privacy.batch_size, len(train))
    if roster.parameters.privacy.mode is PrivacyMode.DISTRIBUTED:
        return _distributed(
            privacy, train=train, state_dir=state_dir, roster=roster, num_params=num_params, seed=seed
        )
    if not privacy.enabled:
        log.warning(
            "differential_privacy_disabled",
            detail="TESSERA_PRIVACY__ENABLED=false: updates carry NO differential-privacy guarantee",
        )
        return NonPrivate(epochs=privacy.local_epochs, batch_size=batch_size)
    budget = PrivacyBudget(
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        max_grad_norm=privacy.max_grad_norm,
        planned_rounds=privacy.planned_rounds,
        local_epochs=privacy.local_epochs,
        batch_size=batch_size,
        n_train=len(train),
    )
    noise_multiplier = plan_noise_multiplier(budget, privacy.accountant)
    accountant = PersistentAccountant.load_or_create(
        state_dir / ACCOUNTANT_FILE,
        budget,
        accountant=privacy.accountant,
        dataset_fingerprint=train.fingerprint(),
    )
    log.info(
        "privacy_plan",
        mode="local",
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        noise_multiplier=round(noise_multiplier, 4),
        epsilon_spent=round(accountant.epsilon(), 4),
        rounds_done=accountant.rounds_done,
    )
    return LocalDpSgd(budget=budget, noise_multiplier=noise_multiplier, accountant=accountant)


def _distributed(
    privacy: PrivacySettings,
    *,
    train: ArrayDataset,
    state_dir: Path,
    roster: RosterFile,
    num_params: int,
    seed: int | None,
) -> TrainingMode:
    if not privacy.enabled:
        raise ConfigurationError(
            "privacy.enabled is false, but the roster's privacy mode is distributed: every organisation adds its "
            "noise share there; leave privacy enabled"
        )
    parameters = roster.parameters
    mechanism = parameters.privacy.mechanism(num_params)
    members = len(roster.members)
    smallest = parameters.rules().threshold(parameters.min_participants)
    require_no_wrap(
        mechanism,
        records=members * parameters.layout.max_weight,
        noise_variance=members
        * mechanism.share_variance(threshold=smallest, colluders=parameters.privacy.colluders),
    )
    if len(train) > parameters.layout.max_weight:
        raise ConfigurationError(
            f"{len(train)} training records exceed the roster's layout.max_weight {parameters.layout.max_weight}"
        )
    batch_size = min(privacy.batch_size, len(train))
    # One "round" of the budget is one step at q = batch_size / n: local_epochs = q makes steps_per_round 1.
    budget = PrivacyBudget(
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        max_grad_norm=mechanism.clip,
        planned_rounds=privacy.planned_rounds,
        local_epochs=batch_size / len(train),
        batch_size=batch_size,
        n_train=len(train),
    )
    accountant = PersistentAccountant.load_or_create(
        state_dir / ACCOUNTANT_FILE, budget, accountant="skellam", dataset_fingerprint=train.fingerprint()
    )
    mode = DistributedDpSgd(
        mechanism=mechanism,
        colluders=parameters.privacy.colluders,
        batch_size=batch_size,
        n_train=len(train),
        accountant=accountant,
        class_weights=privacy.class_weights,
        # A seeded generator makes runs reproducible, and its noise computable by whoever knows the seed:
        # tests and benchmarks only (training_seed's description says so).
        rng=None
        if seed is None
        else Csprng(hashlib.sha256(b"tessera-distributed-seed\x00%d" % seed).digest()),
    )
    log.info(
        "privacy_plan",
        mode="distributed",
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        noise_multiplier=mechanism.noise_multiplier,
        sample_rate=round(batch_size / len(train), 6),
        epsilon_spent=round(mode.epsilon(), 4),
        steps_done=accountant.rounds_done,
    )
    return mode


__all__ = ["ACCOUNTANT_FILE", "training_mode"]
