"""Crash-safe checkpoints: what trained, plus everything needed to continue bit-for-bit.

A checkpoint folder ``<run>/checkpoints/step-00000012/`` holds

* ``adapter/`` - the trained adapter in PEFT format (+ ``trainable_modules.safetensors``
  for unfrozen modules), written by :func:`~phi4mm_lora.model.adapters.save_trained`, so any
  checkpoint is directly usable for evaluation;
* ``training_state.pt`` - optimizer, scheduler, loss-scaler state and progress (epoch, steps
  done within that epoch, global step). Under FSDP the optimizer state is the full, unsharded
  one keyed by parameter name (gathered by :mod:`phi4mm_lora.train.distributed`); under
  DeepSpeed it is ``None`` and the engine's own files are in ``deepspeed/``;
* ``rng-rank<N>.pt`` - python/numpy/torch (and CUDA) RNG state of every process;
* ``COMPLETE`` - written last.

Everything is written into ``.tmp-step-...``, each file fsynced, ``COMPLETE`` written and
fsynced, then the folder is renamed into place (an atomic rename on POSIX). A crash at any
moment leaves either no folder or a folder with ``COMPLETE``; :func:`latest_checkpoint`
ignores anything else, so resume never picks a half-written checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi4mm_lora.errors import UserError

MARKER = "COMPLETE"
STATE_FILE = "training_state.pt"
ADAPTER_DIR = "adapter"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder below ``root`` (so the rename publishes durable data)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            _fsync_file(Path(dirpath) / f)
        _fsync_file(Path(dirpath))


def temp_dir_for(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}"


def begin_atomic_dir(final: Path) -> Path:
    """Fresh temp folder next to ``final`` (a stale one from a crash is removed first)."""
    tmp = temp_dir_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finish_atomic_dir(tmp: Path, final: Path) -> Path:
    """fsync contents, write the marker last, rename into place."""
    _fsync_tree(tmp)
    marker = tmp / MARKER
    marker.write_text("ok\n")
    _fsync_file(marker)
    _fsync_file(tmp)
    if final.exists():  # re-saving the same step after a resume: replace the old copy
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_file(final.parent)
    return final


def write_atomic_dir(final: Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp_folder)`` and publish the folder atomically with a ``COMPLETE`` marker."""
    tmp = begin_atomic_dir(final)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_atomic_dir(tmp, final)


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from (dropout, shuffling in user code)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(folder: Path, rank: int) -> None:
    torch.save(rng_state(), folder / f"rng-rank{rank}.pt")


def load_rng(folder: Path, rank: int) -> None:
    f = folder / f"rng-rank{rank}.pt"
    if not f.is_file():
        raise UserError(f"checkpoint {folder} has no RNG state for process {rank} "
                        "(resume with the same number of processes it was saved with)")
    set_rng_state(torch.load(f, weights_only=False))


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def prune_checkpoints(run_dir: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (and leftovers of cut-off writes).

    Without this a long run writes one checkpoint per epoch and per ``save_every_steps`` and
    fills the disk; the newest complete one is never deleted, so resume always has a target.
    """
    if keep is None:
        return []
    cks = list_checkpoints(run_dir)
    doomed = cks[: max(0, len(cks) - keep)]
    root = Path(run_dir) / "checkpoints"
    doomed += [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))] if root.is_dir() else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def resolve_resume(resume: str | Path | bool, run_dir: Path) -> Path:
    """``True``: latest complete checkpoint of ``run_dir``; a path: that checkpoint or run folder."""
    if resume is True or resume == "":
        target = Path(run_dir)
    else:
        target = Path(str(resume)).expanduser()
    if (target / STATE_FILE).is_file():
        if not is_complete(target):
            raise UserError(f"checkpoint {target} has no {MARKER} marker: it was cut off while being written")
        return target
    found = latest_checkpoint(target)
    if found is None:
        raise UserError(f"no complete checkpoint under {target}/checkpoints to resume from; "
                        "start without --resume or point --resume at a checkpoint folder")
    return found


def load_training_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_FILE, weights_only=False)


__all__ = [
    "ADAPTER_DIR",
    "MARKER",
    "STATE_FILE",
    "begin_atomic_dir",
    "checkpoint_name",
    "finish_atomic_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_rng",
    "load_training_state",
    "prune_checkpoints",
    "resolve_resume",
    "rng_state",
    "save_rng",
    "set_rng_state",
    "write_atomic_dir",
]
