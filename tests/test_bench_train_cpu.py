"""``scripts/bench_train_cpu.py``: its host-sync counter counts what a GPU would wait for; its
cast counter counts copies, their bytes and dtype changes.

The counter (a ``TorchDispatchMode``) is what the issue-10 figures of syncs per step rest on;
here it is checked against operations whose syncing is documented by PyTorch (``.item()``,
``int()``, ``nonzero``, boolean-mask indexing, ``torch.equal``) and against operations that
stay on the device (arithmetic, reductions kept as tensors). Cheap: no model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench_train_cpu import CastCounter, SyncCounter  # noqa: E402


def host_reads() -> None:
    t = torch.arange(6.0)
    int(t.sum())                       # aten._local_scalar_dense
    float(t.max())                     # again
    t[t > 2].sum()                     # boolean mask: the output size depends on the values
    torch.nonzero(t)
    torch.equal(t, t.clone())


def test_counts_each_host_read_once_and_names_the_line():
    with SyncCounter() as c:
        host_reads()
    assert c.counts == {"_local_scalar_dense": 2, "index(bool mask)": 1, "nonzero": 1, "equal": 1}
    assert all(site.startswith("tests/test_bench_train_cpu.py:") for site in c.sites), c.sites


def test_device_side_work_is_not_counted():
    with SyncCounter() as c:
        t = torch.randn(4, 4, requires_grad=True)
        loss = (t @ t).relu().sum() / t.numel()
        loss.backward()
        torch.where(t > 0, t, 0).mean()
    assert sum(c.counts.values()) == 0, c.counts


def test_cast_counter_counts_copies_bytes_and_dtype_changes():
    x = torch.ones(4, 8, dtype=torch.bfloat16)
    with CastCounter() as c:
        y = x.float()                    # aten._to_copy bf16 -> fp32: 128 bytes written
        y.to(torch.bfloat16)             # aten._to_copy fp32 -> bf16: 64 bytes
        torch.empty(4, 8).copy_(y)       # aten.copy_, no dtype change: 128 bytes
        (y * 2).sum()                    # no copy
    assert c.calls == {"aten._to_copy": 2, "aten.copy_": 1, "of which bf16->fp32": 1, "of which fp32->bf16": 1,
                       "all operators": 6}
    assert c.bytes == {"aten._to_copy": 192, "aten.copy_": 128, "of which bf16->fp32": 128, "of which fp32->bf16": 64}


def test_operator_count_splits_a_real_step_into_its_parts(tmp_path, tiny_native):
    """``scripts/bench_ops.py``: the recipe's own step on the tiny model, eager. Every part issues
    operators, backward ones are found on autograd's thread, and a batch of 8 issues more forward
    operators than a batch of 1 (more audio clips to embed) but the same optimizer ones."""
    from bench_ops import build, count_step

    recipe = build([f"model.path={tiny_native}"], tmp_path / "run")
    count_step(recipe, recipe.examples[:1])  # the first step also creates AdamW's state
    one, eight = count_step(recipe, recipe.examples[:1]), count_step(recipe, recipe.examples[:8])
    assert all(one[p] > 0 for p in ("forward", "backward", "optimizer", "other")), one
    assert eight["forward"] > one["forward"] and eight["optimizer"] == one["optimizer"]


def test_fused_adamw_updates_every_tensor_in_fewer_operators(tmp_path, tiny_native):
    """``train.fused_optimizer`` (the default) reaches torch's AdamW, whose step then issues far fewer
    operators than the per-tensor loop: each of them is a launch on a GPU."""
    from bench_ops import build, count_step

    counts = {}
    for fused in (False, True):
        recipe = build([f"model.path={tiny_native}", f"train.fused_optimizer={str(fused).lower()}"], tmp_path / f"{fused}")
        assert bool(recipe.optimizer.optimizer.defaults["fused"]) is fused
        count_step(recipe, recipe.examples[:1])  # creates AdamW's state
        counts[fused] = count_step(recipe, recipe.examples[:1])["optimizer"]
    n = len(recipe.params)
    assert counts[False] > 5 * n > counts[True], (counts, n)


def test_padding_share_counts_the_recipes_own_batches(tmp_path, tiny_native):
    """``scripts/bench_padding.py``: the same examples grouped by length or not hold the same real
    tokens; grouping computes fewer positions; rounding the length gives fewer decoder shapes."""
    from bench_padding import build, padding

    recipe = build([f"model.path={tiny_native}", "data.task=both", "train.batch_size=4", "data.limit=24"], tmp_path / "run")
    grouped, ungrouped = padding(recipe, True, 1), padding(recipe, False, 1)
    assert grouped["real"] == ungrouped["real"] > 0
    assert grouped["computed"] < ungrouped["computed"]
    assert 0 <= grouped["padding_share"] < ungrouped["padding_share"] < 1
    # every batch's shapes are counted; rounding the token length to 64 leaves fewer decoder shapes
    # (each a new cuDNN plan on a GPU) and the audio encoder's as they were
    assert 1 <= grouped["decoder_shapes"] <= grouped["computed"] and grouped["audio_shapes"] >= 1
    assert grouped["decoder_shapes_new_after_epoch_1"] == 0  # one epoch: nothing comes after it
    exact = padding(recipe, True, 2)
    recipe.collator.pad_to_multiple_of = 64
    rounded = padding(recipe, True, 2)
    assert rounded["decoder_shapes"] < exact["decoder_shapes"] and rounded["audio_shapes"] == exact["audio_shapes"]
    assert rounded["real"] == exact["real"] and rounded["computed"] > exact["computed"]
    assert exact["decoder_shapes_new_after_epoch_1"] <= exact["decoder_shapes"]
    # rounding the audio frames to 80 (train.pad_audio_to_multiple_of) leaves fewer encoder shapes
    recipe.collator.pad_to_multiple_of, recipe.collator.audio_frames_multiple = 1, 80
    audio = padding(recipe, True, 2)
    assert audio["audio_shapes"] < exact["audio_shapes"] and audio["decoder_shapes"] == exact["decoder_shapes"]
    assert audio["real"] == exact["real"] and audio["computed"] == exact["computed"]


def test_profile_prints_a_batch_8_and_a_batch_1_step(tiny_native):
    """``--profile`` (the lease's ``parts`` step): a table for each batch size, since the GPU's open
    question is what a batch-1 step still costs (issue 10: at most 1/4 of a batch-8 step)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "bench_train_cpu.py"), "--steps", "2", "--warmup", "1",
                           "--profile", f"model.path={tiny_native}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for batch in (8, 1):
        head = f"torch.profiler, one batch-{batch} step, top operators by self CPU time:"
        assert head in proc.stdout
        assert "aten::" in proc.stdout.split(head, 1)[1]
