"""The first hour, through the real CLI: true warnings, results that land with their run, a
score report a teacher can read, and tracking (hparams, mid-epoch evaluation).

One short training run (tiny model, 2 steps, a fresh adapter that also targets the tied
``lm_head``, evaluation every step) is shared by the tests of this module.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from phi4mm_lora.cli import main
from phi4mm_lora.data.examples import bundled_corpus_path
from phi4mm_lora.evaluate.score import feedback, render, rubric_bands, score_meaning

ROOT = Path(__file__).resolve().parents[1]
FAST = ["eval.max_new_tokens=4", "eval.batch_size=4"]


def cli(*argv: str) -> subprocess.CompletedProcess:
    """``phi4mm-lora ARGV`` in a fresh process: what a user sees, warnings included."""
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "phi4mm_lora", *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def warning_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.search(r"(?i)\bwarning\b|Warning:", ln)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_native: Path) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("first-hour") / "run"
    res = cli("train", "configs/demo.yaml", f"model.path={tiny_native}", f"output_dir={out}", "data.limit=4",
              "train.batch_size=2", "train.max_steps=2", "eval.during_training=true", "eval.every_steps=1",
              "eval.subset=1", *FAST, "--no-progress")
    assert res.returncode == 0, res.stderr
    return out, res


@pytest.fixture(scope="module")
def corpus_flac() -> Path:
    return sorted((bundled_corpus_path() / "WAVE").rglob("*.flac"))[0]


# ------------------------------------------------------------------ 1. every warning true, once


def test_training_warnings_are_true_and_printed_once(run) -> None:
    _, res = run
    warns = warning_lines(res.stdout + res.stderr)
    # demo.yaml trains a fresh adapter: the pretrained one really is discarded; said once
    assert sum("adapter discarded" in w for w in warns) == 1, warns
    # lm_head is a LoRA target and tied to the embeddings: PEFT's ensure_weight_tying notice
    # does not apply to training and is not shown
    assert not any("ensure_weight_tying" in w or "tie_word_embeddings" in w for w in warns), warns
    assert len(warns) == 1, warns


def test_a_warning_is_printed_once_per_command_even_when_filters_change() -> None:
    """``catch_warnings`` (which libraries use) resets Python's once-per-location registry: the
    demo loads the model twice and used to print 'adapter discarded' twice."""
    code = ("import warnings; from phi4mm_lora.cli import _quiet_libraries; _quiet_libraries()\n"
            "def load():\n    warnings.warn('pretrained adapter discarded')\n"
            "load()\nwith warnings.catch_warnings():\n    warnings.simplefilter('ignore', FutureWarning)\n"
            "load(); warnings.warn('another note')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.splitlines() == ["warning: pretrained adapter discarded", "warning: another note"]


def test_evaluating_a_trained_adapter_prints_no_false_warning_and_lands_in_the_run(run, tiny_native) -> None:
    out, _ = run
    res = cli("evaluate", "--model", str(tiny_native), "--adapter", str(out), "--limit", "1", "--task", "apa",
              "--no-progress", *FAST)
    assert res.returncode == 0, res.stderr
    text = res.stdout + res.stderr
    assert "discarded" not in text and "ensure_weight_tying" not in text
    assert warning_lines(text) == ["warning: precision auto: no CUDA GPU (cpu), using fp32"]
    first = sorted((out / "eval").glob("test-*"))
    assert len(first) == 1 and (first[0] / "results.json").is_file() and (first[0] / "report.md").is_file()
    assert str(first[0]) in " ".join(text.split())  # says where, before and after (wrapped by rich)
    # a second evaluation never overwrites the first
    assert main(["evaluate", "--model", str(tiny_native), "--adapter", str(out / "adapter"), "--limit", "1",
                 "--task", "apa", "--no-progress", *FAST]) == 0
    both = sorted((out / "eval").glob("test-*"))
    assert len(both) == 2 and first[0] in both
    # an explicit --output that already holds an evaluation is refused, with the way out
    assert main(["evaluate", "--model", str(tiny_native), "--output", str(first[0]), "--limit", "1"]) == 2


# score --adapter RUN on a trained run: tests/test_readme_commands.py runs the README's score
# commands on the run its train command wrote, and allows the "discarded" warning only in train.


# ------------------------------------------------------------------ 4. score reads like a report


def _rendered(result: dict) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=120)
    for part in render(result):
        console.print(part)
    return buf.getvalue()


def test_score_report_scale_meaning_and_phones_in_the_sentence() -> None:
    apa = '{"accuracy": 8, "fluency": 4, "prosodic": 10, "total": 7}'
    wrong = '{"word_transcript": "we call it beer", "phoneme_transcript": "W IY K AO IH T B IH R S"}'
    text = _rendered(feedback("a.wav", "We call it bear", apa, wrong))
    assert "8/10" in text and "4/10" in text and "10/10" in text and "7/10" in text
    # meanings are the rubric's lines of prompts/apa.txt for those bands
    assert "generally correct; a few sounds are off" in text  # accuracy 7-8
    assert "frequent pauses or hesitations" in text  # fluency 4-5
    assert "natural intonation and rhythm" in text  # prosodic 9-10
    rows = {ln.split()[0]: ln for ln in text.splitlines() if ln.split() and ln.split()[0] in ("we", "call", "it", "bear")}
    assert "ok" in rows["we"] and "ok" in rows["it"]
    assert "-L" in rows["call"] and "L missing" in rows["call"]
    assert "EH->IH" in rows["bear"] and "EH heard as IH" in rows["bear"] and "+S" in rows["bear"]
    right = '{"word_transcript": "we call it bear", "phoneme_transcript": "W IY K AO L IH T B EH R"}'
    text = _rendered(feedback("a.wav", "We call it bear", apa, right))
    assert "no mispronunciations detected" in text and "phone" not in text.split("detected")[1]


def test_rubric_bands_follow_a_users_own_rubric() -> None:
    bands = rubric_bands("Rate it.\nAccuracy (sounds):\n  6-10: good\n  0-5: poor\nTotal: overall impression.\n")
    assert score_meaning(bands, "accuracy", 6) == "good" and score_meaning(bands, "accuracy", 2) == "poor"
    assert score_meaning(bands, "total", 3) == "overall impression."
    assert score_meaning(bands, "fluency", 3) is None


def test_score_json_is_documented_in_the_readme(tiny_native, corpus_flac, capsys) -> None:
    """The README's --json example has exactly the keys the command prints."""
    assert main(["score", "--model", str(tiny_native), "--text", "we call it bear", "--json", str(corpus_flac),
                 *FAST]) == 0
    printed = json.loads(capsys.readouterr().out)
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"phi4mm-lora score [^\n]*--json[^\n]*\n```\n\n```json\n(.*?)\n```", readme, re.S)
    assert block, "README: a ```json example after the score --json command"
    documented = json.loads(block[1])
    assert set(documented[0]) == set(printed[0])
    assert set(documented[0]["scores"]) == set(printed[0]["scores"]) == set(documented[0]["meaning"])
    assert documented[0]["mispronunciations"] and set(documented[0]["mispronunciations"][0]) == {
        "word", "word_index", "position", "kind", "expected", "heard"}


# ------------------------------------------------------------------ 5. tracking


def test_hparams_and_mid_epoch_evaluation(run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, res = run
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2]  # every step, mid-epoch (4 steps make an epoch)
    assert all(r["epoch"] < 1 for r in evals)
    assert (out / "eval" / "step-1" / "results.json").is_file() and (out / "eval" / "step-2" / "report.md").is_file()
    assert "eval at step 1" in res.stdout + res.stderr

    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = {k: v for k, v in start.session_start_info.hparams.items()}
    import yaml

    run_cfg = yaml.safe_load((out / "config.yaml").read_text())  # the hparams are the run's own config
    assert hp["train.lr"].number_value == pytest.approx(run_cfg["train"]["lr"])
    assert hp["adapter.mode"].string_value == "fresh" and hp["train.max_steps"].number_value == 2
    assert hp["model.path"].string_value  # every config key, dotted
    scalars = set(ea.Tags()["scalars"])
    assert {"hparam/final_loss", "hparam/min_loss", "hparam/eval_parse_failures"} <= scalars
    assert {"eval/parse_failures", "train/loss"} <= scalars


def test_per_epoch_evaluation_stays_the_default() -> None:
    from phi4mm_lora.config import load_config

    cfg = load_config(ROOT / "configs" / "pronunciation-paper.yaml")
    assert cfg.eval.every_steps is None and cfg.eval.during_training
    assert main(["validate", "configs/demo.yaml", "eval.every_steps=0"]) == 2
