"""AI4I 2020 predictive maintenance across 4 manufacturers: an MLP with DP-SGD (epsilon 3) and secure aggregation.

    python bench/ai4i.py [--json]                    # DP-SGD, epsilon 3, delta 1e-5 per manufacturer
    python bench/ai4i.py --dp off [--json]           # the same without DP (a reference, not private)

The split: the 10,000 records are sorted by the numeric part of ``Product ID`` (``L47181`` -> 47181; the IDs
are unique) and cut into 4 contiguous ranges of 2,500 records, one per manufacturer. The ranges are far from
IID: manufacturer 1 (IDs 14860-23211) holds only type-M products, 3 and 4 (48864-57174) only type L,
2 (23216-48859) a mix; failures are 79 / 59 / 135 / 66. Each manufacturer writes its own CSV file and reads it
with the shared encoding; it holds out 20 % (``--validation-fraction``) as its local validation split, never
trained on.

Features: ``Type`` (categorical L / M / H, one-hot) and the five process measurements, standardised. Dropped:
``UDI`` and ``Product ID`` (identifiers) and the five failure-mode columns TWF / HDF / PWF / OSF / RNF (they
define the label: ``Machine failure`` is 1 exactly when one of them is). The label is ``Machine failure``.

The encoding is pinned, identical at every manufacturer, from agreed reference values, not from any site's
(or the pooled) statistics: a site's own mean and std would encode the same measurement differently at each
site (manufacturer 1 sees only type M, so its tool-wear and torque statistics differ from manufacturer 3's).
Where the data set's published description (Matzka 2020, UCI) gives the generating values, those are used;
otherwise round engineering values of the process:

    feature                  reference mean   reference scale   source
    Type                     categories L, M, H                 the three quality variants of the description
    Air temperature [K]      300              2                 "random walk ... std 2 K around 300 K"
    Process temperature [K]  310              1                 "air temperature plus 10 K", "std 1 K"
    Rotational speed [rpm]   1500             200               nominal spindle speed, agreed spread
    Torque [Nm]              40               10                "normally distributed around 40 Nm, sigma 10 Nm"
    Tool wear [min]          125              75                tools run 0-250 min: centre, ~uniform spread

(The pooled data, which no party sees, has means 300.0 / 310.0 / 1539 / 40.0 / 108 and stds 2.0 / 1.5 /
179 / 10.0 / 64: the reference values put every feature on a unit scale without anyone pooling data.)

``--features physics`` (the default) adds three per-record quantities every manufacturer computes from
its own rows alike, from the physics of the failure modes in the description: temperature difference
(process - air, K; reference 10 +- 1), mechanical power (torque x speed x 2 pi / 60, W; 6000 +- 1500) and
strain (tool wear x torque, min Nm; 5000 +- 3000). They are functions of the kept measurements only (no
label information), but they are domain knowledge the data set's generator also used, and they are what
makes the failure class learnable under DP noise: ``--features raw`` gives the six original features only.

Metrics: each round the participants evaluate the announced global model on their validation splits; the
curator learns only the secure sum of the confusion matrices and records accuracy, per-class precision,
recall and F1 (``confusion``, ``precision``, ``recall``, ``f1`` in its history). The figures reported are
those of the last round (the model after all but the last aggregation), failure class = class 1, and
their means over the last 10 rounds (``last_10_rounds_mean``: with 72 failures in the 2,000 validation
records and DP noise in every update, one round's figures move by several points). The
class is rare (3.4 %): a model that never predicts a failure has 96.6 % accuracy and recall 0, so recall,
precision and F1 of the failure class are the figures that matter.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _federation import data_dir, privacy_settings, require_files, round_seconds, run_federation, say

CSV_NAME = "ai4i2020.csv"
LABEL = "Machine failure"
IDENTIFIERS = ("UDI", "Product ID")
FAILURE_MODES = ("TWF", "HDF", "PWF", "OSF", "RNF")
MANUFACTURERS = 4

# (name, reference mean, reference scale); see the module docstring for where each value comes from.
NUMERIC_REFERENCE = (
    ("Air temperature [K]", 300.0, 2.0),
    ("Process temperature [K]", 310.0, 1.0),
    ("Rotational speed [rpm]", 1500.0, 200.0),
    ("Torque [Nm]", 40.0, 10.0),
    ("Tool wear [min]", 125.0, 75.0),
)
PHYSICS_REFERENCE = (
    ("Temperature difference [K]", 10.0, 1.0),
    ("Power [W]", 6000.0, 1500.0),
    ("Strain [min Nm]", 5000.0, 3000.0),
)
TYPES = ("L", "M", "H")

# Tuned; see bench/README.md for the runs behind them. "local" is local DP-SGD at each manufacturer (the old
# "--dp on"), "off" the non-private reference, "distributed" distributed DP-SGD under secure aggregation, and
# "central" central DP-SGD over the union of the four manufacturers' data (the yardstick, not deployable).
PRESETS: dict[str, dict[str, Any]] = {
    "local": {
        "rounds": 100,
        "local_epochs": 1.0,
        "batch_size": 250,
        "lr": 0.5,
        "momentum": 0.9,
        "clip": 2.0,
        "max_grad_norm": 1.0,
        "hidden": "128",
        "features": "physics",
    },
    "off": {
        "rounds": 100,
        "local_epochs": 1.0,
        "batch_size": 32,
        "lr": 0.05,
        "momentum": 0.9,
        "clip": 1.0,
        "max_grad_norm": 1.0,
        "hidden": "32,32",
        "features": "physics",
    },
    "distributed": {
        "rounds": 800,  # DP-SGD steps of the federation, one per aggregation
        "local_epochs": 1.0,  # unused
        "batch_size": 250,  # each manufacturer's expected batch (q = 0.125)
        "lr": 0.5,  # the curator's SGD step
        "momentum": 0.9,
        "clip": 2.0,  # unused (the update is not quantised)
        "max_grad_norm": 1.0,  # C, per-example clipping norm
        "hidden": "128",
        "features": "physics",
        # Chosen on the validation splits (bench/README.md, "Privacy modes"): failures are 3.6 % of the
        # records, so predicting one from probability 0.1 on trades a little precision for much recall.
        "decision_threshold": 0.1,
        # All four must answer each step (t = n): the noise shares are then sized for exactly the noise of
        # one central mechanism. The default threshold (3 of 4) tolerates a dropout at the price of 4/3 of
        # the noise variance when all survive, which costs F1 0.53 -> 0.39 here (bench/README.md).
        "threshold_fraction": 1.0,
    },
}
PRESETS["central"] = {k: v for k, v in PRESETS["distributed"].items() if k != "threshold_fraction"}


def encoding(features: str) -> Any:
    from tessera.data import CategoricalFeature, FeatureEncoding, NumericFeature

    numeric = NUMERIC_REFERENCE + (PHYSICS_REFERENCE if features == "physics" else ())
    return FeatureEncoding(
        features=(
            CategoricalFeature(name="Type", categories=TYPES),
            *(NumericFeature(name=n, mean=m, std=s) for n, m, s in numeric),
        )
    )


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    missing = [
        c
        for c in (*IDENTIFIERS, "Type", LABEL, *FAILURE_MODES, *(n for n, _, _ in NUMERIC_REFERENCE))
        if c not in header
    ]
    if missing:
        say(f"{path} is not the AI4I 2020 file: columns {missing} are missing")
        raise SystemExit(2)
    return header, rows


def add_physics(row: dict[str, str]) -> dict[str, str]:
    """The three derived quantities, computed from this record alone (identically at every manufacturer)."""
    air, process = float(row["Air temperature [K]"]), float(row["Process temperature [K]"])
    speed, torque, wear = (
        float(row[c]) for c in ("Rotational speed [rpm]", "Torque [Nm]", "Tool wear [min]")
    )
    return {
        **row,
        "Temperature difference [K]": f"{process - air:.4f}",
        "Power [W]": f"{torque * speed * 2 * math.pi / 60:.4f}",
        "Strain [min Nm]": f"{wear * torque:.4f}",
    }


def split_by_product_id(rows: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Sort by the numeric part of Product ID and cut into MANUFACTURERS contiguous ranges."""
    from tessera.data import split_indices

    numbers = np.array([int(r["Product ID"][1:]) for r in rows])
    order = np.argsort(numbers, kind="stable")
    parts = split_indices(np.zeros(len(rows)), MANUFACTURERS, method="contiguous")
    return [[rows[i] for i in order[p]] for p in parts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--privacy",
        choices=["local", "distributed", "central", "off"],
        default=None,
        help="local DP-SGD at each manufacturer (default), distributed DP-SGD under secure aggregation, central "
        "DP-SGD over the union (a yardstick), or none",
    )
    parser.add_argument(
        "--dp", choices=["on", "off"], default=None, help="old spelling: on = local, off = off"
    )
    parser.add_argument(
        "--class-weight", type=float, default=1.0, help="weight of the failure class in the loss"
    )
    parser.add_argument(
        "--noise-multiplier", type=float, help="distributed/central: default planned for --epsilon"
    )
    parser.add_argument(
        "--evaluate-every", type=int, default=10, help="distributed/central: rounds between evaluations"
    )
    parser.add_argument(
        "--lr-decay-steps", type=float, default=1.0, help="distributed/central: per-step lr decay"
    )
    parser.add_argument(
        "--threshold-fraction", type=float, help="distributed: the roster's threshold fraction"
    )
    parser.add_argument("--colluders", type=int, default=0, help="distributed: survivors that may collude")
    parser.add_argument(
        "--decision-threshold",
        type=float,
        help="predict a failure from this probability on (default: argmax)",
    )
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-epochs", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument(
        "--lr-decay", type=float, default=1.0, help="learning rate of round r: lr * lr_decay^(r-1)"
    )
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--clip", type=float, help="secagg.clip: per-coordinate clip of the update")
    parser.add_argument("--max-grad-norm", type=float)
    parser.add_argument("--hidden", help="hidden layer widths, comma-separated (e.g. 32,32)")
    parser.add_argument("--activation", choices=["relu", "tanh"], default="relu")
    parser.add_argument(
        "--features", choices=["raw", "physics"], help="physics: add 3 derived quantities (default)"
    )
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initial model, the splits and training"
    )
    parser.add_argument("--data-dir", type=Path, help="the shared data folder (holds ai4i2020/)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.privacy is None:
        args.privacy = {"on": "local", "off": "off", None: "local"}[args.dp]
    args.dp = "off" if args.privacy == "off" else "on"
    args.num_classes = 2
    for key, value in PRESETS[args.privacy].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    hidden = [int(h) for h in str(args.hidden).split(",") if h]

    (path,) = require_files(data_dir(args.data_dir) / "ai4i2020", [CSV_NAME], "AI4I 2020 data")
    _, rows = read_rows(path)
    shared_encoding = encoding(args.features)
    organisations = [f"manufacturer-{i}" for i in range(1, MANUFACTURERS + 1)]

    from tessera.data import load_dataset, train_validation_split

    with tempfile.TemporaryDirectory(prefix="tessera-ai4i-") as tmp:
        folder = Path(tmp)
        encoding_file = folder / "encoding.json"
        encoding_file.write_text(shared_encoding.model_dump_json(indent=2))
        datasets, data_settings, shares = {}, {}, []
        for i, (organisation, part) in enumerate(zip(organisations, split_by_product_id(rows), strict=True)):
            file = folder / f"{organisation}.csv"  # the manufacturer's own records
            out = [add_physics(r) for r in part] if args.features == "physics" else part
            with file.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(out[0]))
                writer.writeheader()
                writer.writerows(out)
            settings = {
                "path": str(file),
                "label_column": LABEL,
                "drop_columns": [*IDENTIFIERS, *FAILURE_MODES],
                "encoding_file": str(encoding_file),
                "validation_fraction": args.validation_fraction,
                "split_seed": args.seed + i,
            }
            dataset = load_dataset(
                file,
                label_column=LABEL,
                encoding=shared_encoding,
                drop_columns=settings["drop_columns"],
            )
            train, validation = train_validation_split(dataset, args.validation_fraction, args.seed + i)
            datasets[organisation] = (train, validation)
            data_settings[organisation] = settings
            ids = [int(r["Product ID"][1:]) for r in part]
            types = {t: sum(r["Type"] == t for r in part) for t in TYPES}
            shares.append(
                {
                    "organisation": organisation,
                    "product_ids": [min(ids), max(ids)],
                    "records": len(part),
                    "failures": int(dataset.y.sum()),
                    "types": types,
                    "train": len(train),
                    "validation": len(validation),
                    "validation_failures": int(validation.y.sum()),
                }
            )
            say(
                f"{organisation}: IDs {min(ids)}-{max(ids)}, {len(part)} records, {int(dataset.y.sum())} failures, "
                f"types {types}; train {len(train)}, validation {len(validation)} ({int(validation.y.sum())} failures)"
            )
        settings_used = {k: getattr(args, k) for k in PRESETS["local"]}
        settings_used.update(
            activation=args.activation,
            class_weight=args.class_weight,
            decision_threshold=args.decision_threshold,
        )
        model_spec = {
            "name": "mlp",
            "kwargs": {
                "input_dim": len(shared_encoding.output_names()),
                "hidden": hidden,
                "num_classes": 2,
                "activation": args.activation,
            },
        }
        extra: dict[str, Any] = {}
        if args.privacy in ("distributed", "central"):
            q = args.batch_size / min(len(t) for t, _ in datasets.values())
            z = args.noise_multiplier or planned_noise(args, q, model_spec)
            settings_used.update(noise_multiplier=z, sample_rate=q, evaluate_every=args.evaluate_every)
            extra = {"noise_multiplier": z, "sample_rate": q}
        say(f"settings: privacy={args.privacy} {json.dumps(settings_used)}")
        if args.privacy == "central":
            document, wall = run_central(args, datasets, model_spec, extra["noise_multiplier"])
        else:
            document, wall = run_federation(
                **federation_arguments(args, organisations, datasets, data_settings, model_spec, extra)
            )
    history = [r for r in document["history"] if r.get("evaluated_examples")]
    return report(args, document, history, wall, shares, shared_encoding, settings_used)


def planned_noise(args: argparse.Namespace, q: float, model_spec: dict[str, Any]) -> float:
    """The noise multiplier that keeps --rounds steps at q within --epsilon (Skellam accountant for the
    distributed mode, Opacus' Gaussian RDP for the central reference)."""
    if args.privacy == "central":
        from _central import gaussian_noise_multiplier

        return gaussian_noise_multiplier(
            sample_rate=q, steps=args.rounds, epsilon=args.epsilon, delta=args.delta
        )
    from tessera.models import ModelSpec, build_model
    from tessera.skellam import plan_noise_multiplier

    model = build_model(ModelSpec.model_validate(model_spec))
    return plan_noise_multiplier(
        clip=args.max_grad_norm,
        scale=4096 / args.max_grad_norm,
        dimension=sum(p.numel() for p in model.parameters()),
        sample_rate=q,
        steps=args.rounds,
        target_epsilon=args.epsilon,
        delta=args.delta,
    )


def federation_arguments(
    args: argparse.Namespace,
    organisations: list[str],
    datasets: dict[str, Any],
    data_settings: dict[str, Any],
    model_spec: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    roster: dict[str, Any] = {"layout": {"clip": args.clip}}
    server: dict[str, Any] = {}
    if args.privacy == "distributed":
        roster = {
            "layout": {"ring_bits": 64},
            "threshold_fraction": args.threshold_fraction,
            "privacy": {
                "mode": "distributed",
                "noise_multiplier": extra["noise_multiplier"],
                "clip_norm": args.max_grad_norm,
                "colluders": args.colluders,
            },
        }
        server = {
            "lr": args.lr,
            "momentum": args.momentum,
            "lr_decay": args.lr_decay_steps,
            "evaluate_every": args.evaluate_every,
        }
    server["decision_threshold"] = args.decision_threshold
    return {
        "federation": "ai4i",
        "organisations": organisations,
        "datasets": datasets,
        "model": model_spec,
        "num_classes": 2,
        "rounds": args.rounds,
        "secagg": {"phase_timeout": 60},
        "roster": roster,
        "server": server,
        "privacy": privacy_settings(args),
        "data": data_settings,
        "training_seed": args.seed,
        "model_seed": args.seed,
        "label": f"ai4i privacy={args.privacy}",
    }


def run_central(
    args: argparse.Namespace, datasets: dict[str, Any], model_spec: dict[str, Any], noise_multiplier: float
) -> tuple[dict[str, Any], float]:
    """Central DP-SGD over the union of the training splits, evaluated on the same validation splits (the
    confusion matrices summed, as the secure evaluation sums them)."""
    import time

    import torch
    from _central import central_dpsgd, gaussian_epsilon
    from tessera.curator.records import Evaluation
    from tessera.data import ArrayDataset
    from tessera.evaluation import EvalCounts
    from tessera.inference import evaluate
    from tessera.models import ModelSpec, build_model

    union = ArrayDataset(
        np.concatenate([t.x for t, _ in datasets.values()]),
        np.concatenate([t.y for t, _ in datasets.values()]),
    )
    torch.manual_seed(args.seed)
    model = build_model(ModelSpec.model_validate(model_spec))
    q = args.batch_size * len(datasets) / len(union)
    weights = None if args.class_weight == 1.0 else (1.0, args.class_weight)

    def evaluation(m: Any) -> dict[str, Any]:
        total = EvalCounts.zero(2)
        for _, validation in datasets.values():
            total = total + evaluate(m, validation, 2, decision_threshold=args.decision_threshold)
        return Evaluation.of(total).to_json()

    started = time.monotonic()
    records = central_dpsgd(
        model,
        union,
        sample_rate=q,
        steps=args.rounds,
        clip=args.max_grad_norm,
        noise_multiplier=noise_multiplier,
        lr=args.lr,
        momentum=args.momentum,
        lr_decay=args.lr_decay_steps,
        class_weights=weights,
        evaluate=evaluation,
        evaluate_every=args.evaluate_every,
        seed=args.seed,
        progress=say,
    )
    eps = gaussian_epsilon(
        noise_multiplier=noise_multiplier, sample_rate=q, steps=args.rounds, delta=args.delta
    )
    history = [
        {**r, "round": r["step"], "epsilon_mean": eps, "clipped_fraction": 0.0, "seconds": {}}
        for r in records
    ]
    document = {"history": history, "rounds_completed": args.rounds, "stop_reason": "central reference"}
    return document, time.monotonic() - started


def report(
    args: argparse.Namespace,
    document: dict[str, Any],
    history: list[dict[str, Any]],
    wall: float,
    shares: list[dict[str, Any]],
    shared_encoding: Any,
    settings_used: dict[str, Any],
) -> int:
    per_round = [
        {
            "round": r["round"],
            "accuracy": r["accuracy"],
            "failure_recall": r["recall"][1],
            "failure_precision": r["precision"][1],
            "failure_f1": r["f1"][1],
            "confusion": r["confusion"],
            "epsilon_mean": r["epsilon_mean"] if args.privacy != "off" else None,
            "clipped_fraction": r["clipped_fraction"],
            "seconds": round(round_seconds(r), 3),
        }
        for r in history
    ]
    last = per_round[-1]
    figures = {
        "benchmark": "ai4i2020",
        "privacy": args.privacy,
        "target_epsilon": args.epsilon if args.privacy != "off" else None,
        "delta": args.delta if args.privacy != "off" else None,
        "manufacturers": shares,
        "encoding": shared_encoding.model_dump(mode="json"),
        "settings": settings_used,
        "rounds_completed": document["rounds_completed"],
        "stop_reason": document["stop_reason"],
        "evaluated_model": f"the global model announced in round {last['round']}",
        "accuracy": last["accuracy"],
        "failure_recall": last["failure_recall"],
        "failure_precision": last["failure_precision"],
        "failure_f1": last["failure_f1"],
        "confusion": last["confusion"],
        "confusion_note": "rows = true class (0 no failure, 1 failure), columns = predicted; summed securely",
        "last_10_evaluations_mean": {
            key: round(statistics.fmean(r[key] for r in per_round[-10:]), 4)
            for key in ("accuracy", "failure_recall", "failure_precision", "failure_f1")
        },
        "epsilon_spent_mean": last["epsilon_mean"],
        "max_clipped_fraction": max(r["clipped_fraction"] for r in per_round),
        "seconds_per_round_median": round(
            statistics.median(round_seconds(r) for r in document["history"]), 3
        ),
        "wall_s": round(wall, 1),
        "per_round": per_round,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for r in per_round:
            print(
                f"round {r['round']:>3}: accuracy {r['accuracy']:.4f}  failure recall {r['failure_recall']:.3f}  "
                f"precision {r['failure_precision']:.3f}  F1 {r['failure_f1']:.3f}  epsilon {r['epsilon_mean']}"
            )
        print(
            f"last round: accuracy {figures['accuracy']:.4f}, failure recall {figures['failure_recall']:.3f}, "
            f"precision {figures['failure_precision']:.3f}, F1 {figures['failure_f1']:.3f}, "
            f"confusion {figures['confusion']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
