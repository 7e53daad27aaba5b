"""Privacy audit: does DP stop Tessera's federations from memorising records? Canary exposure and
membership inference on the final global model, and an empirical lower bound on ε next to the accounted one.

    python bench/audit.py                         # every task, no DP and local DP-SGD at epsilon 3 and 100
    python bench/audit.py --quick                 # the same, smaller and shorter (a few minutes in all)
    python bench/audit.py --tasks canary --privacy none,local --epsilons 3
    python bench/audit.py --tasks ai4i,mnist --privacy distributed --epsilons 3,100

Each configuration is one real federation (:func:`tessera.apps.local_federation.run_local_federation`: the
curator and participants of the services, secure aggregation, FedAvg, Opacus DP-SGD with the persistent
accountant, or distributed DP-SGD with Skellam noise shares). Only the final global model is attacked, as
anyone who receives it could.

Tasks
-----
``canary``: three organisations train a next-character model (``audit_models.char_gru``: embedding, Opacus
DPGRU, linear) on consecutive parts of Ambrose Bierce's *The Devil's Dictionary* (1911, public domain; the
Debian package ``dict-devil``, file ``/usr/share/dictd/devil.dict.dz``). An example is a window of
``context`` characters and the character after it. Canaries "the card number of <name> is ddd ddd" (secret:
6 random digits, 10^6 candidates) are inserted 1, 4 or 16 times into organisation ``writer-1``'s training
text only; some more are drawn and never inserted (references: their exposure should be about 1.44 bits).
Exposure is exact over all 10^6 candidates (``_audit.candidate_log_perplexities``).

``ai4i`` and ``mnist``: the tasks of ``bench/ai4i.py`` (4 manufacturers, MLP) and ``bench/mnist.py``
(``cnn28``; here 4 organisations with an IID sample of the MNIST training images, fewer and smaller so the
audit stays within minutes). The target organisation holds out half of its records (``validation_fraction``
0.5): the trained half are the members, the held-out half, from the same distribution, the non-members.
Loss attack: score = -cross-entropy of the record under the final model.

Privacy configurations
----------------------
``--privacy`` names entries of :data:`PRIVACY` (``none``: no DP; ``local``: each organisation's DP-SGD at
every ``--epsilons`` value; ``distributed``: distributed DP-SGD under secure aggregation at every
``--epsilons`` value). Each entry is a :class:`PrivacyKind`: how the participants' ``privacy`` settings are
made for an ε, which training preset it uses, ``epsilon_of``, where the ε accounted for the target
organisation's records is read after the run (by default its persistent accountant file, which both modes
keep), and ``federation``, the roster parameters and curator ``server`` settings of the run (default: the
update layout's per-coordinate clip).

``distributed`` (docs/privacy-modes.md) sets the mode in the roster (64-bit ring, ``privacy.mode``
distributed, clip norm, resolution 4096, no colluders) with a noise multiplier planned by the Skellam
accountant (``tessera.skellam.plan_noise_multiplier``, as ``tessera privacy plan`` and ``bench/ai4i.py`` /
``bench/mnist.py`` plan it) for the preset's ``rounds`` steps at the largest sampling rate of the
organisations; every organisation samples at the preset's ``sample_rate`` (batch round(q n_i)); each round
is one DP-SGD step of the federation, taken by the curator with the preset's lr and momentum. So its presets
are hundreds of short rounds. The char-GRU trains in this mode too (``torch.func`` per-example gradients
through Opacus' DPGRU, which is built of ordinary linear layers).

Outputs: a table on stdout, ``audit.json`` and ``audit.png`` (exposure per insertion count; ROC curves) in
``--out``. Exit status 3, with a loud message, if an empirical lower bound exceeds the accounted ε (that is a
bug in the training or the accounting); 2 if data is missing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _audit import (
    VOCABULARY,
    EpsilonBound,
    auc,
    auc_standard_error,
    canary_epsilon_lower_bound,
    candidate_log_perplexities,
    digits_of,
    encode,
    exposure,
    mia_epsilon_lower_bound,
    normalise_text,
    roc,
    secret_text,
    tpr_at_fpr,
    windows,
)
from _federation import FederationRun, data_dir, require_files, run_federation_full, say

DEFAULT_TEXT = Path("/usr/share/dictd/devil.dict.dz")
CONFIDENCE = 0.95
DELTA = 1e-5
TEMPLATE = "ddd ddd"
NAMES = (
    "alice",
    "bruno",
    "chloe",
    "dmitri",
    "elena",
    "farid",
    "greta",
    "hiro",
    "ines",
    "jonas",
    "kira",
    "liam",
)
CHAR_MODEL = "audit_models:char_gru"

# -- privacy configurations -----------------------------------------------------------------------------


def participant_accountant(run: FederationRun, organisation: str) -> float:
    """ε as ``organisation``'s own persistent accountant file records it at the end of the run."""
    return run.epsilon[organisation]


FederationArguments = Callable[[float | None, dict[str, Any], dict[str, Any]], dict[str, Any]]
"""(ε, the task's preset, the task's federation arguments: ``organisations``, ``datasets``, ``model``, ...) ->
the further arguments of :func:`_federation.run_federation_full` (``roster``, ``server``,
``privacy_per_org``). It may add what it decided (a planned noise multiplier, the batch sizes) to the preset
dict, which is recorded with the results."""


def layout_roster(eps: float | None, preset: dict[str, Any], federation: dict[str, Any]) -> dict[str, Any]:
    """Local mode and no DP: the roster's update layout clips every coordinate of the update to ±clip."""
    return {"roster": {"layout": {"clip": preset["clip"]}}}


@dataclass(frozen=True)
class PrivacyKind:
    """One way of training: the participants' privacy settings for an ε (None without DP), the task preset
    it trains with, where the ε accounted for an organisation's records is read after the run, and the roster
    and curator arguments of the federation."""

    private: bool
    settings: Callable[[float | None, dict[str, Any]], dict[str, Any]]
    preset: str  # the key of a task's PRESETS entry
    epsilon_of: Callable[[FederationRun, str], float] = participant_accountant
    federation: FederationArguments = layout_roster

    def accounted(self, run: FederationRun, organisation: str) -> float:
        """ε of ``organisation`` after the run (inf when not private)."""
        return self.epsilon_of(run, organisation) if self.private else math.inf


def _training(preset: dict[str, Any]) -> dict[str, Any]:
    keys = ("local_epochs", "batch_size", "lr", "momentum", "max_grad_norm")
    return {k: preset[k] for k in keys} | {"planned_rounds": preset["rounds"]}


RESOLUTION = 4096.0
"""The roster's default distributed-mode resolution (integer units per clipping norm)."""


def _model_dimension(spec: dict[str, Any], allowed_imports: tuple[str, ...] = ()) -> int:
    from tessera.models import ModelSpec, build_model

    model = build_model(ModelSpec.model_validate(spec), allowed_imports=allowed_imports)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def distributed_federation(
    eps: float | None, preset: dict[str, Any], federation: dict[str, Any]
) -> dict[str, Any]:
    """Distributed DP-SGD: one step of the federation per round. Every organisation samples at the preset's
    ``sample_rate`` q (its expected batch is round(q n_i), as ``bench/mnist.py`` does); the roster's noise
    multiplier is planned with the Skellam accountant (``tessera.skellam.plan_noise_multiplier``, what
    ``tessera privacy plan`` computes) so that ``rounds`` steps at the largest resulting q_i stay within ε;
    the curator's SGD step takes the preset's lr and momentum."""
    from tessera.skellam import plan_noise_multiplier

    if eps is None:
        raise ValueError("the distributed mode needs an epsilon")
    sizes = {o: len(train) for o, (train, _) in federation["datasets"].items()}
    batches = {o: max(1, round(preset["sample_rate"] * n)) for o, n in sizes.items()}
    q = max(batches[o] / n for o, n in sizes.items())
    clip = preset["max_grad_norm"]
    z = plan_noise_multiplier(
        clip=clip,
        scale=RESOLUTION / clip,
        dimension=_model_dimension(federation["model"], federation.get("allowed_imports", ())),
        sample_rate=q,
        steps=preset["rounds"],
        target_epsilon=eps,
        delta=DELTA,
    )
    preset.update(noise_multiplier=round(z, 6), batch_sizes=batches, max_sample_rate=round(q, 6))
    return {
        "roster": {
            "layout": {"ring_bits": 64},
            "privacy": {
                "mode": "distributed",
                "noise_multiplier": z,
                "clip_norm": clip,
                "resolution": RESOLUTION,
                "colluders": 0,
            },
        },
        "server": {
            "lr": preset["lr"],
            "momentum": preset["momentum"],
            "lr_decay": preset.get("lr_decay", 1.0),
            "evaluate_every": preset["evaluate_every"],
        },
        "privacy_per_org": {o: {"batch_size": b} for o, b in batches.items()},
    }


PRIVACY: dict[str, PrivacyKind] = {
    "none": PrivacyKind(
        private=False, settings=lambda eps, p: {"enabled": False, **_training(p)}, preset="none"
    ),
    "local": PrivacyKind(
        private=True,
        settings=lambda eps, p: {"enabled": True, "target_epsilon": eps, "delta": DELTA, **_training(p)},
        preset="dp",
    ),
    # The mode is the roster's (distributed_federation); the participants' settings only carry the budget
    # (ε, δ, the planned steps), their batch size (per organisation) and no local training options.
    "distributed": PrivacyKind(
        private=True,
        settings=lambda eps, p: {
            "enabled": True,
            "target_epsilon": eps,
            "delta": DELTA,
            "planned_rounds": p["rounds"],
        },
        preset="distributed",
        federation=distributed_federation,
    ),
}


@dataclass(frozen=True)
class Config:
    kind: str
    epsilon: float | None

    @property
    def label(self) -> str:
        return "no DP" if self.epsilon is None else f"{self.kind} DP eps={self.epsilon:g}"


# -- presets ---------------------------------------------------------------------------------------------

# rounds, local_epochs, batch_size, lr, momentum, max_grad_norm, secagg clip; "quick" scales a few down.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "canary": {
        "none": {
            "rounds": 12,
            "local_epochs": 2.0,
            "batch_size": 32,
            "lr": 0.5,
            "momentum": 0.9,
            "max_grad_norm": 1.0,
            "clip": 2.0,
        },
        # lr 2.0 drifted under the noise at epsilon 3 (validation accuracy 0.25 at round 3, 0.06 at round 12).
        "dp": {
            "rounds": 12,
            "local_epochs": 1.0,
            "batch_size": 256,
            "lr": 0.5,
            "momentum": 0.9,
            "max_grad_norm": 1.0,
            "clip": 2.0,
        },
        # One DP-SGD step of the federation per round: q = 0.035 is a batch of about 256 windows per writer
        # (the local preset's batch), 768 over the three; the curator's SGD takes lr and momentum. 200 steps
        # (the local preset takes about 330 per writer): a round costs 3-4 s here (per-example GRU gradients).
        "distributed": {
            "rounds": 200,
            "quick_rounds": 100,
            "sample_rate": 0.035,
            "lr": 0.5,
            "momentum": 0.9,
            "max_grad_norm": 1.0,
            "evaluate_every": 20,
        },
    },
    "ai4i": {
        # Wider and longer than bench/ai4i.py's non-DP preset (32, 32; 1 epoch): more capacity to memorise.
        "none": {
            "rounds": 30,
            "local_epochs": 2.0,
            "batch_size": 32,
            "lr": 0.05,
            "momentum": 0.9,
            "max_grad_norm": 1.0,
            "clip": 1.0,
            "hidden": [128, 128],
        },
        "dp": {
            "rounds": 30,
            "local_epochs": 1.0,
            "batch_size": 250,
            "lr": 0.5,
            "momentum": 0.9,
            "max_grad_norm": 1.0,
            "clip": 2.0,
            "hidden": [128],
        },
        # bench/ai4i.py's distributed preset (600 steps, q = 0.125: its batch 250 of 2,000 training records,
        # curator lr 0.5, momentum 0.9, clip norm 1, MLP 11-128-2), q kept at 0.125 for the target's 1,250.
        "distributed": {
            "rounds": 600,
            "quick_rounds": 200,
            "sample_rate": 0.125,
            "lr": 0.5,
            "momentum": 0.9,
            "max_grad_norm": 1.0,
            "evaluate_every": 10,
            "hidden": [128],
        },
    },
    "mnist": {
        "none": {
            "rounds": 10,
            "local_epochs": 1.0,
            "batch_size": 32,
            "lr": 0.05,
            "momentum": 0.9,
            "max_grad_norm": 1.0,
            "clip": 1.0,
            "hidden": 64,
        },
        "dp": {
            "rounds": 10,
            "local_epochs": 1.0,
            "batch_size": 128,
            "lr": 2.0,
            "momentum": 0.9,
            "max_grad_norm": 0.1,
            "clip": 1.0,
            "hidden": 32,
        },
        # bench/mnist.py's distributed preset (curator lr 2.0, momentum 0.9, clip norm 0.1, hidden 32) with
        # fewer, larger steps for the audit's 4 x 1,500 images: q = 0.1 (expected batch 480 over the union)
        # instead of 0.02 of 54,000, 300 steps instead of 1,500.
        "distributed": {
            "rounds": 300,
            "quick_rounds": 100,
            "sample_rate": 0.1,
            "lr": 2.0,
            "momentum": 0.9,
            "max_grad_norm": 0.1,
            "evaluate_every": 25,
            "hidden": 32,
        },
    },
}
SIZES = {
    # characters per writer / records per MNIST organisation, canaries per insertion count, context
    "full": {"chars": 8_000, "images": 1_500, "per_count": 2, "references": 4, "context": 16, "hidden": 64},
    "quick": {"chars": 5_000, "images": 800, "per_count": 1, "references": 2, "context": 16, "hidden": 48},
}
QUICK_ROUNDS = {"canary": 8, "ai4i": 10, "mnist": 5}
"""--quick's rounds, unless the preset names its own ``quick_rounds``."""
INSERTIONS = (1, 4, 16)


def preset(task: str, kind: PrivacyKind, quick: bool) -> dict[str, Any]:
    out = dict(PRESETS[task][kind.preset])
    quick_rounds = out.pop("quick_rounds", QUICK_ROUNDS[task])
    if quick:
        out["rounds"] = quick_rounds
    return out


# -- helpers ---------------------------------------------------------------------------------------------


def _npz(folder: Path, name: str, dataset: Any) -> dict[str, Any]:
    """Write an organisation's (already encoded) records where its data settings say they are."""
    path = folder / f"{name}.npz"
    np.savez(path, x=dataset.x, y=dataset.y)
    return {"path": str(path)}


def _final_model(spec: dict[str, Any], run: FederationRun) -> torch.nn.Module:
    from tessera.models import ModelSpec, build_model, load_flat_parameters

    model_spec = ModelSpec(**spec)
    target = model_spec.import_target
    model = build_model(model_spec, allowed_imports=(target,) if target else ())
    load_flat_parameters(model, run.weights)
    return model.eval()


def _losses(model: torch.nn.Module, dataset: Any) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(dataset), 4096):
            x, y = (
                torch.from_numpy(np.array(dataset.x[i : i + 4096])),
                torch.from_numpy(np.array(dataset.y[i : i + 4096])),
            )
            out.append(torch.nn.functional.cross_entropy(model(x), y, reduction="none").double().numpy())
    return np.concatenate(out)


def _federate(
    task: str, config: Config, kind: PrivacyKind, settings: dict[str, Any], seed: int, **kwargs: Any
) -> FederationRun:
    privacy = kind.settings(config.epsilon, settings)
    extra = kind.federation(config.epsilon, settings, kwargs)
    say(f"[{task} | {config.label}] settings {json.dumps(settings)}")
    return run_federation_full(
        federation=f"audit-{task}",
        rounds=settings["rounds"],
        secagg={"phase_timeout": 120},
        privacy=privacy,
        training_seed=seed,
        model_seed=seed,
        label=f"{task} {config.label}",
        **extra,
        **kwargs,
    )


def _utility(run: FederationRun) -> dict[str, Any]:
    last = run.document["history"][-1]
    validation = last.get("curator_validation") or {}
    return {
        "rounds_completed": run.document["rounds_completed"],
        "secure_averaged_accuracy": last["accuracy"],
        "curator_test_accuracy": validation.get("accuracy"),
        "max_clipped_fraction": max(r["clipped_fraction"] for r in run.document["history"]),
    }


def _bound_json(bound: EpsilonBound, accounted: float) -> dict[str, Any]:
    return bound.to_json() | {"accounted_epsilon": None if math.isinf(accounted) else accounted}


# -- the canary task ---------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """The Devil's Dictionary from the dict-devil package: from its PREFACE on, normalised."""
    raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    start = raw.find("PREFACE")
    return normalise_text(raw[start if start >= 0 else 0 :])


@dataclass(frozen=True)
class Canary:
    name: str
    secret: int
    insertions: int

    @property
    def prefix(self) -> str:
        return f"the card number of {self.name} is "

    @property
    def text(self) -> str:
        return self.prefix + secret_text(TEMPLATE, self.secret)


def plant(text: str, canaries: list[Canary], rng: np.random.Generator) -> str:
    """``text`` with each canary inserted ``insertions`` times, each time as a sentence at a word boundary
    chosen uniformly at random."""
    pieces = [c.text for c in canaries for _ in range(c.insertions)]
    spaces = np.flatnonzero(np.frombuffer(text.encode(), dtype=np.uint8) == ord(" "))
    at = np.sort(rng.choice(spaces, size=len(pieces), replace=False))
    order = rng.permutation(len(pieces))
    out, last = [], 0
    for position, k in zip(at, order, strict=True):
        out += [text[last:position], " ", pieces[k], "."]
        last = int(position)
    out.append(text[last:])
    return "".join(out)


def run_canary(config: Config, kind: PrivacyKind, args: argparse.Namespace) -> dict[str, Any]:
    from tessera.data import ArrayDataset

    size = SIZES["quick" if args.quick else "full"]
    text_file = args.text_file or DEFAULT_TEXT
    if not text_file.is_file():
        say(
            f"{text_file} not found: install the public-domain text with `apt-get install dict-devil`, or pass --text-file"
        )
        raise SystemExit(2)
    text = read_text(text_file)
    rng = np.random.default_rng(args.seed)
    secrets = rng.choice(10 ** digits_of(TEMPLATE), size=len(NAMES), replace=False)
    counts = [r for r in INSERTIONS for _ in range(size["per_count"])] + [0] * size["references"]
    canaries = [Canary(n, int(s), r) for n, s, r in zip(NAMES, secrets, counts, strict=False)]
    writers = ["writer-1", "writer-2", "writer-3"]
    context, chars = size["context"], size["chars"]
    settings = preset("canary", kind, args.quick)
    datasets, data = {}, {}
    with tempfile.TemporaryDirectory(prefix="tessera-audit-") as tmp:
        for i, writer in enumerate(writers):
            part = text[i * chars : (i + 1) * chars]
            cut = int(len(part) * 0.9)
            train_text, validation_text = part[:cut], part[cut:]
            if writer == writers[0]:
                train_text = plant(train_text, [c for c in canaries if c.insertions], rng)
            train = ArrayDataset(*windows(encode(train_text), context))
            validation = ArrayDataset(*windows(encode(validation_text), context))
            datasets[writer] = (train, validation)
            data[writer] = _npz(Path(tmp), writer, train)
        say(
            f"[canary] windows per writer {[len(t) for t, _ in datasets.values()]}; canaries "
            + ", ".join(f"{c.name}x{c.insertions}" for c in canaries)
        )
        spec = {
            "name": f"import:{CHAR_MODEL}",
            "kwargs": {"vocabulary": VOCABULARY, "hidden": size["hidden"]},
        }
        run = _federate(
            "canary",
            config,
            kind,
            settings,
            args.seed,
            organisations=writers,
            datasets=datasets,
            model=spec,
            num_classes=VOCABULARY,
            data=data,
            allowed_imports=(CHAR_MODEL,),
        )
    model = _final_model(spec, run)
    candidates = 10 ** digits_of(TEMPLATE)
    per_canary = []
    for c in canaries:
        scores = candidate_log_perplexities(model, prefix=c.prefix, template=TEMPLATE, context=context)
        per_canary.append(
            {"name": c.name, "insertions": c.insertions, "exposure": round(exposure(scores, c.secret), 3)}
        )
    accounted = kind.accounted(run, writers[0])
    # An inserted canary touches len(secret) + context training windows per insertion (its characters as
    # targets, or in the context): DP-SGD's epsilon is per window, so the canary is a group of that many.
    touched = len(TEMPLATE) + context
    by_count = {}
    for r in INSERTIONS:
        exposures = [p["exposure"] for p in per_canary if p["insertions"] == r]
        group = r * touched
        bound = canary_epsilon_lower_bound(exposures, candidates=candidates, delta=0.0, confidence=CONFIDENCE)
        entry: dict[str, Any] = {
            "exposures": exposures,
            "windows_touched": group,
            "epsilon_lb_canary_delta0": bound.to_json(),
        }
        if kind.private:
            # Group privacy: (G eps, G e^((G-1) eps) delta); the bound is only checkable while that delta < 1.
            group_delta = group * math.exp(min((group - 1) * accounted, 700)) * DELTA
            entry["group_epsilon"] = group * accounted
            entry["group_delta"] = group_delta
            if group_delta < 1:
                check = canary_epsilon_lower_bound(exposures, candidates=candidates, delta=group_delta)
                entry["violation"] = check.epsilon_lb > group * accounted
                entry["epsilon_lb_canary_group_delta"] = check.to_json()
        by_count[str(r)] = entry
    references = [p["exposure"] for p in per_canary if p["insertions"] == 0]
    return {
        "task": "canary",
        "config": config.label,
        "accounted_epsilon": None if math.isinf(accounted) else accounted,
        "candidates": candidates,
        "canaries": per_canary,
        "by_insertions": by_count,
        "reference_exposure_mean": round(statistics.fmean(references), 3) if references else None,
        "utility": _utility(run),
        "settings": settings | {"context": context, "chars_per_writer": chars, "hidden": size["hidden"]},
        "wall_s": round(run.wall, 1),
        "violation": any(e.get("violation", False) for e in by_count.values()),
    }


# -- the membership-inference tasks ---------------------------------------------------------------------------


def _mia(
    config: Config,
    kind: PrivacyKind,
    run: FederationRun,
    spec: dict[str, Any],
    target: str,
    datasets: dict[str, Any],
    task: str,
    settings: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    model = _final_model(spec, run)
    train, held_out = datasets[target]
    members, non_members = -_losses(model, train), -_losses(model, held_out)
    fpr, tpr = roc(members, non_members)
    value = auc(members, non_members)
    accounted = kind.accounted(run, target)
    bound = mia_epsilon_lower_bound(
        members, non_members, delta=DELTA if kind.private else 0.0, confidence=CONFIDENCE, seed=seed
    )
    keep = np.unique(np.concatenate([np.searchsorted(fpr, np.geomspace(1e-4, 1, 200)), [len(fpr) - 1]]))
    return {
        "task": task,
        "config": config.label,
        "target": target,
        "members": len(members),
        "non_members": len(non_members),
        "accounted_epsilon": None if math.isinf(accounted) else accounted,
        "auc": round(value, 4),
        "auc_se": round(auc_standard_error(value, len(members), len(non_members)), 4),
        "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(fpr, tpr, 0.001),
        "epsilon_lb": _bound_json(bound, accounted),
        "violation": bound.epsilon_lb > accounted,
        "roc": {
            "fpr": fpr[np.minimum(keep, len(fpr) - 1)].tolist(),
            "tpr": tpr[np.minimum(keep, len(tpr) - 1)].tolist(),
        },
        "mean_loss": {"members": float(-members.mean()), "non_members": float(-non_members.mean())},
        "utility": _utility(run),
        "settings": settings,
        "wall_s": round(run.wall, 1),
    }


def run_ai4i(config: Config, kind: PrivacyKind, args: argparse.Namespace) -> dict[str, Any]:
    import ai4i
    from tessera.data import load_dataset, train_validation_split

    (path,) = require_files(data_dir(args.data_dir) / "ai4i2020", [ai4i.CSV_NAME], "AI4I 2020 data")
    _, rows = ai4i.read_rows(path)
    encoding = ai4i.encoding("physics")
    organisations = [f"manufacturer-{i}" for i in range(1, ai4i.MANUFACTURERS + 1)]
    target = organisations[1]
    settings = preset("ai4i", kind, args.quick)
    datasets, data = {}, {}
    with tempfile.TemporaryDirectory(prefix="tessera-audit-") as tmp:
        for i, (o, part) in enumerate(zip(organisations, ai4i.split_by_product_id(rows), strict=True)):
            file = Path(tmp) / f"{o}.csv"
            out = [ai4i.add_physics(r) for r in part]
            with file.open("w", newline="") as handle:
                import csv

                writer = csv.DictWriter(handle, fieldnames=list(out[0]))
                writer.writeheader()
                writer.writerows(out)
            drop = [*ai4i.IDENTIFIERS, *ai4i.FAILURE_MODES]
            dataset = load_dataset(file, label_column=ai4i.LABEL, encoding=encoding, drop_columns=drop)
            fraction = 0.5 if o == target else 0.2
            datasets[o] = train_validation_split(dataset, fraction, args.seed + i)
            data[o] = {
                "path": str(file),
                "label_column": ai4i.LABEL,
                "drop_columns": drop,
                "validation_fraction": fraction,
                "split_seed": args.seed + i,
            }
        spec = {
            "name": "mlp",
            "kwargs": {
                "input_dim": len(encoding.output_names()),
                "hidden": settings["hidden"],
                "num_classes": 2,
            },
        }
        run = _federate(
            "ai4i",
            config,
            kind,
            settings,
            args.seed,
            organisations=organisations,
            datasets=datasets,
            model=spec,
            num_classes=2,
            data=data,
        )
    return _mia(config, kind, run, spec, target, datasets, "ai4i", settings, args.seed)


def run_mnist(config: Config, kind: PrivacyKind, args: argparse.Namespace) -> dict[str, Any]:
    import mnist
    from tessera.data import load_dataset, train_validation_split

    size = SIZES["quick" if args.quick else "full"]
    folder = data_dir(args.data_dir) / "mnist"
    images, _, test_images, test_labels = require_files(
        folder, [mnist.IMAGES, mnist.LABELS, mnist.TEST_IMAGES, mnist.TEST_LABELS], "MNIST"
    )
    pool = load_dataset(images)
    test = load_dataset(test_images, labels_path=test_labels).subset(np.arange(2000))
    organisations = [f"org-{i}" for i in range(1, 5)]
    target = organisations[0]
    picked = np.random.default_rng(args.seed).permutation(len(pool))[: size["images"] * len(organisations)]
    settings = preset("mnist", kind, args.quick)
    datasets, data = {}, {}
    with tempfile.TemporaryDirectory(prefix="tessera-audit-") as tmp:
        for i, o in enumerate(organisations):
            part = pool.subset(picked[i * size["images"] : (i + 1) * size["images"]])
            datasets[o] = train_validation_split(part, 0.5 if o == target else 0.1, args.seed + i)
            data[o] = _npz(Path(tmp), o, part)
        spec = {"name": "cnn28", "kwargs": {"num_classes": 10, "hidden": settings["hidden"]}}
        run = _federate(
            "mnist",
            config,
            kind,
            settings,
            args.seed,
            organisations=organisations,
            datasets=datasets,
            model=spec,
            num_classes=10,
            data=data,
            curator_validation=test,
        )
    return _mia(config, kind, run, spec, target, datasets, "mnist", settings, args.seed)


TASKS: dict[str, Callable[[Config, PrivacyKind, argparse.Namespace], dict[str, Any]]] = {
    "canary": run_canary,
    "ai4i": run_ai4i,
    "mnist": run_mnist,
}

# -- report ------------------------------------------------------------------------------------------------


def _eps(value: float | None) -> str:
    return "inf" if value is None else f"{value:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    canary = [r for r in results if r["task"] == "canary"]
    if canary:
        lines += [
            "| canary: config | accounted eps (per window) | exposure x1 | exposure x4 | exposure x16 | "
            "never inserted (mean) | eps_lb of the x16 canaries as a unit | eps for that unit (group privacy) | "
            "char accuracy | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in canary:
            cells = [
                ", ".join(f"{e:.1f}" for e in r["by_insertions"][str(k)]["exposures"]) for k in INSERTIONS
            ]
            x16 = r["by_insertions"]["16"]
            group = (
                "inf"
                if r["accounted_epsilon"] is None
                else f"{x16['group_epsilon']:.0f} ({x16['windows_touched']} windows; delta >= 1)"
            )
            lines.append(
                f"| {r['config']} | {_eps(r['accounted_epsilon'])} | "
                + " | ".join(cells)
                + f" | {r['reference_exposure_mean']} | {x16['epsilon_lb_canary_delta0']['epsilon_lb']:.2f} | {group} | "
                f"{r['utility']['secure_averaged_accuracy']:.3f} | {r['wall_s']} |"
            )
        lines.append("")
    mia = [r for r in results if r["task"] != "canary"]
    if mia:
        lines += [
            "| MIA: task | config | accounted eps | AUC (± SE) | TPR @ 1 % FPR | TPR @ 0.1 % FPR | "
            f"eps_lb ({CONFIDENCE:.0%}) | accuracy | wall s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mia:
            acc = r["utility"]["curator_test_accuracy"] or r["utility"]["secure_averaged_accuracy"]
            lines.append(
                f"| {r['task']} | {r['config']} | {_eps(r['accounted_epsilon'])} | {r['auc']:.3f} ± {r['auc_se']:.3f} | "
                f"{r['tpr_at_1pct_fpr']:.3f} | {r['tpr_at_0.1pct_fpr']:.3f} | {r['epsilon_lb']['epsilon_lb']:.2f} | "
                f"{acc:.3f} | {r['wall_s']} |"
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    ax = axes[0]
    for r in (r for r in results if r["task"] == "canary"):
        xs = [0, *INSERTIONS]
        ref = [p["exposure"] for p in r["canaries"] if p["insertions"] == 0]
        means = [statistics.fmean(ref) if ref else math.nan] + [
            statistics.fmean(r["by_insertions"][str(k)]["exposures"]) for k in INSERTIONS
        ]
        line = ax.plot(xs, means, marker="o", label=f"{r['config']} (eps {_eps(r['accounted_epsilon'])})")[0]
        for p in r["canaries"]:
            ax.scatter(p["insertions"], p["exposure"], color=line.get_color(), alpha=0.4, s=14)
    ax.axhline(math.log2(10**6), color="grey", ls="--", lw=0.8)
    ax.text(0, math.log2(10**6) + 0.3, "maximum (rank 1 of 10^6)", fontsize=8, color="grey")
    ax.axhline(1 / math.log(2), color="grey", ls=":", lw=0.8)
    ax.text(0, 1 / math.log(2) + 0.3, "expected for an unseen secret (1.44)", fontsize=8, color="grey")
    ax.set(
        xscale="symlog",
        xlabel="insertions into writer-1's text (0 = never inserted)",
        ylabel="exposure (bits)",
        title="Canary exposure (char model, Devil's Dictionary)",
        ylim=(0, 21),
    )
    ax.set_xticks([0, *INSERTIONS], [str(x) for x in (0, *INSERTIONS)])
    ax.legend(fontsize=8)
    for ax, task in zip(axes[1:], ("ai4i", "mnist"), strict=True):
        for r in (r for r in results if r["task"] == task):
            fpr, tpr = np.array(r["roc"]["fpr"]), np.array(r["roc"]["tpr"])
            ax.plot(
                np.maximum(fpr, 1e-4),
                np.maximum(tpr, 1e-4),
                label=f"{r['config']}: AUC {r['auc']:.3f}, eps_lb {r['epsilon_lb']['epsilon_lb']:.2f}",
            )
        grid = np.geomspace(1e-4, 1, 50)
        ax.plot(grid, grid, color="grey", ls="--", lw=0.8, label="chance")
        ax.set(
            xscale="log",
            yscale="log",
            xlim=(1e-3, 1),
            ylim=(1e-3, 1),
            xlabel="false-positive rate",
            ylabel="true-positive rate",
            title=f"Loss attack on {task}: members vs non-members",
        )
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="canary,ai4i,mnist", help="comma-separated: canary, ai4i, mnist")
    parser.add_argument("--privacy", default="none,local", help=f"comma-separated: {', '.join(PRIVACY)}")
    parser.add_argument("--epsilons", default="3,100", help="the ε of every private configuration")
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer rounds (a few minutes)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the splits, canaries, models and training")
    parser.add_argument("--data-dir", type=Path, help="the shared data folder (holds mnist/, ai4i2020/)")
    parser.add_argument("--text-file", type=Path, help=f"the canary task's text (default {DEFAULT_TEXT})")
    parser.add_argument(
        "--out", type=Path, default=Path("audit-out"), help="where audit.json and audit.png go"
    )
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="AUDIT_JSON",
        help="run nothing: merge the results of earlier runs' audit.json files, or of earlier merges, (later files "
        "win for the same task and configuration) into one table, audit.json and audit.png in --out",
    )
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report, args.out)
    tasks = [t for t in args.tasks.split(",") if t]
    kinds = [k for k in args.privacy.split(",") if k]
    unknown = [t for t in tasks if t not in TASKS] + [k for k in kinds if k not in PRIVACY]
    if unknown:
        parser.error(f"unknown task or privacy kind {unknown}")
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    configs = [Config(k, e) for k in kinds for e in ([None] if not PRIVACY[k].private else epsilons)]
    say(
        f"audit: seed {args.seed}, tasks {tasks}, configurations {[c.label for c in configs]}, quick={args.quick}"
    )
    # One thread for the attacks: on 2 shared cores, two torch threads made the candidate scoring 10x slower.
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    for task in tasks:
        for config in configs:
            results.append(TASKS[task](config, PRIVACY[config.kind], args))
            document = {
                "seed": args.seed,
                "quick": args.quick,
                "confidence": CONFIDENCE,
                "delta": DELTA,
                "results": results,
                "total_s": round(time.monotonic() - started, 1),
            }
            (args.out / "audit.json").write_text(json.dumps(document, indent=1))
            say(f"[{task} | {config.label}] done in {results[-1]['wall_s']} s")
    plot(results, args.out / "audit.png")
    print(table(results))
    print(
        f"\nseed {args.seed}; {time.monotonic() - started:.0f} s in all; {args.out / 'audit.json'}, {args.out / 'audit.png'}"
    )
    return verdict(results)


def report(files: list[Path], out: Path) -> int:
    """Merge earlier runs' results into one table, JSON and PNG; the same exit status as a run."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    sources = []
    for file in files:
        document = json.loads(file.read_text())
        # An earlier --report (docs/privacy-audit/audit.json): its results carry their own seed and preset.
        if "merged_from" in document:
            sources += document["merged_from"]
            for r in document["results"]:
                merged[(r["task"], r["config"])] = r
            continue
        sources.append({"file": str(file), "seed": document["seed"], "quick": document["quick"]})
        for r in document["results"]:
            merged[(r["task"], r["config"])] = r | {"seed": document["seed"], "quick": document["quick"]}
    if len({(s["seed"], s["quick"]) for s in sources}) > 1:
        say(f"refusing to merge runs with different seeds or presets: {sources}")
        return 2
    order = {t: i for i, t in enumerate(TASKS)}
    results = sorted(merged.values(), key=lambda r: order[r["task"]])
    out.mkdir(parents=True, exist_ok=True)
    document = {"merged_from": sources, "confidence": CONFIDENCE, "delta": DELTA, "results": results}
    (out / "audit.json").write_text(json.dumps(document, indent=1))
    plot(results, out / "audit.png")
    print(table(results))
    print(f"\nmerged from {', '.join(str(f) for f in files)}; {out / 'audit.json'}, {out / 'audit.png'}")
    return verdict(results)


def verdict(results: list[dict[str, Any]]) -> int:
    """0, or 3 with a loud message when a lower bound exceeds the accounted epsilon."""
    violations = [f"{r['task']} / {r['config']}" for r in results if r["violation"]]
    if violations:
        say(
            "\n"
            + "!" * 100
            + "\nPRIVACY AUDIT FAILED: an empirical lower bound on epsilon exceeds the accounted epsilon in "
            + "; ".join(violations)
            + ".\nThat cannot happen if training is (epsilon, delta)-DP as accounted: "
            "the DP-SGD implementation, the accountant or the audit has a bug.\n" + "!" * 100
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
