"""FSDP2 through ``accelerate launch --config_file configs/accelerate/fsdp.yaml``, on 2 CPU processes.

accelerate enables FSDP only on GPU-like devices: on CPU its ``AcceleratorState`` keeps
``MULTI_CPU`` (plain DDP) even when the config says FSDP. Everything below that switch - the
FSDP plugin built from the config, ``fully_shard`` of the wrapped layers, DTensor parameters,
gloo collectives, clipping, our gather/scatter of adapters and optimizer state - works on CPU.
So this file doubles as the launched script: run as ``__main__`` it flips only that switch and
then calls the real CLI (``phi4mm-lora train``). FSDP1 cannot be tested this way: accelerate
passes ``device_id=cpu`` and torch's FSDP1 rejects it ("Inconsistent compute device and
`device_id` on rank 0: cpu vs cpu:0").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _enable_fsdp_on_cpu() -> None:
    """Make accelerate honour the FSDP plugin on CPU (it silently falls back to DDP there)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


if __name__ == "__main__":  # the script accelerate launches in every process
    _enable_fsdp_on_cpu()
    from phi4mm_lora.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))


from test_train_common import make_manifest, max_diff, read_trained, small_overrides  # noqa: E402

from phi4mm_lora.train import checkpoint as ckpt  # noqa: E402


def _cpu_config(tmp_path: Path) -> Path:
    """The shipped fsdp.yaml, with the two settings a GPU-less machine needs."""
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
    cfg.update(use_cpu=True, num_processes=2, main_process_ip="127.0.0.1", main_process_port=0)
    out = tmp_path / "fsdp-cpu.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _launch(acc_cfg: Path, run_cfg: Path, overrides: list[str], *more: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_cfg), __file__,
         "train", str(run_cfg), *overrides, "--no-progress", *more],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _optimizer(folder: Path) -> dict:
    return torch.load(folder / ckpt.STATE_FILE, weights_only=False)["optimizer"]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def test_fsdp_two_processes_equal_one_and_resume(tmp_path, tiny_native):
    manifest = make_manifest(tmp_path / "data", n=12)
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text("{}\n")
    acc_cfg = _cpu_config(tmp_path)  # tiny_native: built once here, not raced by both processes
    # LoRA + the unfrozen audio encoder (the extra-modules file goes through the same gather);
    # 2 epochs x 3 steps, checkpoints at steps 2, 4, 6.
    extra = {"adapter__trainable": "unfreeze", "train__epochs": 2, "train__save_every_steps": 2,
             "train__lr": 3e-3}
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"

    log = _launch(acc_cfg, run_cfg, small_overrides(manifest, fsdp, train__grad_accum=1, **extra))
    # (a) it really ran FSDP2 in 2 processes
    assert "2 process(es) (FSDP2)" in log, log[-3000:]
    assert "falls back" not in log and "not sharded" not in log

    # (b) = one process with the same examples per optimizer step. Measured: 4.3e-7 on weights
    # of size up to ~1 (a few float32 ulps: the reduce-scatter sums in another order). The
    # reference runs with 1 thread like each FSDP process: with 2 threads the matmuls round
    # differently and Adam's first steps amplify that on the near-zero encoder gradients (2e-5).
    # FSDP runs AdamW per tensor (never fused), so the reference does too: fused rounds differently.
    proc = subprocess.run([sys.executable, "-m", "phi4mm_lora", "train", str(run_cfg),
                           *small_overrides(manifest, one, train__grad_accum=2, train__fused_optimizer="false", **extra),
                           "--no-progress"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_trained(one / "adapter"), read_trained(fsdp / "adapter")
    assert max_diff(a, b) <= 1e-6
    assert max(abs(x - y) for x, y in zip(_losses(one), _losses(fsdp), strict=True)) <= 1e-5

    # (c) the FSDP checkpoint holds full tensors: adapter as in the 1-process checkpoint, and a
    # full optimizer state (keyed by parameter name) equal to the 1-process one (measured 4e-9).
    step4 = ckpt.checkpoint_name(4)
    c1, c2 = one / "checkpoints" / step4, fsdp / "checkpoints" / step4
    assert max_diff(read_trained(c1 / ckpt.ADAPTER_DIR), read_trained(c2 / ckpt.ADAPTER_DIR)) <= 1e-6
    o1, o2 = _optimizer(c1), _optimizer(c2)
    names = o2["param_groups"][0]["params"]
    assert len(names) == len(o1["state"]) and all(isinstance(n, str) for n in names)
    for i, name in enumerate(names):
        for moment in ("exp_avg", "exp_avg_sq"):
            ref, got = o1["state"][i][moment], o2["state"][name][moment]
            assert type(got) is torch.Tensor and got.shape == ref.shape, name
            assert float((ref - got).abs().max()) <= 1e-6, name
        assert float(o2["state"][name]["step"]) == 4

    # ... and resuming from it under FSDP ends where the uninterrupted FSDP run ended
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed, ignore=shutil.ignore_patterns("tensorboard"))
    shutil.rmtree(resumed / "checkpoints" / ckpt.checkpoint_name(6))
    shutil.rmtree(resumed / "adapter")
    log = _launch(acc_cfg, run_cfg, small_overrides(manifest, resumed, train__grad_accum=1, **extra), "--resume")
    assert f"resumed from {resumed / 'checkpoints' / step4}" in log
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 6
    assert max_diff(read_trained(resumed / "adapter"), b) <= 1e-6
    assert max(abs(x - y) for x, y in zip(_losses(resumed), _losses(fsdp), strict=True)) <= 1e-6
