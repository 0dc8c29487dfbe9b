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


def test_checkpoint_of_b3a40f9_format_resumes(tmp_path):
    """``training_state.pt`` as commit b3a40f9 wrote it (a plain dict, built here key by key
    from that version's writer) loads as a :class:`~phi4mm_lora.train.checkpoint.TrainState`
    and a run resumed from it ends exactly where the uninterrupted run ended."""
    import torch

    from phi4mm_lora.config import load_config
    from phi4mm_lora.train.finetune import train

    manifest = make_manifest(tmp_path / "data", n=4)
    extra = {"train__save_every_steps": 1, "train__save_every_epoch": False, "adapter__trainable": "lora",
             "adapter__mode": "pretrained", "adapter__dropout": 0.1}
    first = tmp_path / "first"
    train(load_config(None, small_overrides(manifest, first, **extra)), progress=False, log=lambda _m: None)
    step1 = first / "checkpoints" / ckpt.checkpoint_name(1)
    new = torch.load(step1 / ckpt.STATE_FILE, weights_only=False)
    old = {  # b3a40f9 finetune.py _write_checkpoint, in its order
        "optimizer": new["optimizer"], "scheduler": new["scheduler"], "scaler": None,
        "epoch": 0, "step_in_epoch": 1, "global_step": 1,
        "world_size": 1, "config": new["config"], "total_steps": 2,
    }
    assert new == old  # today's writer still writes exactly the old keys: older versions can resume it too
    torch.save(old, step1 / ckpt.STATE_FILE)
    sizes = {p.relative_to(step1).as_posix(): p.stat().st_size for p in sorted(step1.rglob("*"))
             if p.is_file() and p.name != ckpt.MARKER}
    (step1 / ckpt.MARKER).write_text(json.dumps({"files": sizes}, indent=0, sort_keys=True) + "\n")

    state = ckpt.load_training_state(step1)
    assert isinstance(state, ckpt.TrainState)
    assert (state.global_step, state.epoch, state.step_in_epoch, state.total_steps) == (1, 0, 1, 2)
    assert state.state_dict().keys() == old.keys()

    resumed = tmp_path / "resumed"
    result = train(load_config(None, small_overrides(manifest, resumed, **extra)), resume=step1, progress=False,
                   log=lambda _m: None)
    assert result.summary["resumed_from"] == str(step1) and result.summary["steps"] == 2
    assert max_diff(read_trained(resumed / "adapter"), read_trained(first / "adapter")) == 0.0


def test_training_state_that_is_not_one_is_refused_in_one_line(tmp_path):
    import torch

    folder = tmp_path / "step-00000001"
    folder.mkdir()
    torch.save({"optimizer": {}, "scheduler": {}}, folder / ckpt.STATE_FILE)
    with pytest.raises(UserError, match=r"not a training state of this project \(it lacks global_step, epoch, "
                                        r"step_in_epoch\)"):
        ckpt.load_training_state(folder)
    torch.save(torch.zeros(3), folder / ckpt.STATE_FILE)
    with pytest.raises(UserError, match="not a training state"):
        ckpt.load_training_state(folder)
