"""The one run config that flows from the CLI to every stage.

A run is described by a YAML file plus ``key=value`` overrides (dotted keys, YAML values),
validated into :class:`RunConfig`. Unknown keys are rejected and every problem is reported
at once, so a user fixes a config in one pass instead of one error per run. No stage reads
globals or environment variables for its settings: it gets its section of this object.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from phi4mm_lora.errors import UserError

#: The decoder linears the official speech/vision adapters target.
DECODER_LORA_REGEX = r"model\.layers\.\d+\.((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj))"

Precision = Literal["auto", "bf16", "fp16", "fp32", "int8", "nf4", "selective"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32", "int8", "nf4", "selective")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Where the weights come from and how they are placed."""

    path: str | None = Field(
        None,
        description="Hub id or local directory (native or official layout). "
        "Empty: the tiny test model, built on first use.",
    )
    revision: str | None = Field(
        None, description="Hub revision; empty picks the one holding the native layout (refs/pr/70)."
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


class AdapterConfig(_Section):
    """Which LoRA trains, and what else is unfrozen."""

    mode: Literal["pretrained", "fresh", "stacked"] = Field(
        "pretrained",
        description="pretrained: keep training the checkpoint's adapter; fresh: replace it with a "
        "new one (its ability is lost); stacked: add a new adapter on top of the frozen one.",
    )
    base: Literal["speech", "vision"] = "speech"
    name: str = Field("task", description="Name of the new adapter in stacked mode.")
    r: int = 64
    alpha: float = 128
    dropout: float = 0.05
    target_modules: str = Field(
        DECODER_LORA_REGEX,
        description="Regex over module names, or 'all-linear' (decoder linears).",
    )
    include_towers: bool = Field(False, description="With all-linear: also the audio/vision towers.")
    trainable: Literal["lora", "unfreeze", "vision"] = Field(
        "lora",
        description="lora: adapters only; unfreeze: + audio encoder and audio projector; "
        "vision: + vision tower and projector.",
    )
    init_from: str | None = Field(None, description="Adapter folder to start from (a previous run).")
    keep_unused: bool = Field(
        False,
        description="Also load the checkpoint's other pretrained adapter (frozen, inactive), e.g. to switch "
        "between speech and vision later. Off: it is not loaded, saving ~0.7-1.5 GB on the full model.",
    )

    @field_validator("r")
    @classmethod
    def _r_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("LoRA rank r must be a positive integer (e.g. 16, 64)")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("LoRA alpha must be > 0 (commonly 2 x r)")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("LoRA dropout must be in [0, 1)")
        return v

    @field_validator("target_modules")
    @classmethod
    def _regex_compiles(cls, v: str) -> str:
        if v != "all-linear":
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"target_modules is not a valid regex ({exc})") from None
        return v

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) or v in ("speech", "vision"):
            raise ValueError("adapter name must be an identifier other than 'speech'/'vision'")
        return v


class DataConfig(_Section):
    """What to train and evaluate on."""

    source: Literal["speechocean", "manifest"] = "speechocean"
    path: str | None = Field(
        None,
        description="Speechocean762 release dir, a datasets save_to_disk/parquet folder, or a "
        "JSONL manifest. Empty: the bundled generated corpus.",
    )
    task: Literal["apa", "mdd", "both"] = "both"
    train_split: str = "train"
    eval_split: str = "test"
    validation_fraction: float = Field(0.0, description="Share of train speakers held out.")
    max_audio_seconds: float = 30.0
    limit: int | None = Field(None, description="Use at most this many utterances per split.")
    strict: bool = Field(False, description="Any bad record is fatal instead of skipped+reported.")
    feature_cache: str | None = Field(None, description="Folder for cached audio features.")

    @field_validator("validation_fraction")
    @classmethod
    def _frac(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("validation_fraction must be in [0, 1)")
        return v

    @field_validator("max_audio_seconds")
    @classmethod
    def _dur(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("max_audio_seconds must be > 0")
        return v


class PromptConfig(_Section):
    """Prompt texts: empty uses the project's files in phi4mm_lora/data/prompts/."""

    apa: str | None = Field(None, description="File with the APA instruction, or 'short' (built-in two-line one).")
    mdd: str | None = Field(None, description="File with the MDD instruction, or 'short' (built-in two-line one).")


class TrainConfig(_Section):
    """Optimisation; defaults are the paper's recipe."""

    epochs: float = 3
    max_steps: int | None = Field(None, description="Stop after this many optimizer steps.")
    batch_size: int = 8
    grad_accum: int = 8
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = True
    group_by_length: bool = True
    save_every_steps: int | None = None
    save_every_epoch: bool = Field(
        True, description="Also checkpoint at the end of every epoch (off: only every save_every_steps; "
        "the final adapter is always written). Many tiny epochs (the demo) would spend their time saving.")
    keep_checkpoints: int | None = Field(
        2,
        description="Keep only the newest N checkpoints (older ones are deleted once a newer one is "
        "complete); null keeps every one. Each holds the adapter and optimizer state.",
    )
    log_every_steps: int = 1
    num_workers: int = 0
    padding_side: Literal["left", "right"] = Field(
        "right",
        description="Where the collator pads. Both give the same loss (position ids follow the "
        "attention mask); left puts every answer at the end of its row, which suits generation.",
    )

    # field validators (not one model validator) so these are reported together with any
    # other problem in the section, e.g. an unknown key
    @field_validator("batch_size", "grad_accum")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be >= 1")
        return v

    @field_validator("lr", "epochs")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("keep_checkpoints")
    @classmethod
    def _keep(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1 (or null to keep all): resume needs the newest checkpoint")
        return v


class EvalConfig(_Section):
    """Generation and evaluation settings."""

    batch_size: int = 8
    max_new_tokens: int = 128
    during_training: bool = True
    subset: int = Field(32, description="Utterances of the eval split scored after each epoch.")


class RunConfig(_Section):
    """Everything one run needs; see configs/*.yaml for commented examples."""

    output_dir: str = "runs/default"
    seed: int = 42
    precision: Precision = "auto"
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip().split("."), value


def _set_dotted(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def format_validation_error(exc: ValidationError) -> str:
    """All problems, one per line, with the dotted key (pydantic already collects them all)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; `phi4mm-lora validate --help` lists sections)"
        lines.append(f"  {loc}: {msg}")
    return f"{len(lines)} problem(s) in the run config:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (optional) and apply ``key=value`` overrides, then validate everything."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} not found; pass an existing YAML (see configs/)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        tree = loaded
    for item in overrides or []:
        keys, value = _parse_override(item)
        _set_dotted(tree, keys, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc)) from None


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config, so a run folder says exactly what ran."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
