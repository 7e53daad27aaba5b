"""A model's predictions on a dataset, as counts that add up across organisations (torch-level).

:func:`evaluate` runs a model over an :class:`~tessera.data.ArrayDataset` and returns
:class:`~tessera.evaluation.EvalCounts` (correct, total, summed loss, confusion matrix): a participant
counts on its validation split and submits the counts through secure aggregation; the curator counts on
its own validation set. The counts' arithmetic and the metrics derived from them stay in the numpy-only
:mod:`tessera.evaluation`, which :mod:`tessera.fedavg` uses without loading torch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tessera.data import ArrayDataset
from tessera.errors import ConfigurationError
from tessera.evaluation import EvalCounts


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    num_classes: int,
    *,
    batch_size: int = 1024,
    decision_threshold: float | None = None,
) -> EvalCounts:
    """Evaluate ``model`` on ``data`` (eval mode, no gradients; the training flag is restored).

    Predictions are the most probable class, or, with ``decision_threshold`` (two classes only), class 1
    whenever its softmax probability reaches the threshold: the operating point of a rare-event detector.

    Raises:
        ConfigurationError: a label is ≥ ``num_classes``, the model outputs a different number of classes,
            or a decision threshold is given for more than two classes.
    """
    if decision_threshold is not None and (num_classes != 2 or not 0 < decision_threshold < 1):
        raise ConfigurationError("a decision threshold in (0, 1) applies to two-class tasks only")
    counts = EvalCounts.zero(num_classes)
    if len(data) == 0:
        return counts
    if int(data.y.max()) >= num_classes:
        raise ConfigurationError(f"label {int(data.y.max())} out of range for num_classes={num_classes}")
    was_training = model.training
    model.eval()
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum = 0.0
    try:
        for i in range(0, len(data), batch_size):
            xb = torch.from_numpy(np.array(data.x[i : i + batch_size]))
            yb = torch.from_numpy(np.array(data.y[i : i + batch_size]))
            logits = model(xb)
            if logits.ndim != 2 or logits.shape[1] != num_classes:
                raise ConfigurationError(
                    f"model outputs shape {tuple(logits.shape)}, expected (batch, {num_classes})"
                )
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            if decision_threshold is None:
                pred = logits.argmax(dim=1).numpy()
            else:
                pred = (torch.softmax(logits, dim=1)[:, 1] >= decision_threshold).long().numpy()
            np.add.at(confusion, (yb.numpy(), pred), 1)
    finally:
        model.train(was_training)
    return EvalCounts(int(np.trace(confusion)), int(confusion.sum()), loss_sum, confusion)


__all__ = ["evaluate"]
