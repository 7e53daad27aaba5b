"""Tests for tessera.dp: budget planning and the persistent accountant."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from pydantic import ValidationError
from tessera.dp import PersistentAccountant, PrivacyBudget, plan_noise_multiplier
from tessera.errors import ConfigurationError, LocalUsageError


def budget(**overrides: float) -> PrivacyBudget:
    fields: dict[str, float] = dict(
        target_epsilon=10.0,
        delta=1e-5,
        max_grad_norm=1.0,
        planned_rounds=5,
        local_epochs=1.0,
        batch_size=50,
        n_train=1000,
    )
    fields.update(overrides)
    return PrivacyBudget(**fields)  # type: ignore[arg-type]


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = RDPAccountant()
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


# -- PrivacyBudget ---------------------------------------------------------------------------------------


def test_budget_derives_sample_rate_and_steps() -> None:
    b = budget(batch_size=64, n_train=6000, local_epochs=1.0, planned_rounds=3)
    assert b.sample_rate == 64 / 6000
    assert b.steps_per_round == 94  # ceil(6000 / 64)
    assert b.planned_steps == 3 * 94
    # 3 epochs at q = 0.03 is exactly 100 steps: float noise must not make it 101.
    assert budget(batch_size=3, n_train=100, local_epochs=3.0).steps_per_round == 100
    assert budget(local_epochs=0.5, batch_size=50, n_train=1000).steps_per_round == 10


@pytest.mark.parametrize(
    "bad",
    [
        {"target_epsilon": 0.0},
        {"delta": 1.0},
        {"delta": 0.0},
        {"max_grad_norm": -1.0},
        {"planned_rounds": 0},
        {"local_epochs": 0.0},
        {"batch_size": 2000},  # larger than n_train
    ],
)
def test_budget_rejects_invalid_values(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        budget(**bad)


def test_budget_is_frozen() -> None:
    b = budget()
    with pytest.raises(ValidationError):
        b.delta = 0.1


# -- planning --------------------------------------------------------------------------------------------


def test_planned_noise_meets_target_after_exactly_planned_rounds_and_exceeds_after_one_more() -> None:
    b = budget(target_epsilon=2.0, planned_rounds=5)
    sigma = plan_noise_multiplier(b)
    steps, q = b.steps_per_round, b.sample_rate
    eps_planned = opacus_epsilon([(sigma, q, b.planned_rounds * steps)], b.delta)
    eps_one_more = opacus_epsilon([(sigma, q, (b.planned_rounds + 1) * steps)], b.delta)
    assert b.target_epsilon * 0.99 <= eps_planned <= b.target_epsilon
    assert eps_one_more > b.target_epsilon


def test_more_rounds_need_more_noise() -> None:
    b5, b20 = budget(target_epsilon=2.0, planned_rounds=5), budget(target_epsilon=2.0, planned_rounds=20)
    assert plan_noise_multiplier(b20) > plan_noise_multiplier(b5)


def test_prv_plan_meets_target() -> None:
    b = budget(target_epsilon=3.0, planned_rounds=2, batch_size=100)
    sigma = plan_noise_multiplier(b, "prv", epsilon_tolerance=0.05)
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(sigma, b.sample_rate, b.planned_steps)]
    assert 2.9 <= acc.get_epsilon(delta=b.delta) <= 3.0


def test_impossible_plan_is_a_configuration_error() -> None:
    # RDP cannot certify ε below log(1/δ) / (α_max − 1) ≈ 0.19 at δ = 1e-5, whatever the noise.
    with pytest.raises(ConfigurationError, match="cannot be met"):
        plan_noise_multiplier(budget(target_epsilon=0.05))


def test_unknown_accountant_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown accountant"):
        plan_noise_multiplier(budget(), "gdp")  # type: ignore[arg-type]


# -- PersistentAccountant --------------------------------------------------------------------------------


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "accountant.json"


@pytest.fixture(autouse=True)
def _make_state_dir(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()


def test_new_accountant_is_saved_immediately_and_spends_nothing(path: Path) -> None:
    acc = PersistentAccountant.load_or_create(path, budget())
    assert path.exists()
    assert acc.epsilon() == 0.0
    assert acc.rounds_done == 0


def test_epsilon_accumulates_across_rounds_and_restarts_and_never_resets(path: Path) -> None:
    b = budget(target_epsilon=10.0)
    q, steps = b.sample_rate, b.steps_per_round
    sigma = 1.1
    eps_seen = []
    for round_ in range(4):
        acc = PersistentAccountant.load_or_create(path, b)  # a "restart" before every round
        assert acc.rounds_done == round_
        before = acc.epsilon()
        after = acc.record_round(sigma, q, steps)
        assert after > before
        assert acc.epsilon() == pytest.approx(after)
        eps_seen.append(after)
    # The same ε as Opacus computes for the whole history in one go.
    assert eps_seen[-1] == pytest.approx(opacus_epsilon([(sigma, q, 4 * steps)], b.delta))
    assert eps_seen == sorted(eps_seen)
    reloaded = PersistentAccountant.load_or_create(path, b)
    assert reloaded.epsilon() == pytest.approx(eps_seen[-1])
    assert reloaded.rounds_done == 4
    assert sum(entry[2] for entry in reloaded.history) == 4 * steps  # DP-SGD steps recorded
    assert reloaded.history == ((sigma, q, 4 * steps),)  # merged like Opacus' accountant


def test_heterogeneous_rounds_are_all_counted(path: Path) -> None:
    b = budget(target_epsilon=50.0)
    acc = PersistentAccountant.load_or_create(path, b)
    acc.record_round(1.0, 0.05, 20)
    acc.record_round(2.0, 0.1, 10)
    again = PersistentAccountant.load_or_create(path, b)
    assert again.history == ((1.0, 0.05, 20), (2.0, 0.1, 10))
    assert again.epsilon(1e-6) == pytest.approx(opacus_epsilon([(1.0, 0.05, 20), (2.0, 0.1, 10)], 1e-6))


def test_would_exceed_refuses_exactly_after_the_planned_rounds(path: Path) -> None:
    b = budget(target_epsilon=2.0, planned_rounds=4)
    sigma = plan_noise_multiplier(b)
    q, steps = b.sample_rate, b.steps_per_round
    acc = PersistentAccountant.load_or_create(path, b)
    for _ in range(b.planned_rounds):
        assert not acc.would_exceed(sigma, q, steps)
        acc.record_round(sigma, q, steps)
        acc = PersistentAccountant.load_or_create(path, b)
    assert acc.rounds_done == 4
    assert acc.would_exceed(sigma, q, steps)
    saved = path.read_bytes()
    with pytest.raises(LocalUsageError, match="budget is spent"):
        acc.record_round(sigma, q, steps)
    assert acc.rounds_done == 4  # nothing recorded, in memory or on disk
    assert path.read_bytes() == saved
    assert acc.epsilon() <= b.target_epsilon


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"delta": 1e-6}, ["delta", "1e-05", "1e-06"]),
        ({"target_epsilon": 4.0}, ["target_epsilon", "10.0", "4.0"]),
        ({"max_grad_norm": 0.5}, ["max_grad_norm", "1.0", "0.5"]),
    ],
)
def test_history_recorded_under_other_settings_is_refused(
    path: Path, change: dict[str, float], words: list[str]
) -> None:
    acc = PersistentAccountant.load_or_create(path, budget())
    acc.record_round(1.0, 0.05, 20)
    with pytest.raises(ConfigurationError) as err:
        PersistentAccountant.load_or_create(path, budget(**change))
    for word in words:
        assert word in str(err.value)


def test_other_mechanism_or_dataset_is_refused(path: Path) -> None:
    PersistentAccountant.load_or_create(path, budget(), dataset_fingerprint="aaaa").record_round(
        1.0, 0.05, 20
    )
    with pytest.raises(ConfigurationError, match="accountant: stored 'rdp', configured 'prv'"):
        PersistentAccountant.load_or_create(path, budget(), accountant="prv", dataset_fingerprint="aaaa")
    with pytest.raises(ConfigurationError, match="dataset fingerprint: stored 'aaaa', configured 'bbbb'"):
        PersistentAccountant.load_or_create(path, budget(), dataset_fingerprint="bbbb")


def test_plan_changes_are_allowed_and_keep_the_spent_epsilon(path: Path) -> None:
    acc = PersistentAccountant.load_or_create(path, budget())
    eps = acc.record_round(1.0, 0.05, 20)
    changed = budget(planned_rounds=9, batch_size=20, local_epochs=2.0)
    again = PersistentAccountant.load_or_create(path, changed)
    assert again.epsilon() == pytest.approx(eps)
    assert PersistentAccountant.load_or_create(path, changed).budget == changed


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: b"",
        lambda raw: raw[: len(raw) // 2],
        lambda raw: b"\xff\xfe garbage",
        lambda raw: b"[1, 2, 3]",
        # A consistent-looking edit that lowers the spent steps must be caught by the checksum.
        lambda raw: raw.replace(b"20\n", b"2\n", 1),
    ],
)
def test_corrupt_file_is_an_error_never_a_silent_reset(path: Path, damage: object) -> None:
    acc = PersistentAccountant.load_or_create(path, budget())
    acc.record_round(1.0, 0.05, 20)
    damaged = damage(path.read_bytes())  # type: ignore[operator]
    assert damaged != path.read_bytes()
    path.write_bytes(damaged)
    with pytest.raises(ConfigurationError, match="corrupt"):
        PersistentAccountant.load_or_create(path, budget())
    assert path.read_bytes() == damaged  # left for the operator to restore


def test_file_is_self_describing_json(path: Path) -> None:
    PersistentAccountant.load_or_create(path, budget(), dataset_fingerprint="abc").record_round(1.5, 0.05, 20)
    doc = json.loads(path.read_text())
    assert doc["format"] == "tessera.dp.accountant"
    assert doc["budget"]["delta"] == 1e-5
    assert doc["history"] == [[1.5, 0.05, 20]]
    assert doc["rounds_done"] == 1
    assert doc["dataset_fingerprint"] == "abc"


def test_failed_save_leaves_memory_and_disk_unchanged(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    acc = PersistentAccountant.load_or_create(path, budget())
    acc.record_round(1.0, 0.05, 20)
    saved = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        acc.record_round(1.0, 0.05, 20)
    assert acc.rounds_done == 1
    assert acc.history == ((1.0, 0.05, 20),)
    assert path.read_bytes() == saved
    assert os.listdir(path.parent) == [path.name]  # the temp file was cleaned up


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(0.0, 0.1, 1), (float("nan"), 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, 0)],
)
def test_record_round_rejects_invalid_arguments(path: Path, sigma: float, q: float, steps: int) -> None:
    acc = PersistentAccountant.load_or_create(path, budget())
    with pytest.raises(LocalUsageError):
        acc.record_round(sigma, q, steps)
    assert acc.rounds_done == 0
