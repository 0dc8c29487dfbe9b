"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_common import make_manifest, max_diff, read_trained, small_overrides

from phi4mm_lora.cli import main
from phi4mm_lora.errors import UserError
from phi4mm_lora.train import checkpoint as ckpt


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    manifest = make_manifest(tmp_path / "data", n=12)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("# everything comes from the overrides\n{}\n")
    # dropout > 0 and length grouping: resume must restore the RNG and the data order
    extra = {"train__save_every_steps": 2, "train__epochs": 2, "adapter__dropout": 0.1,
             "adapter__trainable": "lora", "adapter__mode": "pretrained", "train__lr": 3e-3}
    killed, clean = tmp_path / "killed", tmp_path / "clean"

    proc = subprocess.Popen([sys.executable, "-m", "phi4mm_lora", "train", str(cfg),
                             *small_overrides(manifest, killed, **extra), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    target = killed / "checkpoints" / ckpt.checkpoint_name(4) / ckpt.MARKER
    deadline = time.time() + 240
    while not target.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint at step 4"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL

    # A crash while writing the next checkpoint leaves only a temp folder or an unmarked one.
    stale = killed / "checkpoints" / ".tmp-step-00000010"
    stale.mkdir(exist_ok=True)
    unmarked = killed / "checkpoints" / "step-00000012"
    unmarked.mkdir(exist_ok=True)
    (unmarked / ckpt.STATE_FILE).write_bytes(b"half")
    latest = ckpt.latest_checkpoint(killed)
    assert latest is not None and latest.name != "step-00000012"
    with pytest.raises(UserError, match="COMPLETE"):
        ckpt.resolve_resume(unmarked, killed)

    assert main(["train", str(cfg), *small_overrides(manifest, killed, **extra), "--resume", "--no-progress"]) == 0
    assert main(["train", str(cfg), *small_overrides(manifest, clean, **extra), "--no-progress"]) == 0

    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] == str(latest) and summary["steps"] == 12
    # Exact, not close: both runs execute the same kernels on the same shapes with the same
    # thread count (the killed process and this one both use torch's default), the resumed run
    # restores the optimizer moments, scheduler, RNG streams and data position bit for bit, so
    # every step repeats the same floating-point operations in the same order.
    assert max_diff(read_trained(killed / "adapter"), read_trained(clean / "adapter")) == 0.0
    a, b = _losses(killed), _losses(clean)
    assert len(a) == len(b) == 12
    assert a == b


def test_atomic_dir_never_looks_complete_on_failure(tmp_path):
    final = tmp_path / "checkpoints" / "step-00000001"

    def boom(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.write_atomic_dir(final, boom)
    assert not final.exists() and ckpt.latest_checkpoint(tmp_path) is None
    ckpt.write_atomic_dir(final, lambda f: (f / "x").write_text("1"))
    assert (final / ckpt.MARKER).is_file() and ckpt.latest_checkpoint(tmp_path) == final
