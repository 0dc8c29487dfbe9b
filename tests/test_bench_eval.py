"""``scripts/bench_eval.py`` runs end to end on the tiny model (it runs on a lent GPU, where a
broken script costs device time): ``--compare`` measures the four runs on the same examples
and counts operators per decoding step, which merging the adapter must lower (the LoRA
products are folded into the weights), and per prompt's preparation; ``--batch-size auto`` is
chosen as evaluate chooses it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compare_runs_and_counts_operators(tmp_path: Path, tiny_native: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_eval.py"), "--model", str(tiny_native),
                           "--splits", "test", "--limit", "1", "--batch-size", "auto", "--max-new-tokens", "4",
                           "--compare", "--batch1-limit", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {r["run"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"baseline", "batch 1", "merged", "merged, batch 1"}
    assert all(r["failures"] == 0 and r["examples"] >= 1 and r["ms_per_decode_step"] > 0 for r in runs.values())
    assert 0 < runs["merged"]["aten_ops_per_step"] < runs["baseline"]["aten_ops_per_step"]
    assert "extrapolated" in proc.stdout or "would take" in proc.stdout
    assert "--batch-size auto: 8 (no GPU" in proc.stdout  # as evaluate chooses it
    assert all(r["aten_ops_per_prep"] > 0 for r in runs.values())


def test_bench_score_times_one_recording_call_after_call(tmp_path: Path, tiny_native: Path) -> None:
    """``scripts/bench_score.py`` (issue 11's "one 5-second recording in under 3 s", measured on a
    lent GPU): each variant scores the bundled recording with the model loaded, cold then warm,
    and its answers must equal the baseline's."""
    out = tmp_path / "score.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_score.py"), "--model", str(tiny_native),
                           "--repeat", "2", "--variants", "dynamic", "static", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["variant"] for r in runs] == ["dynamic", "static"] and runs[0]["warm_ratio"] == 1.0
    assert all(r["same_answers"] and r["cold_s"] > 0 and len(r["warm_s"]) == 1 for r in runs)
    assert "| static |" in proc.stdout
