"""The reference the distributed mode is measured against: central DP-SGD over the union of the data.

What a trusted curator holding every organisation's records would run: Poisson sampling at rate q over the
union, each sampled record's gradient clipped to C (the same ``per_example_gradients`` the participants use),
Gaussian noise of standard deviation z·C on the sum, divided by the expected batch size q·N, and the same
server optimiser (SGD with momentum) on the same model. Accounting: Opacus' RDP accountant for the sampled
Gaussian mechanism. It needs no secure aggregation because it has no privacy boundary between
organisations: nobody can deploy it across companies; it is only the yardstick.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tessera.data import ArrayDataset
from tessera.models import flatten_parameters, load_flat_parameters
from tessera.participant.distributed import per_example_gradients
from torch import nn

_CHUNK = 256


def central_dpsgd(
    model: nn.Module,
    train: ArrayDataset,
    *,
    sample_rate: float,
    steps: int,
    clip: float,
    noise_multiplier: float,
    lr: float,
    momentum: float,
    lr_decay: float,
    class_weights: tuple[float, ...] | None,
    evaluate: Callable[[nn.Module], dict[str, Any]],
    evaluate_every: int,
    seed: int,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Train ``model`` in place; returns one record per evaluation (``step`` plus what ``evaluate`` gives)."""
    from tessera.curator.optimizer import ServerSgd
    from tessera.curator.settings import ServerSettings

    torch.set_num_threads(1)  # as the participants: two threads on two busy cores are slower than one
    rng = np.random.default_rng(seed)
    noise = torch.Generator().manual_seed(seed)
    optimizer = ServerSgd(ServerSettings(lr=lr, momentum=momentum, lr_decay=lr_decay))
    weights = flatten_parameters(model)
    expected = sample_rate * len(train)
    history: list[dict[str, Any]] = []
    started = time.monotonic()
    for step in range(1, steps + 1):
        if step == 1 or step % evaluate_every == 0 or step == steps:
            load_flat_parameters(model, weights)
            record = {"step": step, **evaluate(model)}
            history.append(record)
            progress(f"central step {step:>4} | {record} | {time.monotonic() - started:.0f} s")
        load_flat_parameters(model, weights)
        chosen = np.flatnonzero(rng.random(len(train)) < sample_rate)
        total = torch.zeros(weights.shape[0], dtype=torch.float64)
        for start in range(0, len(chosen), _CHUNK):
            rows = chosen[start : start + _CHUNK]
            grads = per_example_gradients(
                model,
                torch.from_numpy(np.array(train.x[rows])),
                torch.from_numpy(np.array(train.y[rows])),
                class_weights,
            )
            factor = torch.clamp(clip / (grads.norm(dim=1, keepdim=True) + 1e-12), max=1.0)
            total += (grads * factor).sum(dim=0).double()
        total += torch.normal(
            0.0, noise_multiplier * clip, size=total.shape, generator=noise, dtype=torch.float64
        )
        weights = optimizer.step(weights, (total / expected).numpy(), step_number=step)
    load_flat_parameters(model, weights)
    return history


def gaussian_noise_multiplier(*, sample_rate: float, steps: int, epsilon: float, delta: float) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"
        )
    )


def gaussian_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


__all__ = ["central_dpsgd", "gaussian_epsilon", "gaussian_noise_multiplier"]
