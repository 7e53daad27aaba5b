"""`tessera model export`: a real (in-process) federation's checkpoint, exported and loaded back.

The loading code is the snippet of docs/model.md, run as it is written there: if the documentation drifts
from what the export writes, this fails. Predictions of the loaded model must equal those of the curator's
in-memory model built from the checkpoint's weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tessera.apps import cli
from tessera.apps.export import export_model, load_exported
from tessera.apps.local_federation import run_local_federation
from tessera.curator import checkpoint
from tessera.errors import ConfigurationError
from tessera.models import build_model, load_flat_parameters
from tessera.participant import announced

from .test_local_federation import MODEL, _datasets, _settings

ROOT = Path(__file__).resolve().parents[2]
ORGS = ["org-a", "org-b", "org-c"]
ROUNDS = 3


def doc_snippet() -> str:
    text = (ROOT / "docs" / "model.md").read_text()
    match = re.search(r"<!-- model-snippet:[^>]*-->\n```python\n(.*?)```", text, flags=re.DOTALL)
    assert match, "docs/model.md lost its tested snippet"
    return match[1]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-round federation keeping the weights of its last 2 rounds; returns its directory."""
    tmp = tmp_path_factory.mktemp("federation")
    curator, participants = _settings(tmp, ORGS, rounds=ROUNDS)
    curator = curator.model_copy(update={"rounds": curator.rounds.model_copy(update={"keep_weights": 2})})
    result = run_local_federation(curator, participants, _datasets(ORGS))
    assert result.state.rounds_completed == ROUNDS and not result.errors
    return tmp


def in_memory_predictions(weights: np.ndarray, x: np.ndarray) -> torch.Tensor:
    model = build_model(MODEL)
    load_flat_parameters(model, weights)
    with torch.no_grad():
        return model.eval()(torch.as_tensor(np.array(x)))


def test_the_documented_snippet_loads_the_final_model_and_predicts_like_the_curator(
    federation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = checkpoint.load(federation / "curator")
    assert state is not None
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        cli.main(["model", "export", "--state-dir", str(federation / "curator"), "--out", "exported-model"])
    assert done.value.code == 0
    assert f"model of round {ROUNDS}" in capsys.readouterr().out

    rows = np.array(_datasets(ORGS)["org-a"][1].x)  # a writable copy (the dataset's arrays are frozen)
    namespace: dict[str, object] = {"rows": rows}
    exec(compile(doc_snippet(), "docs/model.md", "exec"), namespace)
    expected = in_memory_predictions(state.weights, np.asarray(rows))
    assert torch.equal(namespace["predicted"], expected.argmax(dim=1))  # type: ignore[arg-type]
    assert torch.allclose(namespace["probabilities"], torch.softmax(expected, dim=1))  # type: ignore[arg-type]

    # model.pt holds the same tensors (loaded without pickle code execution), and the shortcut agrees.
    pt = torch.load(tmp_path / "exported-model" / "model.pt", weights_only=True)
    st = load_file(str(tmp_path / "exported-model" / "model.safetensors"))
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "exported-model")(torch.as_tensor(rows)), expected)
    meta = json.loads((tmp_path / "exported-model" / "model.json").read_text())
    assert meta["round"] == ROUNDS and meta["model"] == MODEL.model_dump()
    assert meta["model_fingerprint"] == state.model_fingerprint and meta["source"] == "curator"


def test_an_earlier_kept_round_is_exported_and_older_ones_are_pruned(
    federation: Path, tmp_path: Path
) -> None:
    assert checkpoint.saved_rounds(federation / "curator") == [2, 3]  # keep_weights=2
    exported = export_model(federation / "curator", tmp_path / "r2", round_number=2)
    assert exported.round == 2
    weights_2, _ = checkpoint.load_round_weights(federation / "curator", 2)
    final = checkpoint.load(federation / "curator")
    assert final is not None and not np.array_equal(weights_2, final.weights)
    x = np.array(_datasets(ORGS)["org-b"][1].x)
    with torch.no_grad():
        assert torch.equal(
            load_exported(tmp_path / "r2")(torch.as_tensor(x)), in_memory_predictions(weights_2, x)
        )
    with pytest.raises(ConfigurationError, match=r"round 1 cannot be exported.*rounds \[2, 3\]"):
        export_model(federation / "curator", tmp_path / "r1", round_number=1)
    with pytest.raises(ConfigurationError, match=r"round 9 cannot be exported.*: 3 rounds completed"):
        export_model(federation / "curator", tmp_path / "r9", round_number=9)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r9").exists()


def test_a_participant_exports_the_last_model_announced_to_it(federation: Path, tmp_path: Path) -> None:
    saved = announced.load(federation / "org-a")
    assert saved.round == ROUNDS  # announced in the last round, before its update
    weights_2, _ = checkpoint.load_round_weights(federation / "curator", ROUNDS - 1)
    assert np.array_equal(saved.weights, weights_2)
    exported = export_model(federation / "org-a", tmp_path / "company")
    assert exported.source == "participant" and exported.round == ROUNDS
    x = np.array(_datasets(ORGS)["org-a"][1].x)
    with torch.no_grad():
        assert torch.equal(
            load_exported(tmp_path / "company")(torch.as_tensor(x)), in_memory_predictions(weights_2, x)
        )
    with pytest.raises(ConfigurationError, match="keeps only the last model announced"):
        export_model(federation / "org-a", tmp_path / "other", source="participant", round_number=1)


def test_onnx_export_predicts_like_torch(federation: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'tessera-fl[onnx]')")
    from onnx.reference import ReferenceEvaluator

    export_model(federation / "curator", tmp_path / "onnx", onnx=True)
    x = np.asarray(_datasets(ORGS)["org-c"][1].x, dtype=np.float32)
    (logits,) = ReferenceEvaluator(str(tmp_path / "onnx" / "model.onnx")).run(None, {"input": x})
    final = checkpoint.load(federation / "curator")
    assert final is not None
    expected = in_memory_predictions(final.weights, x).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(logits.argmax(axis=1), expected.argmax(axis=1))


def test_errors_are_clear_and_write_nothing(
    federation: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as done:
            cli.main(["model", "export", *args])
        return int(done.value.code or 0), capsys.readouterr().err

    out = tmp_path / "out"
    code, err = run("--state-dir", str(tmp_path / "nowhere"), "--out", str(out))
    assert code == 2 and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run("--state-dir", str(empty), "--out", str(out))
    assert code == 2 and "neither a curator checkpoint" in err
    code, err = run("--state-dir", str(empty), "--out", str(out), "--from", "curator")
    assert code == 2 and "no curator checkpoint" in err

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    good = (federation / "curator" / checkpoint.CHECKPOINT).read_bytes()
    (damaged / checkpoint.CHECKPOINT).write_bytes(good[: len(good) // 2])
    code, err = run("--state-dir", str(damaged), "--out", str(out))
    assert code == 2 and "is damaged" in err
    (damaged / checkpoint.CHECKPOINT).unlink()
    (damaged / announced.FILE_NAME).write_bytes(b"not an npz")
    code, err = run("--state-dir", str(damaged), "--out", str(out))
    assert code == 2 and "is damaged" in err

    code, err = run("--state-dir", str(federation / "curator"), "--out", str(out), "--round", "1")
    assert code == 2 and "keep more with rounds.keep_weights" in err
    assert not out.exists()
    assert not list(tmp_path.glob(".*export-*")), "a staging directory was left behind"

    # Existing files are kept unless --force.
    code, _ = run("--state-dir", str(federation / "curator"), "--out", str(out))
    assert code == 0
    before = (out / "model.pt").read_bytes()
    code, err = run("--state-dir", str(federation / "curator"), "--out", str(out), "--round", "2")
    assert code == 2 and "--force" in err and (out / "model.pt").read_bytes() == before
    code, _ = run("--state-dir", str(federation / "curator"), "--out", str(out), "--round", "2", "--force")
    assert code == 0 and json.loads((out / "model.json").read_text())["round"] == 2
