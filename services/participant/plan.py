"""The training mode an organisation's privacy settings ask for, planned and loaded at start-up.

Local DP-SGD plans its noise multiplier for the whole federation (``planned_rounds`` rounds of
``local_epochs`` epochs) and loads the persistent accountant, so ε continues across restarts; switching
privacy off is possible only explicitly and is logged as loudly as it deserves.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from tessera.data import ArrayDataset
from tessera.dp import PersistentAccountant, PrivacyBudget, plan_noise_multiplier

from .settings import PrivacySettings
from .training import LocalDpSgd, NonPrivate, TrainingMode

log = structlog.get_logger("tessera.participant")

ACCOUNTANT_FILE = "accountant.json"


def training_mode(privacy: PrivacySettings, *, train: ArrayDataset, state_dir: Path) -> TrainingMode:
    """The mode ``privacy`` describes for a training split ``train``; the accountant lives in ``state_dir``.

    Raises ConfigurationError for a budget no noise can meet or an accountant file recorded under other
    settings (see :class:`tessera.dp.PersistentAccountant`).
    """
    batch_size = min(privacy.batch_size, len(train))
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
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        noise_multiplier=round(noise_multiplier, 4),
        epsilon_spent=round(accountant.epsilon(), 4),
        rounds_done=accountant.rounds_done,
    )
    return LocalDpSgd(budget=budget, noise_multiplier=noise_multiplier, accountant=accountant)


__all__ = ["ACCOUNTANT_FILE", "training_mode"]
