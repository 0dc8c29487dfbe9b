"""Crash-safe checkpoints: what trained, plus everything needed to continue bit-for-bit.

A checkpoint folder ``<run>/checkpoints/step-00000012/`` holds

* ``adapter/`` - the trained adapter in PEFT format (+ ``trainable_modules.safetensors``
  for unfrozen modules), written by :func:`~phi4mm_lora.model.adapters.save_trained`, so any
  checkpoint is directly usable for evaluation;
* ``training_state.pt`` - a :class:`TrainState`: optimizer, scheduler, loss-scaler state and
  progress (epoch, steps done within that epoch, global step), saved as the plain dict of
  :meth:`TrainState.state_dict`. Under FSDP the optimizer state is the full, unsharded one keyed
  by parameter name (gathered by :mod:`phi4mm_lora.train.distributed`); under DeepSpeed it is
  ``None`` and the engine's own files are in ``deepspeed/``;
* ``rng-rank<N>.pt`` - python/numpy/torch (and CUDA) RNG state of every process;
* ``COMPLETE`` - written last: JSON listing every other file of the folder with its size.

Everything is written into ``.tmp-step-...``, each file fsynced, ``COMPLETE`` written and
fsynced, then the folder is renamed into place (an atomic rename on POSIX). Pruning is the
same in reverse: the doomed folder is first renamed to ``.del-step-...`` (atomic), then
deleted. A crash at any moment leaves either no folder or a folder whose files match its
marker; :func:`is_complete` checks names and sizes, so a folder that lost files (a crash
while deleting a checkpoint written by an older version, a disk error) is never taken for
complete and resume never picks it.

Checkpoints written before the marker listed its files hold ``ok`` only. They still load:
such a folder counts as complete when the files every checkpoint has are present and not
empty (``training_state.pt``, ``adapter/adapter_model.safetensors``,
``adapter/adapter_config.json``, ``rng-rank0.pt``) - exactly what an interrupted delete
removed in the cases that were seen.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from phi4mm_lora.errors import UserError
from phi4mm_lora.fileio import free_mb, is_disk_full, marker_problem, tree_mb
from phi4mm_lora.model.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS

MARKER = "COMPLETE"
STATE_FILE = "training_state.pt"
ADAPTER_DIR = "adapter"
_STEP_DIR = re.compile(r"^step-(\d+)$")
#: What every checkpoint holds; how a marker without a file list (older versions) is checked.
LEGACY_REQUIRED = (STATE_FILE, f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}", f"{ADAPTER_DIR}/{ADAPTER_CONFIG}", "rng-rank0.pt")
#: Prefixes of folders that are never checkpoints: being written, being replaced, being deleted.
_TRANSIENT = (".tmp-", ".old-", ".del-")


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
    marker.write_text(json.dumps({"files": _file_sizes(tmp)}, indent=0, sort_keys=True) + "\n")
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


def estimate_mb(previous: Path | None, n_trainable: int) -> float:
    """Size of the next checkpoint: the previous one's, or fp32 weights + two AdamW moments."""
    if previous is not None and previous.is_dir():
        return tree_mb(previous)
    return n_trainable * 4 * 3 / 2**20 + 1


def _intact(previous: Path | None) -> str:
    return f"{previous.name} is intact" if previous is not None else "no checkpoint was saved yet"


def ensure_space(final: Path, previous: Path | None, n_trainable: int) -> None:
    """Refuse early, with numbers, when the next checkpoint cannot fit (10% margin)."""
    need, free = estimate_mb(previous, n_trainable) * 1.1, free_mb(final.parent)
    if free < need:
        raise UserError(f"disk full: not enough space for checkpoint {final.name} in {final.parent} (needs about "
                        f"{need:.0f} MB, {free:.0f} MB free); {_intact(previous)}. Free some space, then resume "
                        "with --resume")


@contextmanager
def disk_full_guard(final: Path, previous: Path | None, n_trainable: int):
    """A full disk while writing ``final`` (any of its disguises) becomes one line; the
    half-written temp folder is removed so the space is given back."""
    try:
        yield
    except Exception as exc:  # OSError 28, torch's 'unexpected pos', SafetensorError
        # torch.save reports ENOSPC in several words ("unexpected pos", "iostream error"): an
        # error while the disk has less room than the checkpoint needs is taken for what it is
        if not (is_disk_full(exc) or free_mb(final.parent) < estimate_mb(previous, n_trainable)):
            raise
        shutil.rmtree(temp_dir_for(final), ignore_errors=True)
        raise UserError(f"disk full while writing {final.parent.name}/{final.name} (needs about "
                        f"{estimate_mb(previous, n_trainable):.0f} MB, {free_mb(final.parent):.0f} MB free); "
                        f"{_intact(previous)}. Free some space, then resume with --resume") from None


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from (dropout, shuffling in user code)."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(folder: Path, rank: int) -> None:
    import torch

    torch.save(rng_state(), folder / f"rng-rank{rank}.pt")


def load_rng(folder: Path, rank: int) -> None:
    f = folder / f"rng-rank{rank}.pt"
    if not f.is_file():
        raise UserError(f"checkpoint {folder} has no RNG state for process {rank} "
                        "(resume with the same number of processes it was saved with)")
    import torch

    set_rng_state(torch.load(f, weights_only=False))


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() != MARKER}


def incomplete_reason(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint/adapter folder, or None when it is.

    Complete means: the marker exists and every file it lists is there with the listed size.
    A marker without a list (written by earlier versions) is accepted for a ``step-N`` folder
    when :data:`LEGACY_REQUIRED` files are present and non-empty, for other folders as is.
    """
    legacy = LEGACY_REQUIRED if _STEP_DIR.match(Path(folder).name) else ()
    return marker_problem(Path(folder), MARKER, legacy)


def is_complete(folder: Path) -> bool:
    return incomplete_reason(folder) is None


def damaged_checkpoints(run_dir: Path) -> list[tuple[Path, str]]:
    """``step-N`` folders with a marker that do not match it (skipped by resume, with a note)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if _STEP_DIR.match(p.name) and (p / MARKER).is_file() and (why := incomplete_reason(p)):
            out.append((p, why))
    return out


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
    doomed += [p for p in root.iterdir() if p.name.startswith(_TRANSIENT)] if root.is_dir() else []
    for p in doomed:
        remove_atomically(p)
    return doomed


def remove_atomically(folder: Path) -> None:
    """Rename out of the way first (atomic), then delete: a crash never leaves a half-deleted
    folder under a checkpoint's name."""
    if not folder.name.startswith(_TRANSIENT):
        gone = folder.parent / f".del-{folder.name}"
        if gone.exists():
            shutil.rmtree(gone, ignore_errors=True)
        folder.rename(gone)
        _fsync_file(folder.parent)
        folder = gone
    shutil.rmtree(folder, ignore_errors=True)


def resolve_resume(resume: str | Path | bool, run_dir: Path) -> Path:
    """``True``: latest complete checkpoint of ``run_dir``; a path: that checkpoint or run folder."""
    if resume is True or resume == "":
        target = Path(run_dir)
    else:
        target = Path(str(resume)).expanduser()
    if (target / STATE_FILE).is_file() or (target / MARKER).is_file():
        why = incomplete_reason(target)
        if why:
            raise UserError(f"checkpoint {target} is not complete: {why}; resume from another checkpoint")
        return target
    found = latest_checkpoint(target)
    if found is None:
        raise UserError(f"no complete checkpoint under {target}/checkpoints to resume from; "
                        "start without --resume or point --resume at a checkpoint folder")
    return found


@dataclass
class TrainState:
    """Everything but the weights and the RNG streams that a run needs to continue exactly.

    The one definition of ``training_state.pt``: the trainer fills it, :func:`load_training_state`
    reads it back, ``validate``/``--resume`` checks read its fields. On disk it is the plain dict
    of :meth:`state_dict` (``torch.save``), with the same keys every earlier version wrote, so
    checkpoints of earlier versions load and earlier versions can load these. The trained
    tensors are in ``adapter/`` and the RNG states in ``rng-rank<N>.pt`` (one per process).
    """

    #: Optimizer steps done in the whole run (the ``N`` of ``step-N``).
    global_step: int
    #: The epoch to continue in, and how many of its optimizer steps are done
    #: (an epoch-end checkpoint says ``epoch + 1, 0``).
    epoch: int
    step_in_epoch: int
    #: ``optimizer.state_dict()``; full and keyed by parameter name under FSDP; ``None`` under DeepSpeed.
    optimizer: dict | None
    #: The LR scheduler's ``state_dict()``.
    scheduler: dict
    #: The fp16 loss scaler's ``state_dict()`` (``None`` for other precisions).
    scaler: dict | None = None
    #: Processes that trained (each has its ``rng-rank<N>.pt``).
    world_size: int = 1
    #: The run config as JSON-ready dict (what ``--resume`` compares against); ``None`` if unknown.
    config: dict | None = None
    #: The run's planned steps; ``None`` in checkpoints of versions that did not record it.
    total_steps: int | None = None

    def state_dict(self) -> dict[str, Any]:
        """The dict ``torch.save`` writes (not ``dataclasses.asdict``: that deep-copies the optimizer's tensors)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the values of ``state`` (keys an earlier version did not write keep their defaults)."""
        names = {f.name for f in fields(self)}
        for k, v in state.items():
            if k in names:
                setattr(self, k, v)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainState:
        """A state from a saved dict; raises ``KeyError`` naming what a training state must hold."""
        if not isinstance(state, dict):
            raise TypeError(f"a training state is a dict, not a {type(state).__name__}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in state]
        if missing:
            raise KeyError(", ".join(missing))
        out = cls(**{k: state[k] for k in required})
        out.load_state_dict(state)
        return out

    def save(self, folder: Path) -> Path:
        import torch

        f = Path(folder) / STATE_FILE
        torch.save(self.state_dict(), f)
        return f


def load_training_state(folder: Path) -> TrainState:
    import torch  # here, not at the top: validate and --help import this module and must start fast

    f = Path(folder) / STATE_FILE
    try:
        raw = torch.load(f, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint {folder} has no {STATE_FILE}; resume from another checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise UserError(f"{f} is damaged ({str(exc).splitlines()[0][:120]}); resume from another checkpoint "
                        "(--resume RUN/checkpoints/step-N)") from None
    try:
        return TrainState.from_state_dict(raw)
    except (KeyError, TypeError) as exc:  # not a dict, or a dict without the progress keys
        what = f"it lacks {exc.args[0]}" if isinstance(exc, KeyError) else f"it holds a {type(raw).__name__}"
        raise UserError(f"{f} is not a training state of this project ({what}); resume from another checkpoint "
                        "(--resume RUN/checkpoints/step-N)") from None


__all__ = [
    "ADAPTER_DIR",
    "MARKER",
    "STATE_FILE",
    "TrainState",
    "begin_atomic_dir",
    "checkpoint_name",
    "damaged_checkpoints",
    "disk_full_guard",
    "ensure_space",
    "incomplete_reason",
    "finish_atomic_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_rng",
    "load_training_state",
    "prune_checkpoints",
    "remove_atomically",
    "resolve_resume",
    "rng_state",
    "save_rng",
    "set_rng_state",
    "write_atomic_dir",
]
