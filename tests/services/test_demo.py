"""`make demo` keeps working: its in-process path runs the whole federation and writes the report."""

from __future__ import annotations

import json
from pathlib import Path

from tessera.apps import demo


def test_demo_in_process_trains_and_reports(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert demo.main(["--in-process", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    # The default is the distributed mode: one DP-SGD step per round.
    assert report["status"] == "finished" and report["rounds_completed"] == demo.STEPS
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = report["history"][-1]
    assert last["participants"] == list(demo.HOSPITALS)
    assert last["accuracy"] > 0.85  # DP at epsilon 3 on 569 patients; about 0.95 in practice
    assert 2.9 < last["epsilon_mean"] <= 3.0 + 1e-9
    shown = capsys.readouterr().out
    assert "--in-process was given" in shown and f"round {demo.STEPS} |" in shown
    assert "Privacy mode: distributed DP-SGD" in shown
    # The trained model is exported where the demo says, and is the curator's final model.
    exported = json.loads((out / "model" / "model.json").read_text())
    assert exported["round"] == demo.STEPS and exported["source"] == "curator"
    assert f"trained model (round {demo.STEPS}): {out / 'model'}/model.safetensors" in shown
