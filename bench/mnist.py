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
    "local": {
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
    # One DP-SGD step of the federation per round; every organisation samples at the same rate q, so the
    # expected batch over the union is q * 54,000 (--sample-rate); the curator's SGD takes lr and momentum.
    "distributed": {
        "rounds": 1500,
        "local_epochs": 1.0,  # unused
        "batch_size": 0,  # unused: each organisation's batch is q * its size
        "lr": 2.0,
        "lr_decay": 1.0,
        "momentum": 0.9,
        "clip": 1.0,  # unused
        "max_grad_norm": 0.1,
        "hidden": 32,
        "activation": "relu",
    },
}
PRESETS["central"] = dict(PRESETS["distributed"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--privacy",
        choices=["off", "local", "distributed", "central"],
        default=None,
        help="none (default), local DP-SGD, distributed DP-SGD under secure aggregation, or central DP-SGD over "
        "the union (a yardstick, not deployable)",
    )
    parser.add_argument(
        "--dp", choices=["off", "on"], default=None, help="old spelling: on = local, off = off"
    )
    parser.add_argument("--sample-rate", type=float, default=0.02, help="distributed/central: Poisson rate q")
    parser.add_argument(
        "--noise-multiplier", type=float, help="distributed/central: default planned for --epsilon"
    )
    parser.add_argument(
        "--evaluate-every", type=int, default=50, help="distributed/central: rounds between tests"
    )
    parser.add_argument(
        "--threshold-fraction", type=float, help="distributed: the roster's threshold fraction"
    )
    parser.add_argument("--colluders", type=int, default=0, help="distributed: survivors that may collude")
    parser.add_argument("--class-weight", type=float, default=1.0, help="unused for MNIST (balanced classes)")
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
    if args.privacy is None:
        args.privacy = {"on": "local", "off": "off", None: "off"}[args.dp]
    args.dp = "off" if args.privacy == "off" else "on"
    args.num_classes = 10
    preset = PRESETS[args.privacy]
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
    model_spec = {
        "name": "cnn28",
        "kwargs": {"num_classes": 10, "hidden": args.hidden, "activation": args.activation},
    }
    started = time.monotonic()
    if args.privacy in ("distributed", "central"):
        union_size = sum(len(t) for t, _ in datasets.values())
        batches = {o: max(1, round(args.sample_rate * len(t))) for o, (t, _) in datasets.items()}
        q_max = max(batches[o] / len(t) for o, (t, _) in datasets.items())
        z = args.noise_multiplier or planned_noise(args, q_max, model_spec)
        settings.update(
            sample_rate=args.sample_rate,
            noise_multiplier=z,
            evaluate_every=args.evaluate_every,
            expected_batch=round(args.sample_rate * union_size),
        )
        say(f"settings: privacy={args.privacy} {json.dumps(settings)}")
        if args.privacy == "central":
            document, wall = run_central(args, datasets, test, model_spec, z)
        else:
            document, wall = run_federation(
                federation="mnist",
                organisations=organisations,
                datasets=datasets,
                model=model_spec,
                num_classes=10,
                rounds=args.rounds,
                secagg={"phase_timeout": 120},
                roster={
                    "layout": {"ring_bits": 64},
                    "threshold_fraction": args.threshold_fraction,
                    "privacy": {
                        "mode": "distributed",
                        "noise_multiplier": z,
                        "clip_norm": args.max_grad_norm,
                        "colluders": args.colluders,
                    },
                },
                server={
                    "lr": args.lr,
                    "momentum": args.momentum,
                    "lr_decay": args.lr_decay,
                    "evaluate_every": args.evaluate_every,
                },
                privacy={
                    "enabled": True,
                    "target_epsilon": args.epsilon,
                    "delta": args.delta,
                    "planned_rounds": args.rounds,
                },
                privacy_per_org={o: {"batch_size": b} for o, b in batches.items()},
                data={o: {"path": str(train_images)} for o in organisations},
                curator_validation=test,
                validation_settings={"path": str(test_images), "labels_path": str(test_labels)},
                training_seed=args.seed,
                model_seed=args.seed,
                label="mnist privacy=distributed",
            )
    else:
        say(f"settings: privacy={args.privacy} {json.dumps(settings)}")
        document, wall = run_federation(
            federation="mnist",
            organisations=organisations,
            datasets=datasets,
            model=model_spec,
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
            label=f"mnist privacy={args.privacy}",
        )
    history = [r for r in document["history"] if r.get("curator_validation")]
    per_round = [
        {
            "round": r["round"],
            "test_accuracy": r["curator_validation"]["accuracy"],
            "secure_averaged_accuracy": r["accuracy"],
            "epsilon_mean": r["epsilon_mean"] if args.privacy != "off" else None,
            "clipped_fraction": r["clipped_fraction"],
            "seconds": round(round_seconds(r), 2),
        }
        for r in history
    ]
    figures = {
        "benchmark": "mnist",
        "privacy": args.privacy,
        "target_epsilon": args.epsilon if args.privacy != "off" else None,
        "delta": args.delta if args.privacy != "off" else None,
        "organisations": ORGANISATIONS,
        "training_images": [len(t) for t, _ in datasets.values()],
        "settings": settings,
        "rounds_completed": document["rounds_completed"],
        "stop_reason": document["stop_reason"],
        "final_test_accuracy": per_round[-1]["test_accuracy"] if per_round else None,
        "best_test_accuracy": max((r["test_accuracy"] for r in per_round), default=None),
        "epsilon_spent_mean": per_round[-1]["epsilon_mean"] if per_round else None,
        "max_clipped_fraction": max((r["clipped_fraction"] for r in per_round), default=None),
        "seconds_per_round_median": round(statistics.median(round_seconds(r) for r in document["history"]), 2)
        if document["history"]
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


def planned_noise(args: argparse.Namespace, q: float, model_spec: dict[str, Any]) -> float:
    """The noise multiplier keeping --rounds steps at rate q within --epsilon (Skellam accountant for the
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


def run_central(
    args: argparse.Namespace, datasets: dict[str, Any], test: Any, model_spec: dict[str, Any], z: float
) -> tuple[dict[str, Any], float]:
    """Central DP-SGD over the union of the training splits, tested on the 10,000 test images."""
    import numpy as np
    import torch
    from _central import central_dpsgd, gaussian_epsilon
    from tessera.curator.records import Evaluation
    from tessera.data import ArrayDataset
    from tessera.inference import evaluate
    from tessera.models import ModelSpec, build_model

    union = ArrayDataset(
        np.concatenate([t.x for t, _ in datasets.values()]),
        np.concatenate([t.y for t, _ in datasets.values()]),
    )
    torch.manual_seed(args.seed)
    model = build_model(ModelSpec.model_validate(model_spec))
    started = time.monotonic()
    records = central_dpsgd(
        model,
        union,
        sample_rate=args.sample_rate,
        steps=args.rounds,
        clip=args.max_grad_norm,
        noise_multiplier=z,
        lr=args.lr,
        momentum=args.momentum,
        lr_decay=args.lr_decay,
        class_weights=None,
        evaluate=lambda m: {"test_accuracy": Evaluation.of(evaluate(m, test, 10)).accuracy},
        evaluate_every=args.evaluate_every,
        seed=args.seed,
        progress=say,
    )
    eps = gaussian_epsilon(
        noise_multiplier=z, sample_rate=args.sample_rate, steps=args.rounds, delta=args.delta
    )
    history = [
        {
            "round": r["step"],
            "curator_validation": {"accuracy": r["test_accuracy"]},
            "accuracy": None,
            "epsilon_mean": eps,
            "clipped_fraction": 0.0,
            "seconds": {},
        }
        for r in records
    ]
    return {
        "history": history,
        "rounds_completed": args.rounds,
        "stop_reason": "central reference",
    }, time.monotonic() - started


if __name__ == "__main__":
    sys.exit(main())
