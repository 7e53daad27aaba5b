"""The privacy audit's character model, a user model built through an import spec.

The curator announces ``{"name": "import:audit_models:char_gru", "kwargs": {...}}``; each participant builds
it only because ``audit_models:char_gru`` is in its ``allowed_imports`` (the curator trusts its own spec).
``bench/`` must be on ``sys.path``, as it is for ``python bench/audit.py``.
"""

from __future__ import annotations

import torch
from opacus.layers import DPGRU
from torch import nn


class CharGRU(nn.Module):
    """Next-character model over a window of ``context`` characters: embedding -> one-layer GRU -> linear
    on the last hidden state. The GRU is Opacus' :class:`~opacus.layers.DPGRU` (built from linear layers
    that Opacus computes per-example gradients for), so the same model trains with and without DP-SGD.

    Input: float32 ``(B, context)`` character indices (:class:`tessera.data.ArrayDataset` stores features as
    float32; they are cast back here). Output: ``(B, vocabulary)`` logits.
    """

    def __init__(self, vocabulary: int, embedding: int = 16, hidden: int = 64) -> None:
        super().__init__()
        for name, value in (("vocabulary", vocabulary), ("embedding", embedding), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"char_gru: {name} must be a positive integer, got {value!r}")
        self.embedding = nn.Embedding(vocabulary, embedding)
        self.gru = DPGRU(embedding, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocabulary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.embedding(x.long()))
        logits: torch.Tensor = self.out(states[:, -1])
        return logits


def char_gru(vocabulary: int, embedding: int = 16, hidden: int = 64) -> nn.Module:
    """Factory named by the import spec ``import:audit_models:char_gru``."""
    return CharGRU(vocabulary, embedding, hidden)
