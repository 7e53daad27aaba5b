"""The privacy audit's measurements, apart from any federation: canary exposure, membership-inference
metrics and the empirical lower bound on ε. Pure functions of a model's outputs and of counts, so that
``tests/test_audit.py`` can check them on models made to memorise (or not) on purpose.

Exposure (Carlini et al. 2019, "The Secret Sharer", section 4)
--------------------------------------------------------------
A canary is ``prefix + secret``, the secret drawn uniformly from a randomness space R given by a
template (``"ddd ddd"``: every ``d`` is a digit, every other character fixed; |R| = 10^digits). The
log-perplexity of a candidate r is ``-sum_i log2 p(r_i | the context window before r_i)`` over the secret's
characters (the prefix is common to all candidates, so it does not change the order). The rank of the
canary is its position among all |R| candidates sorted by log-perplexity, and

    exposure = log2 |R| - log2 rank.

Ties count against memorisation: rank = the number of candidates whose log-perplexity is <= the canary's,
so a model that gives every candidate the same score has exposure 0. All |R| candidates are scored exactly
(no sampling, no extrapolation) by walking the tree of secret prefixes: one model evaluation per prefix,
10 + 100 + ... + 10^(digits-1) evaluations in all (111,111 for six digits), each giving the log
probabilities of every next character.

For a secret the model never saw, the rank is uniform on 1..|R| (the secret is independent of the model), so
``P(exposure >= t) <= 2^-t`` exactly: the false-positive rate of the test "exposure >= t" needs no
reference canaries. This is what :func:`canary_epsilon_lower_bound` uses.

Membership inference (loss attack, Yeom et al. 2018)
----------------------------------------------------
Score = minus the example's cross-entropy loss under the final model; members should score higher.
:func:`roc` gives the ROC over all thresholds; AUC is the Mann-Whitney statistic (ties count one half),
with the Hanley & McNeil (1982) standard error; TPR at a false-positive rate f is the highest TPR among
thresholds whose FPR is <= f.

Empirical ε lower bound (Kairouz et al. 2015; Jagielski et al. 2020; Nasr et al. 2021)
---------------------------------------------------------------------------------------
An (ε, δ)-DP training makes every test of "was this record in?" satisfy TPR <= e^ε FPR + δ and
TNR <= e^ε FNR + δ. So, with a lower confidence bound TPR_lo on the test's true-positive rate and an upper
bound FPR_hi on its false-positive rate,

    ε >= max( ln((TPR_lo - δ) / FPR_hi),  ln((1 - FPR_hi - δ) / (1 - TPR_lo)) ).

The bounds are one-sided Clopper-Pearson intervals at (1 - confidence) / 2 each, so both hold together with
probability >= ``confidence`` (union bound). The threshold must not be chosen on the data it is evaluated on:
:func:`mia_epsilon_lower_bound` picks it on one random half of the members and non-members and counts on the
other half; :func:`canary_epsilon_lower_bound` uses a fixed grid of exposure thresholds and a Bonferroni
correction over the grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
import torch
from scipy.stats import beta

# -- text ------------------------------------------------------------------------------------------------

ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.,;:'!?-\"()"
"""Characters the character model knows; index 0 is padding, a character's index is 1 + its position here."""
PAD = 0
VOCABULARY = len(ALPHABET) + 1


def normalise_text(text: str) -> str:
    """Lower case, characters outside :data:`ALPHABET` dropped, runs of whitespace as one space."""
    kept = "".join(c if c in ALPHABET else " " if c.isspace() else "" for c in text.lower())
    return " ".join(kept.split())


def encode(text: str) -> npt.NDArray[np.int64]:
    """Indices of the characters of ``text`` (all must be in :data:`ALPHABET`; use :func:`normalise_text`)."""
    table = {c: i + 1 for i, c in enumerate(ALPHABET)}
    try:
        return np.array([table[c] for c in text], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(
            f"character {exc.args[0]!r} is not in the alphabet; normalise the text first"
        ) from exc


def windows(
    codes: npt.NDArray[np.int64], context: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Next-character examples: ``x[i]`` = the ``context`` characters before ``codes[i]`` (left-padded with
    :data:`PAD`), ``y[i] = codes[i]``. ``x`` is float32 because :class:`tessera.data.ArrayDataset` stores
    features that way; the model casts it back to indices."""
    padded = np.concatenate([np.full(context, PAD, dtype=np.int64), codes])
    view = np.lib.stride_tricks.sliding_window_view(padded, context)[: len(codes)]
    return view.astype(np.float32), codes.copy()


# -- exposure ----------------------------------------------------------------------------------------------

Logits = Callable[[torch.Tensor], torch.Tensor]
"""A model: float32 windows ``(B, context)`` of character indices -> next-character logits ``(B, VOCABULARY)``."""


def digits_of(template: str) -> int:
    return template.count("d")


def secret_text(template: str, value: int) -> str:
    """The secret ``value`` (0 <= value < 10^digits) written into ``template`` (most significant digit first)."""
    digits = f"{value:0{digits_of(template)}d}"
    if len(digits) != digits_of(template):
        raise ValueError(f"{value} does not fit the template {template!r}")
    out, k = [], 0
    for c in template:
        if c == "d":
            out.append(digits[k])
            k += 1
        else:
            out.append(c)
    return "".join(out)


def candidate_log_perplexities(
    model: Logits, *, prefix: str, template: str, context: int, batch: int = 8192
) -> npt.NDArray[np.float64]:
    """Log-perplexity (bits) of every candidate secret after ``prefix``, indexed by the secret's value.

    Exact: the tree of secret prefixes is walked level by level, each prefix evaluated once (see the module
    docstring). ``model`` is called under ``torch.no_grad`` on batches of at most ``batch`` windows.
    """
    digit_codes = torch.from_numpy(encode("0123456789"))
    prefix_codes = encode(prefix)
    # partial[j] = the characters written so far for partial secret j (all of the same length), and
    # scores[j] = its log-perplexity so far; partial secrets are in increasing order of their value.
    partial = np.zeros((1, 0), dtype=np.int64)
    scores = np.zeros(1, dtype=np.float64)
    for c in template:
        full = np.concatenate([np.broadcast_to(prefix_codes, (len(partial), len(prefix_codes))), partial], 1)
        if full.shape[1] < context:
            full = np.concatenate([np.full((len(full), context - full.shape[1]), PAD), full], 1)
        x = torch.from_numpy(full[:, -context:].astype(np.float32))
        with torch.no_grad():
            logp = torch.cat(
                [torch.log_softmax(model(x[i : i + batch]).double(), dim=1) for i in range(0, len(x), batch)]
            ) / math.log(2)
        if c == "d":
            step = -logp[:, digit_codes].numpy()  # (prefixes, 10)
            scores = (scores[:, None] + step).reshape(-1)
            partial = np.concatenate(
                [np.repeat(partial, 10, axis=0), np.tile(digit_codes.numpy(), len(partial))[:, None]], 1
            )
        else:
            code = int(encode(c)[0])
            scores = scores - logp[:, code].numpy()
            partial = np.concatenate([partial, np.full((len(partial), 1), code)], 1)
    return scores


def exposure(log_perplexities: npt.NDArray[np.float64], secret: int) -> float:
    """log2 |R| - log2 rank, rank = the number of candidates scoring <= the secret (ties count against it)."""
    rank = int(np.count_nonzero(log_perplexities <= log_perplexities[secret]))
    return math.log2(len(log_perplexities)) - math.log2(rank)


# -- membership inference -------------------------------------------------------------------------------


def roc(
    members: npt.ArrayLike, non_members: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(FPR, TPR) of the test "score >= t" for every distinct threshold t, from (0, 0) to (1, 1)."""
    m, n = np.asarray(members, dtype=np.float64), np.asarray(non_members, dtype=np.float64)
    thresholds = np.unique(np.concatenate([m, n]))[::-1]
    ms, ns = np.sort(m), np.sort(n)
    tpr = (len(m) - np.searchsorted(ms, thresholds, side="left")) / len(m)
    fpr = (len(n) - np.searchsorted(ns, thresholds, side="left")) / len(n)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def auc(members: npt.ArrayLike, non_members: npt.ArrayLike) -> float:
    """P(member score > non-member score) + P(equal) / 2 (the Mann-Whitney U statistic, normalised)."""
    m, n = np.asarray(members, dtype=np.float64), np.asarray(non_members, dtype=np.float64)
    ns = np.sort(n)
    below = np.searchsorted(ns, m, side="left")
    equal = np.searchsorted(ns, m, side="right") - below
    return float((below.sum() + equal.sum() / 2) / (len(m) * len(n)))


def auc_standard_error(value: float, n_members: int, n_non_members: int) -> float:
    """Hanley & McNeil (1982), equation 2."""
    q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
    var = (
        value * (1 - value) + (n_members - 1) * (q1 - value**2) + (n_non_members - 1) * (q2 - value**2)
    ) / (n_members * n_non_members)
    return math.sqrt(max(var, 0.0))


def tpr_at_fpr(fpr: npt.NDArray[np.float64], tpr: npt.NDArray[np.float64], target: float) -> float:
    """The highest TPR over thresholds whose FPR is <= ``target``."""
    return float(tpr[fpr <= target + 1e-12].max())


# -- empirical epsilon ------------------------------------------------------------------------------------


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds, each holding with probability >= 1 - alpha: (lower, upper)."""
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    lower = 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(beta.ppf(1 - alpha, successes + 1, trials - successes))
    return lower, upper


def epsilon_from_rates(tpr_lo: float, fpr_hi: float, delta: float) -> float:
    """The largest ε that (TPR_lo, FPR_hi) rule out for an (ε, δ)-DP mechanism; 0 when they rule out none."""
    best = 0.0
    if tpr_lo - delta > 0 and fpr_hi > 0:
        best = max(best, math.log((tpr_lo - delta) / fpr_hi))
    if 1 - fpr_hi - delta > 0 and tpr_lo < 1:
        best = max(best, math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
    return best


@dataclass(frozen=True)
class EpsilonBound:
    """An empirical lower bound on ε and the counts it rests on."""

    epsilon_lb: float
    confidence: float
    delta: float
    threshold: float
    true_positives: int
    positives: int
    false_positives: int | None
    negatives: int | None
    tpr_lo: float
    fpr_hi: float
    method: str

    def to_json(self) -> dict[str, object]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def epsilon_lower_bound(
    true_positives: int,
    positives: int,
    false_positives: int,
    negatives: int,
    *,
    delta: float,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """(ε_lb, TPR_lo, FPR_hi) from a test's counts, with Clopper-Pearson bounds holding jointly at ``confidence``."""
    alpha = (1 - confidence) / 2
    tpr_lo, _ = clopper_pearson(true_positives, positives, alpha)
    _, fpr_hi = clopper_pearson(false_positives, negatives, alpha)
    return epsilon_from_rates(tpr_lo, fpr_hi, delta), tpr_lo, fpr_hi


def mia_epsilon_lower_bound(
    members: npt.ArrayLike,
    non_members: npt.ArrayLike,
    *,
    delta: float,
    confidence: float = 0.95,
    seed: int = 0,
) -> EpsilonBound:
    """ε lower bound of the test "score >= t": t chosen on a random half of each set (the threshold with the
    largest point estimate of the bound), the counts taken on the other half."""
    rng = np.random.default_rng(seed)
    m, n = (
        rng.permutation(np.asarray(members, np.float64)),
        rng.permutation(np.asarray(non_members, np.float64)),
    )
    m_pick, m_test = m[: len(m) // 2], m[len(m) // 2 :]
    n_pick, n_test = n[: len(n) // 2], n[len(n) // 2 :]
    best_t, best = math.inf, -1.0
    for t in np.unique(np.concatenate([m_pick, n_pick])):
        tpr = float(np.mean(m_pick >= t))
        # One false positive added: a threshold with no false positive on this half would look infinitely good.
        fpr = (np.count_nonzero(n_pick >= t) + 1) / (len(n_pick) + 1)
        estimate = epsilon_from_rates(tpr, fpr, delta)
        if estimate > best:
            best_t, best = float(t), estimate
    tp, fp = int(np.count_nonzero(m_test >= best_t)), int(np.count_nonzero(n_test >= best_t))
    eps, tpr_lo, fpr_hi = epsilon_lower_bound(
        tp, len(m_test), fp, len(n_test), delta=delta, confidence=confidence
    )
    return EpsilonBound(
        epsilon_lb=eps,
        confidence=confidence,
        delta=delta,
        threshold=best_t,
        true_positives=tp,
        positives=len(m_test),
        false_positives=fp,
        negatives=len(n_test),
        tpr_lo=tpr_lo,
        fpr_hi=fpr_hi,
        method="loss threshold chosen on half of the members and non-members, counted on the other half",
    )


EXPOSURE_THRESHOLDS = (4.0, 8.0, 12.0, 16.0)
"""Bits; the fixed grid of canary tests "exposure >= t" (chosen before any run)."""


def canary_epsilon_lower_bound(
    exposures: Sequence[float],
    *,
    candidates: int,
    delta: float,
    confidence: float = 0.95,
    thresholds: Sequence[float] = EXPOSURE_THRESHOLDS,
) -> EpsilonBound:
    """ε lower bound of "canary inserted" from the exposures of inserted canaries: for a canary not inserted,
    P(exposure >= t) = floor(|R| 2^-t) / |R| exactly (uniform rank), so only the TPR needs a confidence bound.
    Bonferroni over the threshold grid; the best threshold is reported."""
    alpha = (1 - confidence) / len(thresholds)
    best: EpsilonBound | None = None
    for t in thresholds:
        fpr = math.floor(candidates * 2.0**-t) / candidates
        tp = sum(e >= t for e in exposures)
        tpr_lo, _ = clopper_pearson(tp, len(exposures), alpha)
        eps = epsilon_from_rates(tpr_lo, fpr, delta) if fpr > 0 else 0.0
        if best is None or eps > best.epsilon_lb:
            best = EpsilonBound(
                epsilon_lb=eps,
                confidence=confidence,
                delta=delta,
                threshold=t,
                true_positives=tp,
                positives=len(exposures),
                false_positives=None,
                negatives=None,
                tpr_lo=tpr_lo,
                fpr_hi=fpr,
                method="exposure >= t on a fixed grid of t (Bonferroni), FPR exact from the uniform rank",
            )
    assert best is not None
    return best
