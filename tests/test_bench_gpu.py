"""``scripts/bench_gpu.py``: the GPU training benchmark's harness, checked on CPU with the tiny model.

The FLOP count is checked against the figure measured independently on an H200
(``shared/docs/gpu-measurements.md``: about 16.5 GFLOP per token for the paper recipe with the
pretrained r=320 speech LoRA training, ~525 tokens per example, answer-only lm_head).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_gpu import decoder_flops_per_token, steady_state  # noqa: E402


def test_flops_per_token_matches_the_published_accounting():
    from phi4mm_lora.model.inventory import full_size_config

    cfg = full_size_config().to_dict()
    frozen_only = decoder_flops_per_token(cfg, 0, 0, 0) / 4
    assert frozen_only == pytest.approx(3.22e9, rel=0.005)  # decoder linears of the 3.8B decoder
    total = decoder_flops_per_token(cfg, 461_373_440, 525, 36 / 525)
    assert total == pytest.approx(16.5e9, rel=0.01)


def test_steady_state_recovers_per_step_time_from_cumulative_rates():
    # 3 s first step (compile, warm-up), then 1 s per step of batch 2 with 100 tokens each
    times = [3.0, 4.0, 5.0, 6.0]
    rows = [{"type": "train", "examples_per_s": 2 * (i + 1) / t, "tokens_per_s": 200 * (i + 1) / t,
             "label_tokens": 20} for i, t in enumerate(times)]
    st = steady_state(rows, batch=2, warmup=1)
    assert st["steps"] == 3
    assert st["s_per_step"] == pytest.approx(1.0)
    assert st["examples_per_s"] == pytest.approx(2.0)
    assert st["tokens_per_s"] == pytest.approx(200.0)
    assert st["answer_share"] == pytest.approx(0.1)
    assert st["first_step_s"] == pytest.approx(3.0)


def test_dry_run_measures_the_real_recipe_on_cpu(tmp_path):
    out = tmp_path / "bench"
    # with evaluation during training after the timed steps, as the GPU lease measures issue 11's 10% target
    evaluation = ["--set", "eval.during_training=true", "--set", "eval.every_steps=3", "--set", "eval.subset=1",
                  "--set", "eval.max_new_tokens=2"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--dry-run", "--out", str(out),
                           *evaluation], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    assert [(r["plan"], r["batch"]) for r in report["rows"]] == [("fp32", 2), ("fp32", 1)]
    assert report["rows_planned"] == 2
    for r in report["rows"]:
        assert r["steps"] == 2 and r["s_per_step"] > 0 and r["examples_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["mfu"] is None  # no known peak FLOP/s for a CPU: never a made-up figure
        assert r["trainable_params"] > 0
        assert r["eval_s"] > 0 and r["eval_share_of_epoch"] == pytest.approx(r["eval_s"] * r["examples_per_s"] / 5000)
        # the plan the recipe chose, per row: CPU has no memory limit, so auto is the fastest setting
        assert r["memory_plan"]["gradient_checkpointing"] == "none" and r["memory_plan"]["micro_batch"] == r["batch"]
    assert [r["memory_plan"]["mode_source"] for r in report["rows"]] == ["auto", "config"]
    md = (out / "bench.md").read_text()
    assert "| plan | grad ckpt | batch | steady s/step" in md and md.count("| fp32 |") == 2
    assert "| fp32 | auto -> none | 2 |" in md and "| fp32 | none | 1 |" in md
    assert proc.stdout.count("evaluation during training: ") == 2


def test_without_a_gpu_the_full_run_refuses_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no CUDA GPU") and "Traceback" not in proc.stderr


def test_lease_script_parses_and_runs_exactly_the_steps_it_documents():
    """scripts/gpu_lease.sh only ever runs on a lent GPU, where a typo costs device time: every
    step its header lists has a branch, every branch is listed, and bash parses it."""
    import re

    script = ROOT / "scripts" / "gpu_lease.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    documented = set(re.findall(r"^#     (\w+) ", text, flags=re.M))
    dispatched = set(re.findall(r"^  (\w+)\) ", text, flags=re.M))
    assert documented == dispatched == {"ckpt", "train", "compile", "parts", "eval", "score", "compare", "cache", "attention",
                                        "auto", "evaltrain", "pool", "cudnn", "encoder", "full", "agree",
                                        "scorelen", "scoremany", "convs"}
    # what comes back from the GPU machine is capped (8 files, 16 MiB each): only small files are packed
    assert "-size -2M" in text and "res.tgz" in text


def test_image_check_covers_the_lease_steps() -> None:
    """scripts/image_check.sh runs the lease's commands on the GPU image's libraries on a CPU
    before a lease: it parses, lists what it dispatches, and has a step for every lease step
    but the full-size checkpoint (``cache`` and ``auto`` run inside ``full``: --cache-variants
    at eval.batch_size=auto)."""
    import re

    text = (ROOT / "scripts" / "image_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "image_check.sh")], capture_output=True).returncode == 0
    documented = set(re.findall(r"^#     (\w+) ", text, flags=re.M))
    dispatched = set(re.findall(r"^  (\w+)\) ", text, flags=re.M))
    assert documented == dispatched
    default = set(re.search(r"STEPS=\$\{\*:-([\w ]+)\}", text)[1].split())
    assert default == dispatched
    lease = set(re.findall(r"^  (\w+)\) ", (ROOT / "scripts" / "gpu_lease.sh").read_text(), flags=re.M))
    assert lease - {"ckpt", "cache", "auto"} <= dispatched, lease - dispatched
    assert "--cache-variants" in text and "--batch-size auto" in text
    # the wheels go in exactly as on the GPU machine
    pip = "--no-index --no-deps --no-compile --no-cache-dir --upgrade --target"
    assert pip in text and pip in (ROOT / "scripts" / "gpu_lease.sh").read_text()


def test_the_lease_wheels_are_pinned_inside_the_tested_ranges() -> None:
    """scripts/lease-wheels.txt (what .whl/ holds when image_check.sh downloads it) pins every
    package, and the libraries the project checks (peft, bitsandbytes) inside their tested ranges."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from phi4mm_lora.versions import SUPPORTED

    lines = [ln for ln in (ROOT / "scripts" / "lease-wheels.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    pins = {(r := Requirement(ln)).name.replace("_", "-"): str(r.specifier) for ln in lines}
    assert all(spec.startswith("==") for spec in pins.values()), pins
    for pkg in ("peft", "bitsandbytes"):
        assert pins[pkg][2:] in SpecifierSet(SUPPORTED[pkg]), (pkg, pins[pkg])


def first_row_only(tmp_path, *args: str) -> dict:
    """``bench_gpu.py --dry-run ARGS``, killed once its first row is written: bench.json."""
    import signal

    out = tmp_path / "bench"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--dry-run", "--out", str(out),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:  # the first row's table line is printed after its files are written
            if line.startswith("| fp32 |"):
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return json.loads((out / "bench.json").read_text())


def test_no_cudnn_turns_cudnn_off_in_the_rows_process(tmp_path):
    """--no-cudnn (the lease's diagnostic for a step's fixed cost): the row's own process runs with
    torch.backends.cudnn.enabled False, and the report says so."""
    report = first_row_only(tmp_path, "--no-cudnn")
    assert report["cudnn"] is False and report["rows"][0]["cudnn"] is False
    assert "cuDNN disabled" in (tmp_path / "bench" / "bench.md").read_text()


def test_a_run_cut_short_keeps_the_rows_that_finished(tmp_path):
    """On a lent GPU a step's time limit kills bench_gpu.py mid-row (the fourth lease lost its
    compiled rows' JSON that way): bench.json and bench.md are rewritten after every row."""
    report = first_row_only(tmp_path)
    assert report["rows_planned"] == 2 and [r["batch"] for r in report["rows"]] == [2]
    assert report["cudnn"] is True and report["rows"][0]["cudnn"] is True
    assert (tmp_path / "bench" / "bench.md").read_text().count("| fp32 |") == 1
