"""Everything that can be checked before a model loads, in one place.

``phi4mm-lora train`` and ``phi4mm-lora validate`` both call :func:`preflight`, so "config
OK" means training will start: required keys, the output folder (a file? read-only? owned by
a live run?), the model folder (weights present and not truncated), the data (layout, at
least one usable training example) and, for ``--resume``, the checkpoint (complete, its
state readable, its settings compatible with the config). Each check costs milliseconds to
seconds; loading the model costs seconds to minutes, so a mistake is found before that.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi4mm_lora.config import RunConfig
from phi4mm_lora.errors import UserError
from phi4mm_lora.fileio import check_weight_files, check_writable_dir, read_text
from phi4mm_lora.model.adapter_io import check_adapter_folder
from phi4mm_lora.train import checkpoint as ckpt
from phi4mm_lora.train.runlock import owner_of

#: ``owner/name``: a hub dataset id (the data layer loads it with datasets.load_dataset).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: Settings a resume may change freely: they change neither the numbers nor the data order
#: (train.micro_batch and train.pad_to_multiple_of only the draws of dropout masks, and
#: train.pad_audio_to_multiple_of the longest recording's padding; auto may resolve differently on
#: another GPU).
FREE_ON_RESUME = ("output_dir", "model.device", "model.attn_implementation", "model.sdpa_cudnn",
                  "train.log_every_steps", "train.save_every_steps", "train.keep_checkpoints", "train.num_workers",
                  "train.gradient_checkpointing", "train.micro_batch", "train.pad_to_multiple_of",
                  "train.pad_audio_to_multiple_of", "data.strict",
                  "data.feature_cache", "data.eval_split", "eval.")
#: Settings that give the trained tensors other shapes or meaning: a checkpoint cannot continue them.
STRUCTURE = ("model.path", "model.revision", "adapter.mode", "adapter.base", "adapter.name", "adapter.r",
             "adapter.target_modules", "adapter.include_towers", "adapter.trainable", "adapter.keep_unused")


class NothingToDo(UserError):
    """``--resume`` of a run that already finished: said, and nothing is touched (exit 0)."""

    exit_code = 0


@dataclass
class Preflight:
    """What the checks found; ``train`` continues from here without repeating them."""

    run_dir: Path
    resume_from: Path | None = None
    state: ckpt.TrainState | None = None
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    examples: list | None = None
    report: Any = None
    notes: list[str] = field(default_factory=list)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def required_but_null(config_file: str | Path | None, cfg: RunConfig) -> list[str]:
    """Keys the config file marks ``# REQUIRED`` that are still null after the overrides."""
    if config_file is None or not Path(config_file).is_file():
        return []
    flat = _flat(cfg.model_dump(mode="json"))
    section, found = "", []
    for line in read_text(config_file, "config file").splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w]*)\s*:(.*)$", line)
        if not m:
            continue
        indent, key, rest = m.groups()
        if not indent:
            section = key
        dotted = key if not indent else f"{section}.{key}"
        if "REQUIRED" in rest.partition("#")[2] and flat.get(dotted, "x") is None:
            found.append(dotted)
    return found


def check_model_folder(path: str | None) -> None:
    """A local model folder holds config.json and weights, none of them truncated (headers only)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.exists():
        return  # a hub id, or a missing folder: model loading says which
    if not p.is_dir():
        raise UserError(f"model.path {p} is a file; pass the checkpoint folder that holds config.json")
    if not (p / "config.json").is_file():
        raise UserError(f"model.path {p} has no config.json: not a model checkpoint folder")
    check_weight_files(p)


def resume_changes(saved: dict, cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Settings that differ between the checkpoint's config and ``cfg`` (free ones left out).

    Only keys both configs have are compared: a key added to (or dropped from) the schema
    since the checkpoint was saved is not a change the user made.
    """
    old, new = _flat(saved), _flat(cfg.model_dump(mode="json"))
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if old[k] != new[k] and not k.startswith(FREE_ON_RESUME)}


def _changes_text(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} ({a!r} -> {b!r})" for k, b_a in changes.items() for a, b in [b_a])


def check_resume(cfg: RunConfig, resume: str | Path | bool, run_dir: Path, with_changes: bool,
                 pf: Preflight) -> None:
    """The checkpoint is complete, its state loads, and the config continues it (or says what changes)."""
    for folder, why in ckpt.damaged_checkpoints(run_dir):
        pf.notes.append(f"skipping checkpoint {folder}: {why}")
    target = ckpt.resolve_resume(resume, run_dir)
    state = ckpt.load_training_state(target)
    saved = state.config or {}
    changes = resume_changes(saved, cfg)
    structure = {k: v for k, v in changes.items() if k.startswith(STRUCTURE)}
    if structure:
        raise UserError(
            f"cannot resume {target.name} with another adapter/model: {_changes_text(structure)}; its tensors "
            f"have the old shapes. Start a new run (another output_dir), optionally with adapter.init_from={target / ckpt.ADAPTER_DIR}")
    if changes and not with_changes:
        raise UserError(
            f"resuming {target.name} with changed settings: {_changes_text(changes)}; these change the data "
            "order, the model or the schedule, so the result would match neither run. Resume with the checkpoint's "
            "settings (in its run's config.yaml) or add --resume-with-changes to apply them from here on")
    total = state.total_steps
    if total is None and (run_dir / "summary.json").is_file():  # checkpoints of earlier versions
        try:
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            if summary.get("last_checkpoint") and Path(summary["last_checkpoint"]).name == target.name:
                total = summary.get("total_steps")
        except (ValueError, UnicodeDecodeError, OSError):
            total = None
    if not changes and total is not None and state.global_step >= total:
        raise NothingToDo(f"run {run_dir} already finished ({state.global_step} of {total} steps, "
                          f"adapter in {run_dir / 'adapter'}); nothing changed. To train further, raise "
                          "train.epochs or train.max_steps and add --resume-with-changes")
    pf.resume_from, pf.state, pf.changed = target, state, changes


def _paths(cfg: RunConfig, config_file: str | Path | None, run_dir: Path) -> list[str]:
    """Required keys, data path, output folder, model folder, prompt files, init adapter."""
    problems: list[str] = []

    def check(fn, *args) -> None:
        try:
            fn(*args)
        except UserError as exc:
            problems.append(str(exc))

    missing = required_but_null(config_file, cfg)
    if missing:
        problems.append(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} marked REQUIRED in {config_file} "
                        f"but null; pass e.g. {missing[0]}=...")
    if cfg.data.source == "manifest" and not cfg.data.path and "data.path" not in missing:
        problems.append("data.source=manifest needs data.path pointing at a .jsonl manifest")
    elif cfg.data.path and not Path(cfg.data.path).expanduser().exists() and not _HUB_ID.match(cfg.data.path):
        problems.append(f"data.path {cfg.data.path} does not exist")
    check(check_writable_dir, run_dir, "output_dir")
    check(check_model_folder, cfg.model.path)
    from phi4mm_lora.data.prompts import BUILTIN_VARIANTS  # here: data/__init__ imports numpy and soundfile

    for key in ("apa", "mdd"):
        f = getattr(cfg.prompts, key)
        if f and f not in BUILTIN_VARIANTS and not Path(f).expanduser().is_file():
            problems.append(f"prompts.{key} file {f} not found")
    if cfg.adapter.init_from:
        check(check_adapter_folder, cfg.adapter.init_from, "adapter.init_from")
    return problems


def _run_folder(cfg: RunConfig, resume, run_dir: Path, with_changes: bool, main: bool, pf: Preflight) -> list[str]:
    """Nobody else is training in it; checkpoints are resumed or refused; the resume target fits."""
    owner = owner_of(run_dir) if main else None  # other processes: the main one holds it by now
    if owner:
        return [f"run folder {run_dir} is in use by {owner}; wait for it to finish, stop it, or choose another output_dir"]
    if resume in (None, False):
        if ckpt.list_checkpoints(run_dir):
            return [f"{run_dir} already holds checkpoints of an earlier run; continue it with --resume "
                    "or choose another output_dir"]
        return []
    try:
        check_resume(cfg, resume, run_dir, with_changes, pf)
    except NothingToDo:
        raise
    except UserError as exc:
        return [str(exc)]
    return []


def _data(cfg: RunConfig, pf: Preflight) -> list[str]:
    """Build the training examples (reads the data, probes every audio file) and check they fill a step."""
    from phi4mm_lora.data.examples import build_examples

    try:
        pf.examples, pf.report = build_examples(cfg.data, cfg.prompts, cfg.data.train_split, seed=cfg.seed)
    except UserError as exc:
        return [str(exc)]
    if not pf.examples:
        first = f"; first: {pf.report.problems[0]}" if pf.report.problems else ""
        return [f"no training examples in split {cfg.data.train_split!r} of {pf.report.source} "
                f"({pf.report.n_problems} skipped{first}); fix the data or set data.train_split"]
    world, tc = int(os.environ.get("WORLD_SIZE", "1")), cfg.train
    n_batches = math.ceil(len(pf.examples) / tc.batch_size)
    if world > 1 and n_batches // (world * tc.grad_accum) == 0:
        return [f"{len(pf.examples)} examples make {n_batches} batches, fewer than processes x grad_accum "
                f"({world} x {tc.grad_accum}); lower train.batch_size or train.grad_accum"]
    return []


def preflight(cfg: RunConfig, *, config_file: str | Path | None = None, resume: str | Path | bool | None = None,
              resume_with_changes: bool = False, main: bool = True, data: bool = True) -> Preflight:
    """Run every check that needs no model; raise one :class:`UserError` listing the problems.

    Cheapest first; a later group runs only when the earlier ones passed. ``main``: this is the
    process that will own the run folder (checks that no live run does). ``data``: also build
    the training examples (reads the data and probes every audio file).
    """
    run_dir = Path(cfg.output_dir).expanduser()
    pf = Preflight(run_dir)
    problems = _paths(cfg, config_file, run_dir)
    if not problems:
        problems = _run_folder(cfg, resume, run_dir, resume_with_changes, main, pf)
    if not problems and data:
        problems = _data(cfg, pf)
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))
    return pf


__all__ = ["FREE_ON_RESUME", "NothingToDo", "Preflight", "STRUCTURE", "check_adapter_folder", "check_model_folder",
           "preflight", "required_but_null", "resume_changes"]
