"""The demo's evaluation path shows learning: no answer parses before training, they do after.

Runs :func:`phi4mm_lora.demo.run_demo` - the code behind ``phi4mm-lora demo`` - with the demo
config's own base (the pretrained tiny base) and training schedule (32 utterances, 320 steps)
and 2 held-out utterances, and checks the jump in parse rate on the trained-on utterances
(0 -> all, both tasks) and on the held-out speakers (0 -> at least half, both tasks), that the
trained run is evaluated through its run folder (its own adapter), and that both groups are
reported before and after. With 8 held-out utterances the shipped seed parses all 32 answers
(docs/benchmarks.md, "tiny base"). Several minutes on 2 CPU cores.
"""

from __future__ import annotations

import json

import pytest

from phi4mm_lora.cli.train_cmds import DEMO_YAML
from phi4mm_lora.config import load_config
from phi4mm_lora.demo import learning_rows, run_demo


@pytest.mark.slow
def test_demo_parse_rate_jumps(tmp_path):
    cfg_file = tmp_path / "demo.yaml"
    cfg_file.write_text(DEMO_YAML)
    out = tmp_path / "run"
    cfg = load_config(cfg_file, [f"output_dir={out}"])
    res = run_demo(cfg, out, n_held_out=2, progress=False, log=lambda *_: None)
    rows = {r["key"]: r for r in learning_rows(res.before, res.after)}
    for task in ("apa", "mdd"):
        assert rows[f"parse:{task}"]["trained"]["before"] == 0.0, rows[f"parse:{task}"]
        assert rows[f"parse:{task}"]["held_out"]["before"] == 0.0, rows[f"parse:{task}"]
    for task in ("apa", "mdd"):
        assert rows[f"parse:{task}"]["trained"]["after"] >= 0.9, rows[f"parse:{task}"]
    for task in ("apa", "mdd"):  # the format carries over to speakers never trained on
        assert rows[f"parse:{task}"]["held_out"]["after"] >= 0.5, rows[f"parse:{task}"]
    assert rows["per"]["trained"]["after"] < rows["per"]["trained"]["before"]  # learnt, not only formatted
    # the trained run is evaluated as a run folder (Run.open(...).configure), i.e. its own adapter
    for group in ("trained", "held_out"):
        assert res.after[group]["meta"]["adapter"] == str(res.adapter_dir), res.after[group]["meta"]
        assert res.before[group]["meta"]["adapter"] is None  # before: the untrained model, no adapter
    # both groups, before and after, each a full evaluation folder; the summary names them
    for folder in ("eval-train-before", "eval-train-after", "eval-before", "eval-after"):
        assert (out / folder / "results.json").is_file()
    summary = json.loads((out / "demo.json").read_text())
    assert summary["limits"] == {"trained": 2, "held_out": 2}  # trained-on: the first 2 of the 4 trained
    assert "held-out speakers" in (out / "demo.md").read_text()
