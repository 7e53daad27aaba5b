"""MNIST across 10 organisations, non-IID, the small CNN, secure aggregation, with or without DP-SGD.

    python bench/mnist.py --dp off [--rounds R] [--json]     # (a) no differential privacy
    python bench/mnist.py --dp on  [--rounds R] [--json]     # (b) DP-SGD, epsilon 3, delta 1e-5 per organisation

The 60,000 training images are split over 10 organisations by a Dirichlet(alpha = 0.5) label distribution
(:func:`tessera.data.split_indices`, seed 0: sizes from 2,206 to 11,814 images, most organisations missing
some digits almost entirely). Each organisation holds out 10 % of its images as its local validation split
(its evaluation of each round's global model is what the secure-averaged ``accuracy`` sums). The curator
holds the 10,000 MNIST test images as its own validation set (``CuratorSettings.validation``) and records the
new global model's ``curator_validation`` accuracy after every round: that is the test accuracy reported.

The real curator and participants run in this process (:func:`tessera.apps.local_federation.run_local_federation`)
over an in-process exchange: secure aggregation of every update, DP-SGD with Opacus and a persistent
accountant per organisation, FedAvg weighted by sample counts; the model is ``cnn28`` (56,810 parameters
with its default hidden width 64; the DP preset narrows the hidden layer to 32: 30,858 parameters, less
noise in every update for the same privacy).

Defaults are the tuned settings (see bench/README.md for the runs behind them); every one can be overridden.
``secagg.clip`` is the per-coordinate clip of the weight update in the ring encoding: ``clipped_fraction``
in the output must stay about 0, or the average is biased.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _federation import data_dir, privacy_settings, require_files, round_seconds, run_federation, say

IMAGES = "train-images-idx3-ubyte.gz"
LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
ORGANISATIONS = 10

# Tuned per mode; see bench/README.md.
PRESETS: dict[str, dict[str, Any]] = {
    "off": {
        "rounds": 20,
        "local_epochs": 1.0,
        "batch_size": 32,
        "lr": 0.05,
        "lr_decay": 1.0,
        "momentum": 0.9,
        "clip": 1.0,
        "max_grad_norm": 1.0,
        "hidden": 64,
        "activation": "relu",
    },
    "on": {
        "rounds": 20,
        "local_epochs": 1.0,
        "batch_size": 512,
        "lr": 2.5,
        "lr_decay": 1.0,
        "momentum": 0.9,
        "clip": 1.0,
        "max_grad_norm": 0.1,
        "hidden": 32,
        "activation": "relu",
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dp", choices=["off", "on"], default="off", help="DP-SGD (epsilon 3) or none")
    parser.add_argument("--rounds", type=int, help="federated rounds (DP: the budget is planned for them)")
    parser.add_argument("--local-epochs", type=float, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, help="(expected, Poisson under DP) batch size")
    parser.add_argument("--lr", type=float, help="local SGD learning rate (of round 1)")
    parser.add_argument("--lr-decay", type=float, help="learning rate of round r: lr * lr_decay^(r-1)")
    parser.add_argument("--momentum", type=float, help="local SGD momentum")
    parser.add_argument("--clip", type=float, help="secagg.clip: per-coordinate clip of the update")
    parser.add_argument("--max-grad-norm", type=float, help="DP-SGD per-example clipping norm")
    parser.add_argument("--hidden", type=int, help="cnn28: width of its hidden linear layer (default 64)")
    parser.add_argument("--activation", choices=["relu", "tanh"], help="cnn28: activation function")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the split")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial model and of training")
    parser.add_argument("--ring-bits", type=int, choices=[32, 64], default=32)
    parser.add_argument("--data-dir", type=Path, help="the shared data folder (holds mnist/)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    preset = PRESETS[args.dp]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    folder = data_dir(args.data_dir) / "mnist"
    train_images, _, test_images, test_labels = require_files(
        folder, [IMAGES, LABELS, TEST_IMAGES, TEST_LABELS], "MNIST"
    )

    from tessera.data import load_dataset, split_indices, train_validation_split

    train = load_dataset(train_images)
    test = load_dataset(test_images, labels_path=test_labels)
    organisations = [f"org-{i:02d}" for i in range(1, ORGANISATIONS + 1)]
    parts = split_indices(train.y, ORGANISATIONS, method="dirichlet", alpha=args.alpha, seed=args.split_seed)
    datasets = {
        o: train_validation_split(train.subset(p), 0.1, seed=args.split_seed + i)
        for i, (o, p) in enumerate(zip(organisations, parts, strict=True))
    }
    say(
        f"MNIST, {ORGANISATIONS} organisations, Dirichlet alpha {args.alpha}: training images "
        + ", ".join(str(len(t)) for t, _ in datasets.values())
        + f"; curator holds the {len(test)} test images"
    )
    settings = {k: getattr(args, k) for k in PRESETS["off"]}
    say(f"settings: dp={args.dp} {json.dumps(settings)}")
    started = time.monotonic()
    document, wall = run_federation(
        federation="mnist",
        organisations=organisations,
        datasets=datasets,
        model={
            "name": "cnn28",
            "kwargs": {"num_classes": 10, "hidden": args.hidden, "activation": args.activation},
        },
        num_classes=10,
        rounds=args.rounds,
        secagg={"phase_timeout": 120},
        roster={"layout": {"clip": args.clip, "ring_bits": args.ring_bits}},
        privacy=privacy_settings(args),
        data={o: {"path": str(train_images)} for o in organisations},
        curator_validation=test,
        validation_settings={"path": str(test_images), "labels_path": str(test_labels)},
        training_seed=args.seed,
        model_seed=args.seed,
        label=f"mnist dp={args.dp}",
    )
    history = document["history"]
    per_round = [
        {
            "round": r["round"],
            "test_accuracy": r["curator_validation"]["accuracy"],
            "secure_averaged_accuracy": r["accuracy"],
            "epsilon_mean": r["epsilon_mean"] if args.dp == "on" else None,
            "clipped_fraction": r["clipped_fraction"],
            "seconds": round(round_seconds(r), 2),
        }
        for r in history
    ]
    figures = {
        "benchmark": "mnist",
        "dp": args.dp,
        "target_epsilon": args.epsilon if args.dp == "on" else None,
        "delta": args.delta if args.dp == "on" else None,
        "organisations": ORGANISATIONS,
        "training_images": [len(t) for t, _ in datasets.values()],
        "settings": settings,
        "rounds_completed": document["rounds_completed"],
        "stop_reason": document["stop_reason"],
        "final_test_accuracy": per_round[-1]["test_accuracy"] if per_round else None,
        "best_test_accuracy": max((r["test_accuracy"] for r in per_round), default=None),
        "epsilon_spent_mean": per_round[-1]["epsilon_mean"] if per_round else None,
        "max_clipped_fraction": max((r["clipped_fraction"] for r in per_round), default=None),
        "seconds_per_round_median": round(statistics.median(r["seconds"] for r in per_round), 2)
        if per_round
        else None,
        "wall_s": round(wall, 1),
        "total_s": round(time.monotonic() - started, 1),
        "per_round": per_round,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for r in per_round:
            print(
                f"round {r['round']:>3}: test accuracy {r['test_accuracy']:.4f}  epsilon {r['epsilon_mean']}  "
                f"clipped {r['clipped_fraction']:.2e}  {r['seconds']:.1f} s"
            )
        print(
            f"final test accuracy {figures['final_test_accuracy']:.4f} (best {figures['best_test_accuracy']:.4f}), "
            f"{figures['seconds_per_round_median']} s per round, {figures['wall_s']} s in all"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
