"""The curator's report plot: secure-averaged accuracy and privacy spent, round by round."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from tessera.storage import atomic_write_bytes


def write_plot(history: list[dict[str, Any]], path: Path) -> None:
    """A PNG of accuracy (and the curator's own validation accuracy, if any) and mean epsilon by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]

    def series(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in history]

    figure, accuracy_axis = plt.subplots(figsize=(7, 4), dpi=110)
    accuracy_axis.plot(rounds, series("accuracy"), "o-", color="tab:blue", label="secure-averaged accuracy")
    validation = [
        (r["round"], r["curator_validation"].get("accuracy")) for r in history if r.get("curator_validation")
    ]
    if validation:
        accuracy_axis.plot(
            [v[0] for v in validation],
            [v[1] for v in validation],
            "s--",
            color="tab:green",
            label="curator validation accuracy (after update)",
        )
    accuracy_axis.set_xlabel("round (accuracy: of the model announced in that round)")
    accuracy_axis.set_ylabel("accuracy")
    accuracy_axis.set_ylim(0, 1.02)
    accuracy_axis.grid(alpha=0.3)
    epsilon_axis = accuracy_axis.twinx()
    epsilon_axis.plot(rounds, series("epsilon_mean"), "^:", color="tab:red", label="mean epsilon spent")
    epsilon_axis.set_ylabel("epsilon (mean over participants)")
    epsilon_axis.set_ylim(bottom=0)
    lines = accuracy_axis.get_legend_handles_labels()
    more = epsilon_axis.get_legend_handles_labels()
    accuracy_axis.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


__all__ = ["write_plot"]
