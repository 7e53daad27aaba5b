"""The privacy audit's measurements (bench/_audit.py): exposure on models that did and did not memorise a
canary, the exact candidate scoring against brute force, ROC/AUC, and the ε lower bound against values
computed by hand."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import _audit as audit
import audit as bench_audit
from audit_models import char_gru
from tessera.data import ArrayDataset, train_validation_split

CONTEXT = 10
TEMPLATE = "ddd"
PREFIX = "my pin is "


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # On 2 shared, busy cores two torch threads made these small models 10-100x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return char_gru(audit.VOCABULARY, embedding=8, hidden=32)


def _memorise(model: nn.Module, text: str, steps: int) -> None:
    """Plain full-batch Adam on every next-character window of ``text`` (a side loop on purpose: this checks
    the measurement, not the federation)."""
    x, y = audit.windows(audit.encode(text), CONTEXT)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(xs), ys).backward()
        optimiser.step()


def test_candidate_scores_match_brute_force() -> None:
    model = _model(1).eval()
    scores = audit.candidate_log_perplexities(model, prefix=PREFIX, template="d d", context=CONTEXT)
    assert scores.shape == (100,)
    for value in (0, 7, 42, 99):
        codes = audit.encode(PREFIX + audit.secret_text("d d", value))
        x, y = audit.windows(codes, CONTEXT)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.from_numpy(x)).double(), 1)[torch.arange(len(y)), y]
        expected = -float(logp[len(PREFIX) :].sum()) / math.log(2)
        assert scores[value] == pytest.approx(expected, rel=1e-6)  # float32 model, other batch shapes


def test_memorised_canary_has_near_maximal_exposure() -> None:
    secret = 317
    canary = PREFIX + audit.secret_text(TEMPLATE, secret)
    filler = "the quick brown fox jumps over the lazy dog. "
    model = _model(2)
    _memorise(model, (filler + canary + ". ") * 4, steps=150)
    scores = audit.candidate_log_perplexities(model.eval(), prefix=PREFIX, template=TEMPLATE, context=CONTEXT)
    assert audit.exposure(scores, secret) == pytest.approx(math.log2(1000))  # rank 1 of 1,000


def test_untrained_model_has_near_zero_exposure() -> None:
    model = _model(3).eval()
    scores = audit.candidate_log_perplexities(model, prefix=PREFIX, template=TEMPLATE, context=CONTEXT)
    secrets = np.random.default_rng(0).integers(0, 1000, size=40)
    exposures = [audit.exposure(scores, int(s)) for s in secrets]
    # The rank of a secret the model never saw is uniform: exposure has mean 1/ln 2 = 1.44 bits.
    assert np.mean(exposures) < 2.5
    # A model that scores all candidates alike gives exposure 0 (ties count against memorisation).
    assert audit.exposure(np.zeros(1000), 317) == 0.0


def test_windows_pad_on_the_left() -> None:
    x, y = audit.windows(audit.encode("abc"), 2)
    assert x.dtype == np.float32
    assert x.tolist() == [[0, 0], [0, 2], [2, 3]]
    assert y.tolist() == [2, 3, 4]


def test_roc_auc_and_tpr_at_fpr() -> None:
    members, non_members = [4.0, 3.0, 2.0, 1.0], [2.0, 0.0, -1.0, -2.0]
    fpr, tpr = audit.roc(members, non_members)
    # thresholds 4, 3, 2, 1, 0, -1, -2
    assert tpr.tolist() == [0, 0.25, 0.5, 0.75, 1, 1, 1, 1]
    assert fpr.tolist() == [0, 0, 0, 0.25, 0.25, 0.5, 0.75, 1]
    # 16 pairs: the tie (2, 2) counts one half, (1 vs 2) loses, the other 14 win.
    assert audit.auc(members, non_members) == pytest.approx(14.5 / 16)
    assert audit.tpr_at_fpr(fpr, tpr, 0.1) == 0.5
    assert audit.tpr_at_fpr(fpr, tpr, 0.25) == 1.0


def test_clopper_pearson_closed_forms() -> None:
    # All successes: lower = alpha^(1/n); none: upper = 1 - alpha^(1/n).
    assert audit.clopper_pearson(100, 100, 0.025) == pytest.approx((0.025**0.01, 1.0))
    assert audit.clopper_pearson(0, 100, 0.025) == pytest.approx((0.0, 1 - 0.025**0.01))
    lo, hi = audit.clopper_pearson(5, 10, 0.025)
    assert lo == pytest.approx(0.187086, abs=1e-6) and hi == pytest.approx(0.812914, abs=1e-6)


def test_epsilon_lower_bound_by_hand() -> None:
    # 100/100 true positives and 0/100 false positives at 95 %: TPR_lo = 0.025^(1/100) = 0.963783,
    # FPR_hi = 1 - 0.963783 = 0.036217, so epsilon >= ln(0.963783 / 0.036217) = 3.2813 (delta 0).
    eps, tpr_lo, fpr_hi = audit.epsilon_lower_bound(100, 100, 0, 100, delta=0.0)
    assert tpr_lo == pytest.approx(0.963783, abs=1e-6) and fpr_hi == pytest.approx(0.036217, abs=1e-6)
    assert eps == pytest.approx(math.log(0.963783 / 0.036217), abs=1e-4)
    assert eps == pytest.approx(3.2813, abs=1e-4)
    # delta is subtracted from the TPR: ln((0.963783 - 0.1) / 0.036217) = 3.1718.
    assert audit.epsilon_lower_bound(100, 100, 0, 100, delta=0.1)[0] == pytest.approx(3.1718, abs=1e-4)
    # A test no better than chance bounds nothing.
    assert audit.epsilon_lower_bound(50, 100, 50, 100, delta=1e-5)[0] == 0.0
    # The other inequality: TNR_lo vs FNR_hi; rates TPR 0.5, FPR 0.01 exactly -> ln((0.99) / 0.5).
    assert audit.epsilon_from_rates(0.5, 0.01, 0.0) == pytest.approx(math.log(0.5 / 0.01))
    assert audit.epsilon_from_rates(0.999, 0.5, 0.0) == pytest.approx(math.log(0.5 / 0.001))


def test_canary_bound_uses_the_exact_false_positive_rate() -> None:
    # 4 of 4 canaries at exposure >= 16 bits of 10^6 candidates: FPR = floor(10^6 / 65536) / 10^6 = 15e-6,
    # TPR_lo = (0.05 / 4)^(1/4) = 0.33437 (Bonferroni over the 4 thresholds): ln(0.33437 / 15e-6) = 10.012.
    bound = audit.canary_epsilon_lower_bound([19.9, 19.9, 17.0, 16.5], candidates=10**6, delta=0.0)
    assert bound.threshold == 16.0
    assert bound.fpr_hi == pytest.approx(15e-6)
    assert bound.tpr_lo == pytest.approx(0.0125**0.25)
    assert bound.epsilon_lb == pytest.approx(math.log(0.0125**0.25 / 15e-6))
    assert bound.epsilon_lb == pytest.approx(10.012, abs=1e-3)
    # Exposures of never-inserted canaries (about 1.44 bits) bound nothing.
    assert audit.canary_epsilon_lower_bound([1.2, 0.3, 2.0], candidates=10**6, delta=1e-5).epsilon_lb == 0.0


def test_mia_bound_on_separable_and_identical_scores() -> None:
    rng = np.random.default_rng(0)
    separable = audit.mia_epsilon_lower_bound(rng.normal(10, 1, 400), rng.normal(0, 1, 400), delta=1e-5)
    # 200/200 and 0/200 on the counting half: ln((0.025^(1/200) - 1e-5) / (1 - 0.025^(1/200))) = 3.984.
    assert separable.true_positives == 200 and separable.false_positives == 0
    assert separable.epsilon_lb == pytest.approx(3.9837, abs=1e-4)
    same = rng.normal(0, 1, 800)
    assert audit.mia_epsilon_lower_bound(same[:400], same[400:], delta=1e-5).epsilon_lb < 0.5


# -- the distributed privacy configuration (bench/audit.py) ---------------------------------------------------


def _toy_datasets(sizes: list[int]) -> dict[str, tuple[ArrayDataset, ArrayDataset]]:
    rng = np.random.default_rng(7)
    out = {}
    for i, n in enumerate(sizes):
        x = rng.normal(size=(n, 6)).astype(np.float32)
        y = (x[:, 0] - x[:, 1] > 0).astype(np.int64)
        out[f"org-{i + 1}"] = train_validation_split(ArrayDataset(x, y), 0.5 if i == 0 else 0.2, i)
    return out


TOY_MODEL = {"name": "mlp", "kwargs": {"input_dim": 6, "hidden": [8], "num_classes": 2}}


def test_distributed_entry_builds_valid_roster_and_settings() -> None:
    from tessera.curator.settings import ServerSettings
    from tessera.participant.settings import PrivacySettings
    from tessera.roster import FederationParameters
    from tessera.skellam import epsilon as skellam_epsilon

    kind = bench_audit.PRIVACY["distributed"]
    assert kind.private and kind.preset == "distributed"
    datasets = _toy_datasets([200, 300, 400])
    for task in ("canary", "ai4i", "mnist"):
        for quick in (False, True):
            assert bench_audit.preset(task, kind, quick)["rounds"] >= 100  # one DP-SGD step per round
    preset = bench_audit.preset("ai4i", kind, quick=True) | {"rounds": 20}
    privacy = PrivacySettings.model_validate(kind.settings(3.0, preset))
    assert privacy.enabled and privacy.target_epsilon == 3.0 and privacy.planned_rounds == 20
    extra = kind.federation(3.0, preset, {"datasets": datasets, "model": TOY_MODEL})
    parameters = FederationParameters.model_validate(extra["roster"])
    assert parameters.privacy.mode.value == "distributed" and parameters.layout.ring_bits == 64
    assert parameters.privacy.clip_norm == preset["max_grad_norm"]
    server = ServerSettings.model_validate(extra["server"])
    assert (server.lr, server.momentum) == (preset["lr"], preset["momentum"])
    # Every organisation samples at q = sample_rate (its batch rounded), and the planned noise keeps the
    # 20 steps at the largest q within epsilon 3, tightly.
    n = {o: len(t) for o, (t, _) in datasets.items()}
    batches = {o: s["batch_size"] for o, s in extra["privacy_per_org"].items()}
    assert batches == {o: round(preset["sample_rate"] * n[o]) for o in n}
    q = max(batches[o] / n[o] for o in n)
    assert preset["max_sample_rate"] == pytest.approx(q, abs=1e-6)
    mechanism = parameters.privacy.mechanism(8 * 6 + 8 + 8 * 2 + 2)
    spent = skellam_epsilon([mechanism.entry(q, 20)], delta=bench_audit.DELTA)
    assert 2.9 < spent <= 3.0
    # Non-DP and local runs keep the per-coordinate layout clip in the roster.
    assert bench_audit.PRIVACY["local"].federation(3.0, {"clip": 2.0}, {}) == {
        "roster": {"layout": {"clip": 2.0}}
    }


def test_distributed_entry_runs_a_tiny_federation() -> None:
    from _federation import run_federation_full

    kind = bench_audit.PRIVACY["distributed"]
    datasets = _toy_datasets([200, 300, 400])
    preset = bench_audit.preset("ai4i", kind, quick=True) | {"rounds": 4, "evaluate_every": 2}
    extra = kind.federation(3.0, preset, {"datasets": datasets, "model": TOY_MODEL})
    run = run_federation_full(
        federation="audit-test",
        organisations=list(datasets),
        datasets=datasets,
        model=TOY_MODEL,
        num_classes=2,
        rounds=4,
        secagg={"phase_timeout": 30},
        privacy=kind.settings(3.0, preset),
        data={o: {"path": "unused.csv"} for o in datasets},
        **extra,
    )
    assert run.document["rounds_completed"] == 4
    # The accountant of the organisation with the largest q spent (almost) all of epsilon 3.
    assert 2.9 < kind.accounted(run, "org-1") <= 3.0
    assert all(0 < e <= 3.0 for e in run.epsilon.values())


def test_distributed_per_example_gradients_work_through_the_char_gru() -> None:
    # The distributed mode's torch.func per-example gradients (vmap over grad) through Opacus' DPGRU equal
    # autograd's gradient of each window alone: the canary task can run in that mode.
    from tessera.participant.distributed import per_example_gradients

    model = _model(4)
    x, y = audit.windows(audit.encode("the quick brown fox"), CONTEXT)
    xs, ys = torch.from_numpy(x[:6]), torch.from_numpy(y[:6])
    per = per_example_gradients(model, xs, ys)
    assert per.shape == (6, sum(p.numel() for p in model.parameters()))
    for i in (0, 5):
        model.zero_grad()
        nn.functional.cross_entropy(model(xs[i : i + 1]), ys[i : i + 1], reduction="sum").backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(per[i], expected, atol=1e-6)
