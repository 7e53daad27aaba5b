"""The curator's checkpoint survives being killed at any instant, and a damaged one is never silently reset."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tessera.curator import checkpoint
from tessera.errors import ConfigurationError

WRITER = """
import sys
from pathlib import Path
import numpy as np
from tessera.curator import checkpoint
from tessera.curator.records import Evaluation, RoundRecord
state_dir = Path(sys.argv[1])

def record(r):
    return RoundRecord(
        round=r, attempt=0, participants=("a", "b", "c"), invited=("a", "b", "c"), phases={}, total_weight=3,
        evaluation=Evaluation(accuracy=None, loss=None, evaluated_examples=0), clipped_fraction=0.0,
        epsilon_mean=None, non_private_participants=3,
    )

i = 0
while True:
    i += 1
    state = checkpoint.CuratorState(
        federation="f", model={"name": "mlp"}, model_fingerprint="0" * 64,
        weights=np.full(200_000, i, dtype=np.float32), rounds_completed=i,
        history=[record(r) for r in range(1, i + 1)],
    )
    checkpoint.save(state_dir, state)
    print(i, flush=True)
"""


def test_killed_at_random_points_the_checkpoint_is_always_whole(tmp_path: Path) -> None:
    rng = random.Random(1)
    for trial in range(8):
        state_dir = tmp_path / f"t{trial}"
        process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(state_dir)], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None
        process.stdout.readline()  # at least one checkpoint is complete
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = checkpoint.load(state_dir)
        assert state is not None
        i = state.rounds_completed
        assert i >= 1
        # Model and history come from the same write: never one round's weights with another's history.
        assert np.all(state.weights == i)
        assert [r.round for r in state.history] == list(range(1, i + 1))


def test_a_damaged_checkpoint_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    state = checkpoint.CuratorState(
        federation="f", model={}, model_fingerprint="0" * 64, weights=np.zeros(3, dtype=np.float32)
    )
    checkpoint.save(tmp_path, state)
    assert checkpoint.load(tmp_path) is not None
    path = tmp_path / checkpoint.CHECKPOINT
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ConfigurationError, match=r"is damaged .* move it away"):
        checkpoint.load(tmp_path)


def test_first_start_has_no_state(tmp_path: Path) -> None:
    assert checkpoint.load(tmp_path) is None
