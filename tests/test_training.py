"""Tests for tessera.participant.training (DP-SGD rounds and accounting, by training mode) and for
tessera.inference / tessera.evaluation (evaluation counts)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support
from structlog.testing import capture_logs
from tessera.data import ArrayDataset
from tessera.dp import PersistentAccountant, PrivacyBudget, plan_noise_multiplier
from tessera.errors import ConfigurationError, LocalUsageError
from tessera.evaluation import EvalCounts, accuracy, class_metrics
from tessera.inference import evaluate
from tessera.models import (
    ModelSpec,
    build_model,
    flatten_parameters,
    load_flat_parameters,
    trainable_parameters,
)
from tessera.participant.training import LocalDpSgd, NonPrivate, TrainResult, train_one_round
from torch import nn

SPEC = ModelSpec(name="mlp", kwargs={"input_dim": 4, "hidden": [8], "num_classes": 2})


def counts_to_vector(counts: EvalCounts) -> np.ndarray:
    """``[correct, total, loss_sum, confusion row-major...]``: the counts as one float vector."""
    head = np.array([counts.correct, counts.total, counts.loss_sum], dtype=np.float64)
    return np.concatenate([head, counts.confusion.astype(np.float64).ravel()])


def counts_from_vector(vec: np.ndarray, num_classes: int) -> EvalCounts:
    """Inverse of :func:`counts_to_vector` (counts rounded to integers)."""
    confusion = np.rint(vec[3:]).astype(np.int64).reshape(num_classes, num_classes)
    return EvalCounts(round(float(vec[0])), round(float(vec[1])), float(vec[2]), confusion)


def blobs(n: int = 200, seed: int = 0) -> ArrayDataset:
    """Two well separated Gaussian blobs in 4-D."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.normal(size=(n, 4)) + np.where(y[:, None] == 1, 2.0, -2.0)
    return ArrayDataset(x.astype(np.float32), y)


def make_budget(n: int = 200, **kw: float) -> PrivacyBudget:
    fields: dict[str, float] = dict(
        target_epsilon=20.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=3, local_epochs=1.0, batch_size=20
    )
    fields.update(kw)
    return PrivacyBudget(n_train=n, **fields)  # type: ignore[arg-type]


def fresh_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(SPEC)


def mean_loss(model: nn.Module, data: ArrayDataset) -> float:
    counts = evaluate(model, data, 2)
    return float(counts.loss_sum / counts.total)


def private_round(
    model: nn.Module, data: ArrayDataset, acc: PersistentAccountant | None, **kw: object
) -> TrainResult:
    mode_args: dict[str, object] = dict(
        budget=acc.budget if acc is not None else None, noise_multiplier=0.8, accountant=acc
    )
    args: dict[str, object] = dict(rng_seed=1, lr=0.5)
    for key, value in kw.items():
        (mode_args if key in mode_args else args)[key] = value
    mode = LocalDpSgd(**mode_args)  # type: ignore[arg-type]
    return train_one_round(model, data, mode, **args)  # type: ignore[arg-type]


# -- private training ------------------------------------------------------------------------------------


def test_dp_round_changes_weights_learns_and_keeps_the_parameter_mapping(tmp_path: Path) -> None:
    data = blobs()
    model = fresh_model()
    before = flatten_parameters(model)
    names = [n for n, _ in trainable_parameters(model)]
    acc = PersistentAccountant.load_or_create(tmp_path / "acc.json", make_budget())
    result = private_round(model, data, acc)
    # The caller's model is untouched; the result carries the trained weights.
    np.testing.assert_array_equal(flatten_parameters(model), before)
    assert [n for n, _ in trainable_parameters(model)] == names
    assert result.weights.shape == before.shape and result.weights.dtype == np.float32
    assert not np.allclose(result.weights, before)
    # Loaded back by name order into a fresh model, the weights give a better model: the mapping is right.
    trained = fresh_model(seed=5)
    load_flat_parameters(trained, result.weights)
    assert mean_loss(trained, data) < 0.5 * mean_loss(model, data)
    assert accuracy(evaluate(trained, data, 2)) > 0.9
    # Accounting: exactly one round of steps_per_round steps at the budget's sample rate.
    b = acc.budget
    assert result.private and result.steps == b.steps_per_round == 10
    assert acc.history == ((0.8, b.sample_rate, b.steps_per_round),)
    assert result.epsilon == pytest.approx(acc.epsilon()) and result.epsilon > 0


def test_noise_has_the_documented_scale(tmp_path: Path) -> None:
    """With all-zero inputs a linear layer's weight gradients are exactly 0, so each weight moves only by
    the noise: lr · σ · C / batch_size per step, √steps over a round."""
    n, batch, sigma, lr, clip = 400, 40, 2.0, 1.0, 0.5
    data = ArrayDataset(np.zeros((n, 16), dtype=np.float32), np.arange(n) % 2)
    model = nn.Linear(16, 2)
    b = make_budget(n=n, batch_size=batch, max_grad_norm=clip, target_epsilon=100.0, local_epochs=2.0)
    acc = PersistentAccountant.load_or_create(tmp_path / "acc.json", b)
    result = private_round(model, data, acc, noise_multiplier=sigma, lr=lr)
    moved = result.weights[: 16 * 2] - flatten_parameters(model)[: 16 * 2]
    expected = lr * sigma * clip / batch * math.sqrt(b.steps_per_round)
    assert 0.7 * expected < float(moved.std()) < 1.3 * expected


def test_same_seed_same_round_different_seed_different_round(tmp_path: Path) -> None:
    data, b = blobs(), make_budget()
    runs = []
    for i, seed in enumerate((3, 3, 4)):
        acc = PersistentAccountant.load_or_create(tmp_path / f"acc{i}.json", b)
        runs.append(private_round(fresh_model(), data, acc, rng_seed=seed).weights)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_budget_runs_out_after_the_planned_rounds_across_restarts(tmp_path: Path) -> None:
    data = blobs()
    b = make_budget(target_epsilon=3.0, planned_rounds=2)
    sigma = plan_noise_multiplier(b)
    path = tmp_path / "acc.json"
    weights = flatten_parameters(fresh_model())
    eps = []
    for round_ in range(2):
        acc = PersistentAccountant.load_or_create(path, b)  # a restart before every round
        model = fresh_model()
        load_flat_parameters(model, weights)
        result = private_round(model, data, acc, noise_multiplier=sigma, rng_seed=round_)
        weights = result.weights
        eps.append(result.epsilon)
    assert eps[0] < eps[1] <= 3.0
    acc = PersistentAccountant.load_or_create(path, b)
    assert acc.epsilon() == pytest.approx(eps[1])
    with pytest.raises(LocalUsageError, match="budget is spent"):
        private_round(fresh_model(), data, acc, noise_multiplier=sigma)
    assert PersistentAccountant.load_or_create(path, b).rounds_done == 2


def test_empty_poisson_batches_are_handled(tmp_path: Path) -> None:
    data = blobs(n=50)
    b = make_budget(n=50, batch_size=1, target_epsilon=1000.0)  # P(empty batch) ≈ 37 %
    acc = PersistentAccountant.load_or_create(tmp_path / "acc.json", b)
    result = private_round(fresh_model(), data, acc, noise_multiplier=0.5, lr=0.1)
    assert result.steps == 50
    assert np.all(np.isfinite(result.weights))
    assert 0 < result.examples_processed < 100


def test_private_training_checks_its_inputs(tmp_path: Path) -> None:
    data = blobs()
    acc = PersistentAccountant.load_or_create(tmp_path / "acc.json", make_budget())
    with pytest.raises(ConfigurationError, match="n_train=200"):
        private_round(fresh_model(), blobs(n=150), acc)
    # The mode follows the budget's plan; a plan other than the accountant's is refused.
    with pytest.raises(LocalUsageError, match="different budget"):
        private_round(fresh_model(), data, acc, budget=make_budget(local_epochs=2.0))
    with pytest.raises(LocalUsageError, match="needs budget"):
        private_round(fresh_model(), data, acc, accountant=None)
    with pytest.raises(LocalUsageError, match="different budget"):
        private_round(fresh_model(), data, acc, budget=make_budget(target_epsilon=5.0))
    assert acc.rounds_done == 0


def test_batchnorm_model_is_refused_before_anything_is_recorded(tmp_path: Path) -> None:
    data = blobs()
    acc = PersistentAccountant.load_or_create(tmp_path / "acc.json", make_budget())
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(ConfigurationError, match="DP-SGD"):
        private_round(model, data, acc)
    assert acc.rounds_done == 0 and acc.epsilon() == 0.0


# -- non-private training --------------------------------------------------------------------------------


def test_non_private_training_is_explicit_and_loud() -> None:
    data = blobs()
    model = fresh_model()
    with capture_logs() as logs:
        result = train_one_round(model, data, NonPrivate(epochs=2, batch_size=20), rng_seed=0, lr=0.5)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["training_without_differential_privacy"]
    assert not result.private and result.epsilon is None and result.steps == 20
    trained = fresh_model()
    load_flat_parameters(trained, result.weights)
    assert accuracy(evaluate(trained, data, 2)) > 0.95
    with pytest.raises(LocalUsageError, match="epochs"):
        NonPrivate(epochs=0, batch_size=20)


# -- evaluation ------------------------------------------------------------------------------------------


def fixed_classifier() -> nn.Module:
    """Predicts the class = argmax of the first three input features."""
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
        model.bias.zero_()
    return model


def test_evaluate_counts_and_confusion_matrix() -> None:
    x = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=np.float32)
    y = np.array([0, 1, 2, 1, 2])
    model = fixed_classifier()
    model.train()
    counts = evaluate(model, ArrayDataset(x, y), 3, batch_size=2)
    assert model.training  # restored
    assert counts.correct == 3 and counts.total == 5
    np.testing.assert_array_equal(counts.confusion, [[1, 0, 0], [1, 1, 0], [0, 1, 1]])
    expected_loss = nn.functional.cross_entropy(torch.tensor(x), torch.tensor(y), reduction="sum")
    assert counts.loss_sum == pytest.approx(float(expected_loss), rel=1e-5)
    assert accuracy(counts) == pytest.approx(0.6)


def test_summed_counts_equal_counts_of_the_pooled_data() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=60)
    model = fixed_classifier()
    whole = evaluate(model, ArrayDataset(x, y), 3)
    parts = [
        evaluate(model, ArrayDataset(x[s], y[s]), 3) for s in (slice(0, 13), slice(13, 40), slice(40, 60))
    ]
    summed = parts[0] + parts[1] + parts[2]
    assert (summed.correct, summed.total) == (whole.correct, whole.total)
    np.testing.assert_array_equal(summed.confusion, whole.confusion)
    assert summed.loss_sum == pytest.approx(whole.loss_sum)
    back = counts_from_vector(counts_to_vector(summed), 3)
    assert (back.correct, back.total) == (summed.correct, summed.total)
    assert back.loss_sum == summed.loss_sum
    np.testing.assert_array_equal(back.confusion, summed.confusion)
    metrics = class_metrics(summed)
    p, r, f, s = precision_recall_fscore_support(
        y, whole_predictions(model, x), labels=[0, 1, 2], zero_division=0
    )
    np.testing.assert_allclose(metrics.precision, p)
    np.testing.assert_allclose(metrics.recall, r)
    np.testing.assert_allclose(metrics.f1, f)
    np.testing.assert_array_equal(metrics.support, s)


def whole_predictions(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out: np.ndarray = model(torch.tensor(x)).argmax(dim=1).numpy()
        return out


def test_class_metrics_zero_division_and_empty_data() -> None:
    conf = np.array([[2, 0, 0], [1, 0, 0], [0, 0, 0]])
    m = class_metrics(conf)
    np.testing.assert_allclose(m.precision, [2 / 3, 0, 0])
    np.testing.assert_allclose(m.recall, [1, 0, 0])
    assert m.macro_f1 == pytest.approx((0.8 + 0.0) / 2)  # class 2 never occurs
    empty = evaluate(fixed_classifier(), ArrayDataset(np.zeros((0, 3)), np.zeros(0)), 3)
    assert empty.total == 0 and math.isnan(accuracy(empty))
    with pytest.raises(ConfigurationError, match="out of range"):
        evaluate(fixed_classifier(), ArrayDataset(np.zeros((1, 3)), np.array([5])), 3)


# -- real data -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dp_round_of_the_cnn_on_6000_mnist_images(tmp_path: Path) -> None:
    from tessera.data import load_dataset

    from tests.data.real_files import MNIST, need

    mnist = need(MNIST)
    train = load_dataset(mnist / "train-images-idx3-ubyte.gz").subset(np.arange(6000))
    test = load_dataset(mnist / "t10k-images-idx3-ubyte.gz").subset(np.arange(2000))
    spec = ModelSpec(name="cnn28", kwargs={})
    torch.manual_seed(0)
    model = build_model(spec)
    b = PrivacyBudget(
        target_epsilon=8.0,
        delta=1e-5,
        max_grad_norm=1.0,
        planned_rounds=5,
        local_epochs=1,
        batch_size=64,
        n_train=6000,
    )
    sigma = plan_noise_multiplier(b)
    acc = PersistentAccountant.load_or_create(tmp_path / "acc.json", b)
    start = time.perf_counter()
    result = train_one_round(
        model, train, LocalDpSgd(budget=b, noise_multiplier=sigma, accountant=acc), rng_seed=0, lr=0.5
    )
    seconds = time.perf_counter() - start
    load_flat_parameters(model, result.weights)
    acc_after = accuracy(evaluate(model, test, 10))
    print(
        f"DP round: {result.steps} steps in {seconds:.1f} s, σ={sigma:.3f}, ε={result.epsilon:.2f}, acc={acc_after}"
    )
    assert result.steps == 94
    assert acc_after > 0.7
