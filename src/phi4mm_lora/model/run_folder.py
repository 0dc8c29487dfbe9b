"""A training run folder, opened as one object: its config, adapter, checkpoints and base model.

``phi4mm-lora train`` writes ``RUN/config.yaml``, ``RUN/adapter/`` (the final adapter),
``RUN/checkpoints/step-N/adapter/`` (each with a ``COMPLETE`` marker, see
:mod:`phi4mm_lora.train.checkpoint`), ``RUN/summary.json`` and ``RUN/eval/``. Evaluation,
scoring, export and the service all start from such a folder, so they all open it here:

>>> run = Run.open("runs/paper")                    # or RUN/adapter, RUN/checkpoints/step-N[/adapter],
>>> cfg = run.configure(load_config())              # or a bare PEFT adapter folder
>>> evaluate(cfg)  # == evaluate(load_config(), run="runs/paper")

Why the base model matters: an adapter only means something on the weights it was trained
on. :meth:`Run.configure` therefore takes the base model from the run's ``config.yaml``
(``model.path``/``model.revision``), or, for a bare adapter folder, from
``base_model_name_or_path`` in ``adapter_config.json``; a model given explicitly (``--model``)
wins. A base model that is not on this machine is an error naming it and ``--model``, never a
silent fallback to another model.

The adapter's *structure* (mode, rank, targets, what was unfrozen) is taken from the run's
config too, because loading weights into a differently shaped adapter fails; without a run
config it is inferred from ``adapter_config.json`` as a fresh adapter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phi4mm_lora.config import AdapterConfig, ModelConfig, PromptConfig, RunConfig, load_config
from phi4mm_lora.errors import UserError
from phi4mm_lora.fileio import marker_problem
from phi4mm_lora.model.adapter_io import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, is_adapter_folder  # noqa: F401

#: Written by train/checkpoint.py: RUN/checkpoints/step-<N>/{adapter/, COMPLETE}.
_STEP_DIR = re.compile(r"^step-(\d+)$")
_COMPLETE = "COMPLETE"
#: What a checkpoint with an older marker (no file list) must hold to be evaluated.
_LEGACY_ADAPTER = tuple(f"adapter/{name}" for name in ADAPTER_FILES)
_STRUCTURE_KEYS = ("mode", "base", "name", "r", "alpha", "dropout", "target_modules", "include_towers", "trainable")


@dataclass
class Run:
    """An opened run (or bare adapter) folder; build it with :meth:`Run.open`."""

    adapter_dir: Path
    root: Path | None  #: the run folder holding config.yaml; None for a bare adapter folder
    raw_config: dict[str, Any] = field(default_factory=dict)  #: config.yaml as written (may be older)
    peft_config: dict[str, Any] = field(default_factory=dict)  #: adapter_config.json

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path | Run, checkpoint: int | str | None = None) -> Run:
        """Open ``RUN``, ``RUN/adapter``, ``RUN/checkpoints/step-N[/adapter]`` or an adapter folder.

        ``checkpoint``: ``None`` for the final adapter (or the folder given), ``"latest"`` or a
        step number for one of the run's checkpoints.
        """
        if isinstance(path, Run):
            return path if checkpoint is None else cls.open(path.root or path.adapter_dir, checkpoint)
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"run or adapter folder {p} does not exist; pass a training run folder or an adapter folder")
        if not p.is_dir():
            raise UserError(f"run or adapter folder {p} is a file; pass the folder (a run folder or one holding {ADAPTER_CONFIG})")
        if checkpoint is not None:
            adapter = _checkpoint_adapter(p, checkpoint)
        elif is_adapter_folder(p):
            adapter = p
        elif is_adapter_folder(p / "adapter"):
            adapter = p / "adapter"
        else:
            cks = _checkpoints(p)
            hint = (f"; training did not finish: pass a checkpoint such as {cks[-1] / 'adapter'}"
                    if cks else "")
            raise UserError(f"{p} is not an adapter: no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} in it "
                            f"or in {p / 'adapter'}{hint}")
        from phi4mm_lora.fileio import safetensors_header

        safetensors_header(adapter / ADAPTER_WEIGHTS, "adapter weights")  # a cut-off copy, before any model loads
        root = _run_root(adapter)
        raw: dict[str, Any] = {}
        if root is not None:
            try:
                raw = yaml.safe_load((root / "config.yaml").read_text()) or {}
            except yaml.YAMLError as exc:
                raise UserError(f"{root / 'config.yaml'} is not valid YAML ({exc}); fix or remove it") from None
            if not isinstance(raw, dict):
                raw = {}
        try:
            peft = json.loads((adapter / ADAPTER_CONFIG).read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{adapter / ADAPTER_CONFIG} is not JSON ({exc.msg}); not a usable adapter") from None
        return cls(adapter_dir=adapter, root=root, raw_config=raw, peft_config=peft)

    # ------------------------------------------------------------------ what the folder holds
    @property
    def name(self) -> str:
        return (self.root or self.adapter_dir).name

    @property
    def config(self) -> RunConfig | None:
        """The run's config.yaml as a :class:`RunConfig` (None without one, or if it no longer validates)."""
        if self.root is None:
            return None
        try:
            return load_config(self.root / "config.yaml")
        except UserError:
            return None

    @property
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints of the run, oldest first."""
        return _checkpoints(self.root) if self.root is not None else []

    @property
    def summary(self) -> dict[str, Any] | None:
        """``summary.json`` of the run (training figures), if it finished."""
        return _read_json(self.root / "summary.json") if self.root is not None else None

    def eval_results(self) -> list[Path]:
        """The run's evaluation ``results.json`` files, oldest first (epoch evaluations included)."""
        if self.root is None:
            return []
        found = [p for p in self.root.rglob("results.json") if "checkpoints" not in p.relative_to(self.root).parts]
        return sorted(found, key=lambda p: p.stat().st_mtime)

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.peft_config.get("modules_to_save") or [])

    # ------------------------------------------------------------------ base model
    def base_model(self) -> tuple[ModelConfig | None, str]:
        """The model the adapter was trained on, and where that was read from.

        ``ModelConfig(path=None)`` is the tiny test model; ``None`` means the folder does not say.
        """
        if self.root is not None and isinstance(self.raw_config.get("model"), dict):
            section = self.raw_config["model"]
            m = ModelConfig.model_validate({k: section.get(k) for k in ("path", "tiny", "revision") if k in section})
            return m, f"model.path in {self.root / 'config.yaml'}"
        base = self.peft_config.get("base_model_name_or_path")
        if base:
            return (ModelConfig(path=str(base), revision=self.peft_config.get("revision")),
                    f"base_model_name_or_path in {self.adapter_dir / ADAPTER_CONFIG}")
        return None, "nothing (no config.yaml, no base_model_name_or_path)"

    # ------------------------------------------------------------------ configuring a stage
    def adapter_settings(self) -> dict[str, Any]:
        """The adapter structure to rebuild before loading the weights."""
        section = self.raw_config.get("adapter") if isinstance(self.raw_config.get("adapter"), dict) else None
        if section:
            return {k: section[k] for k in _STRUCTURE_KEYS if k in section}
        return _structure_from_peft(self.peft_config)

    def configure(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` set up to use this run's adapter on this run's base model (and prompts).

        ``cfg.model.path``, when set, is an explicit choice and wins over the run's base model.
        """
        try:
            adapter = AdapterConfig.model_validate({**cfg.adapter.model_dump(), **self.adapter_settings(),
                                                    "init_from": str(self.adapter_dir)})
        except Exception as exc:
            raise UserError(f"adapter {self.adapter_dir}: its settings are not valid ({exc})") from None
        update: dict[str, Any] = {"adapter": adapter}
        base, source = self.base_model()
        if cfg.model.path is None and base is not None and base.path is not None:
            update["model"] = cfg.model.model_copy(update={"path": base.path, "revision": base.revision})
            _check_base_exists(base.path, source, self.name)
        elif cfg.model.path is None and base is not None and base.tiny != cfg.model.tiny:
            update["model"] = cfg.model.model_copy(update={"tiny": base.tiny})  # the tiny base it trained on
        prompts = self.raw_config.get("prompts")
        if isinstance(prompts, dict) and cfg.prompts.apa is None and cfg.prompts.mdd is None:
            try:
                update["prompts"] = PromptConfig.model_validate(prompts)
            except Exception:
                pass
        return cfg.model_copy(update=update)


def open_run(path: str | Path | Run, checkpoint: int | str | None = None) -> Run:
    """:meth:`Run.open` as a function."""
    return Run.open(path, checkpoint)


def _check_base_exists(path: str, source: str, run_name: str) -> None:
    """A local base model that is missing is an error naming it and ``--model`` (hub ids load later)."""
    p = Path(path).expanduser()
    if p.exists():
        return
    hub_like = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is not None and not path.startswith((".", "/", "~"))
    if hub_like:
        return
    raise UserError(f"run {run_name} was trained on base model {path} ({source}), which is not on this machine; "
                    "pass the base model with --model PATH_OR_ID (a local copy or a hub id)")


def _run_root(adapter: Path) -> Path | None:
    """The run folder for an adapter at RUN/adapter, RUN/checkpoints/step-N/adapter or holding config.yaml itself."""
    candidates = [adapter, adapter.parent]
    if len(adapter.parents) >= 3 and adapter.parent.parent.name == "checkpoints":
        candidates.append(adapter.parents[2])
    if adapter.parent.name == "checkpoints":  # RUN/checkpoints/step-N given as the adapter folder
        candidates.append(adapter.parent.parent)
    return next((c for c in candidates if (c / "config.yaml").is_file()), None)


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    # complete = the marker's list of files and sizes matches (fileio.marker_problem), so a
    # half-deleted or damaged checkpoint is never offered for evaluation
    found = [(int(m[1]), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and marker_problem(p, _COMPLETE, _LEGACY_ADAPTER) is None]
    return [p for _, p in sorted(found)]


def _checkpoint_adapter(path: Path, checkpoint: int | str) -> Path:
    run_dir = path.parent if path.name == "adapter" else path
    cks = _checkpoints(run_dir)
    if not cks:
        raise UserError(f"{run_dir} has no complete checkpoints (looked in {run_dir / 'checkpoints'})")
    if checkpoint == "latest":
        chosen = cks[-1]
    else:
        by_step = {int(_STEP_DIR.match(c.name)[1]): c for c in cks}  # type: ignore[index]
        try:
            chosen = by_step[int(checkpoint)]
        except (KeyError, ValueError):
            raise UserError(f"{run_dir} has no checkpoint {checkpoint!r}; it has steps "
                            f"{', '.join(str(s) for s in sorted(by_step))}") from None
    if not is_adapter_folder(chosen / "adapter"):
        raise UserError(f"checkpoint {chosen} holds no adapter/")
    return chosen / "adapter"


def _structure_from_peft(pc: dict[str, Any]) -> dict[str, Any]:
    """A fresh adapter shaped like the saved one (when no run config says otherwise)."""
    out: dict[str, Any] = {"mode": "fresh"}
    if pc.get("r"):
        out["r"] = int(pc["r"])
    if pc.get("lora_alpha"):
        out["alpha"] = float(pc["lora_alpha"])
    tm = pc.get("target_modules")
    if isinstance(tm, str):
        out["target_modules"] = tm
    elif isinstance(tm, list) and tm:
        out["target_modules"] = r".*\.(?:" + "|".join(re.escape(t) for t in sorted(tm)) + r")$"
    saved = " ".join(pc.get("modules_to_save") or [])
    if "audio_embed" in saved:
        out["trainable"] = "unfreeze"
    elif "image_embed" in saved:
        out["trainable"] = "vision"
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


__all__ = ["Run", "is_adapter_folder", "open_run"]
