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

# Tuned; see bench/README.md for the runs behind them.
PRESETS: dict[str, dict[str, Any]] = {
    "on": {
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
}


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
    parser.add_argument("--dp", choices=["on", "off"], default="on", help="DP-SGD (epsilon 3) or none")
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
    for key, value in PRESETS[args.dp].items():
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
        settings_used = {k: getattr(args, k) for k in PRESETS["on"]}
        settings_used.update(activation=args.activation)
        say(f"settings: dp={args.dp} {json.dumps(settings_used)}")
        document, wall = run_federation(
            federation="ai4i",
            organisations=organisations,
            datasets=datasets,
            model={
                "name": "mlp",
                "kwargs": {
                    "input_dim": len(shared_encoding.output_names()),
                    "hidden": hidden,
                    "num_classes": 2,
                    "activation": args.activation,
                },
            },
            num_classes=2,
            rounds=args.rounds,
            secagg={"clip": args.clip, "phase_timeout": 60},
            privacy=privacy_settings(args),
            data=data_settings,
            training_seed=args.seed,
            model_seed=args.seed,
            label=f"ai4i dp={args.dp}",
        )
    history = document["history"]
    per_round = [
        {
            "round": r["round"],
            "accuracy": r["accuracy"],
            "failure_recall": r["recall"][1],
            "failure_precision": r["precision"][1],
            "failure_f1": r["f1"][1],
            "confusion": r["confusion"],
            "epsilon_mean": r["epsilon_mean"] if args.dp == "on" else None,
            "clipped_fraction": r["clipped_fraction"],
            "seconds": round(round_seconds(r), 3),
        }
        for r in history
    ]
    last = per_round[-1]
    figures = {
        "benchmark": "ai4i2020",
        "dp": args.dp,
        "target_epsilon": args.epsilon if args.dp == "on" else None,
        "delta": args.delta if args.dp == "on" else None,
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
        "last_10_rounds_mean": {
            key: round(statistics.fmean(r[key] for r in per_round[-10:]), 4)
            for key in ("accuracy", "failure_recall", "failure_precision", "failure_f1")
        },
        "epsilon_spent_mean": last["epsilon_mean"],
        "max_clipped_fraction": max(r["clipped_fraction"] for r in per_round),
        "seconds_per_round_median": round(statistics.median(r["seconds"] for r in per_round), 3),
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
