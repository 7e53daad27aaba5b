"""The curator's optimiser for distributed DP-SGD: one step on the global model per aggregation.

The secure sum of a distributed DP-SGD step is the sum of every sampled record's clipped, scaled, rounded
gradient plus Skellam noise (:mod:`tessera.skellam`). Dividing it by the scale γ and by the summed expected
batch size Σ q_i n_i gives a differentially private estimate of the mean clipped gradient; whatever the
curator does with it afterwards is post-processing and costs no privacy. Here: SGD with (heavy-ball)
momentum, as ``torch.optim.SGD`` defines it (buffer = momentum · buffer + gradient; weights -= lr · buffer),
with an optional decay of the learning rate per step. The momentum buffer is saved with the checkpoint.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .settings import ServerSettings


class ServerSgd:
    def __init__(self, settings: ServerSettings, buffer: npt.NDArray[np.float64] | None = None) -> None:
        self.settings = settings
        self.buffer = buffer

    def step(
        self, weights: npt.NDArray[np.float32], gradient: npt.NDArray[np.float64], *, step_number: int
    ) -> npt.NDArray[np.float32]:
        """The weights after one step with ``gradient`` (the ``step_number``-th, 1-based, for the decay)."""
        s = self.settings
        if self.buffer is None or self.buffer.shape != gradient.shape:
            self.buffer = gradient.astype(np.float64).copy()
        else:
            self.buffer = s.momentum * self.buffer + gradient
        lr = s.lr * s.lr_decay ** max(0, step_number - 1)
        return (weights.astype(np.float64) - lr * self.buffer).astype(np.float32)


__all__ = ["ServerSgd"]
