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
from phi4mm_lora.fileio import read_text

#: The decoder linears the official speech/vision adapters target.
DECODER_LORA_REGEX = r"model\.layers\.\d+\.((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj))"

Precision = Literal["auto", "bf16", "fp16", "fp32", "int8", "nf4", "selective"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32", "int8", "nf4", "selective")


class _Section(BaseModel):
    # use_attribute_docstrings: the docstring under a field is its description, shown by
    # ``phi4mm-lora config show`` and written into the JSON Schema.
    # allow_inf_nan=False: `.nan`/`.inf` in YAML are refused for every float ("finite number")
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)


def _at_least(low: int, v: int | None, what: str = "") -> int | None:
    if v is not None and v < low:
        raise ValueError(f"must be >= {low}{what}")
    return v


TinyBase = Literal["random", "pretrained"]
#: How outputs (provenance, model cards, the demo summary) name each tiny model.
TINY_NAMES: dict[str, str] = {"random": "tiny random test model", "pretrained": "tiny pretrained demo base"}


class ModelConfig(_Section):
    """Where the weights come from and how they are placed."""

    path: str | None = Field(
        None,
        description="Hub id or local directory (native or official layout). "
        "Empty: the tiny test model, built on first use.",
    )
    tiny: TinyBase = Field(
        "random",
        description="With an empty path, which tiny model: random (tests) or pretrained (the demo's base: "
        "its decoder was pretrained on generated text and speech to copy a quote and spell it as phones, "
        "never on JSON answers; model/tiny_base.py). Ignored when path is set, so a demo config can be "
        "pointed at a real checkpoint with model.path= alone.",
    )
    revision: str | None = Field(
        None, description="Hub revision; empty picks the one holding the native layout (refs/pr/70)."
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    """auto: CUDA, then MPS, then CPU; a named device that is missing is an error."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel. sdpa: PyTorch's SDPA, with one-token decoding steps run on the 8 key/value heads
    instead of a 24-head copy of the cache (model/attention.py); flash_attention_2 needs the flash-attn
    package and a GPU."""
    sdpa_cudnn: bool = False
    """Let PyTorch's SDPA pick cuDNN attention (its first choice on Hopper GPUs). cuDNN builds an
    execution plan for every new shape (batch, query and key lengths), and padded batches and a
    growing cache make most shapes new. Off by default: on an H200 it made a training step 1.23x
    slower (0.441 s against 0.359 s, bf16 batch 8) and the first scoring call 2.2x (10.0 s against
    4.5 s), and gained nothing warm (docs/benchmarks.md, "third lease"). Off leaves SDPA its flash,
    memory-efficient and math kernels. Process-wide (torch.backends.cuda.enable_cudnn_sdp); no effect without CUDA."""


class AdapterConfig(_Section):
    """Which LoRA trains, and what else is unfrozen."""

    mode: Literal["pretrained", "fresh", "stacked"] = Field(
        "pretrained",
        description="pretrained: keep training the checkpoint's adapter; fresh: replace it with a "
        "new one (its ability is lost); stacked: add a new adapter on top of the frozen one.",
    )
    base: Literal["speech", "vision"] = "speech"
    """The checkpoint's pretrained adapter this run builds on (speech for audio tasks)."""
    name: str = Field("task", description="Name of the new adapter in stacked mode.")
    r: int = 64
    """LoRA rank of a fresh or stacked adapter."""
    alpha: float = 128
    """LoRA alpha (scaling alpha / r); commonly 2 x r."""
    dropout: float = 0.05
    """LoRA dropout, in [0, 1)."""
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
    """speechocean: a Speechocean762 release or hub copy; manifest: a JSONL file of audio + answers."""
    path: str | None = Field(
        None,
        description="Speechocean762 release dir, a datasets save_to_disk/parquet folder, or a "
        "JSONL manifest. Empty: the bundled generated corpus.",
    )
    task: Literal["apa", "mdd", "both"] = "both"
    """apa: scores; mdd: word/phone transcripts; both: every utterance twice, once per task."""
    train_split: str = "train"
    """Split trained on."""
    eval_split: str = "test"
    """Split evaluated (evaluate's default --split, and evaluation during training)."""
    validation_fraction: float = Field(0.0, description="Share of train speakers held out.")
    max_audio_seconds: float = 30.0
    """Longer recordings are skipped and reported."""
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

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        return _at_least(1, v, " (or null for all utterances)")


class PromptConfig(_Section):
    """Prompt texts: empty uses the project's files in phi4mm_lora/data/prompts/."""

    apa: str | None = Field(None, description="File with the APA instruction, or 'short' (built-in two-line one).")
    mdd: str | None = Field(None, description="File with the MDD instruction, or 'short' (built-in two-line one).")


class TrainConfig(_Section):
    """Optimisation; defaults are the paper's recipe."""

    epochs: float = 3
    """Passes over the training examples; fractions allowed."""
    max_steps: int | None = Field(None, description="Stop after this many optimizer steps.")
    batch_size: int = 8
    """Examples per batch, per process (grouped by length together; see micro_batch for how many go through
    the model at once)."""
    grad_accum: int = 8
    """Batches per optimizer step (per process): the optimizer sees batch_size x grad_accum examples per process,
    whatever micro_batch is."""
    micro_batch: int | Literal["auto"] = "auto"
    """Most examples per forward/backward pass: each batch is cut into passes of at most this many, whose
    gradients add up to the batch's (same numbers, less memory, slower). Larger than batch_size (with grad_accum
    > 1): the batches of each optimizer step are pooled into fewer, larger passes, longest examples together
    (same gradient; fewer passes' fixed cost on a GPU; at most batch_size x grad_accum). auto: on a GPU, the
    largest pooled pass that fits its free memory without checkpointing, else the largest up to batch_size that
    fits with the chosen gradient_checkpointing (CPU: batch_size). Printed at the start of training."""
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.0
    """Share of the steps spent warming the learning rate up from 0."""
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this; null: no clipping."""
    gradient_checkpointing: Literal["auto", "none", "selective", "full"] = "auto"
    """Recompute activations in backward: full (every decoder layer; least memory, ~70% slower steps on an H200),
    selective (every other decoder layer), none (fastest). auto: the fastest that fits the GPU's free memory
    (CPU: none). true/false mean full/none (older configs)."""
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer and each audio encoder block (torchtune's per-layer "
        "compile; shapes dynamic from the start, since batches vary in length): fewer kernel launches and fused "
        "elementwise work on a GPU. "
        "The first steps are slow while it compiles; numbers agree with eager to rounding. On an H200 (bf16, "
        "batch 8, no checkpointing) a step took 0.87x the eager one (25% MFU) after ~2 min of compiling "
        "(docs/benchmarks.md, fourth lease).",
    )
    fused_optimizer: bool = Field(
        True,
        description="AdamW fused (torch's fused=True): one kernel updates every trainable tensor, instead of a "
        "pass per tensor (CPU) or per group of operations (CUDA's foreach). Same numbers to float32 rounding "
        "(3e-8 after 6 steps of the tiny model). Not under FSDP or DeepSpeed, which shard the optimizer; printed.",
    )
    group_by_length: bool = True
    """Batch examples of similar length together (less padding)."""
    save_every_steps: int | None = None
    """Also write a checkpoint every N optimizer steps (and at each epoch end unless save_every_epoch is off)."""
    save_every_epoch: bool = True
    """Checkpoint at the end of every epoch; off: only every save_every_steps (the final adapter is always
    written). Many tiny epochs (the demo) would otherwise spend their time saving."""
    keep_checkpoints: int | None = Field(
        2,
        description="Keep only the newest N checkpoints (older ones are deleted once a newer one is "
        "complete); null keeps every one. Each holds the adapter and optimizer state.",
    )
    log_every_steps: int = 1
    """Print a log line every N steps (every step still goes to metrics.jsonl)."""
    num_workers: int = 0
    """DataLoader worker processes that decode audio ahead of the training step."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "comet_ml", "aim", "clearml", "dvclive", "swanlab",
                            "trackio"]] = Field(
        ["tensorboard"],
        description="Experiment trackers (accelerate's): the config is logged as hyperparameters, train/* per "
        "step, eval/* per epoch, the loss curve as a file. [] logs to metrics.jsonl only. MLflow reads "
        "MLFLOW_TRACKING_URI, W&B its WANDB_* settings.",
    )
    padding_side: Literal["left", "right"] = Field(
        "right",
        description="Where the collator pads. Both give the same loss (position ids follow the "
        "attention mask); left puts every answer at the end of its row, which suits generation.",
    )
    pad_to_multiple_of: int = Field(
        1,
        ge=1,
        description="Pad each batch's token length up to a multiple of N (the loss is the same: padding is "
        "masked). Fewer distinct shapes: kernels that plan or compile per shape (cuDNN attention, "
        "torch.compile) meet each length once, at the cost of at most N-1 padded positions a row. 1: off.",
    )
    pad_audio_to_multiple_of: int = Field(
        1,
        ge=1,
        description="Pad each batch's audio features up to a multiple of N frames of 10 ms (masked; the audio "
        "tokens and the text are unchanged). Fewer distinct shapes for the audio encoder's ~100 convolutions a "
        "step, whose cuDNN plans are built per shape. The loss moves by ~1e-5 of itself: the longest recording "
        "then meets the padding every shorter one of a batch already meets. 80 (0.8 s): about 7 shapes for "
        "1-6 s clips. 1: off.",
    )

    # field validators (not one model validator) so these are reported together with any
    # other problem in the section, e.g. an unknown key
    @field_validator("batch_size", "grad_accum")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be >= 1")
        return v

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _old_bool(cls, v: Any) -> Any:
        """Configs and checkpoints written before the modes existed say true/false."""
        return {True: "full", False: "none"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("micro_batch", mode="before")
    @classmethod
    def _micro(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("must be a whole number >= 1, or auto")

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

    @field_validator("max_steps", "save_every_steps")
    @classmethod
    def _steps(cls, v: int | None) -> int | None:
        return _at_least(1, v, " (or null)")

    @field_validator("log_every_steps")
    @classmethod
    def _log_every(cls, v: int) -> int:
        return _at_least(1, v)

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        return _at_least(0, v, " (0 loads batches in the training process)")

    @field_validator("lr")
    @classmethod
    def _lr_at_most_one(cls, v: float) -> float:
        if v > 1:
            raise ValueError("must be <= 1 (LoRA learning rates are about 1e-5 to 1e-3)")
        return v

    @field_validator("weight_decay")
    @classmethod
    def _decay(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1]")
        return v

    @field_validator("warmup_ratio")
    @classmethod
    def _warmup(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1] (a share of the training steps)")
        return v

    @field_validator("max_grad_norm")
    @classmethod
    def _clip(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("must be > 0 (or null for no clipping)")
        return v


class EvalConfig(_Section):
    """Generation and evaluation settings."""

    batch_size: int | Literal["auto"] = Field(
        8,
        description="Prompts generated together (answers do not depend on it). auto: on a GPU, the largest batch "
        "(a multiple of 8, at most 256) whose KV cache and prefill fit 70% of the free memory, since there a "
        "decoding step costs about the same for 8 rows as for 32; elsewhere 8. The choice is printed.",
    )
    encoder_batch: int = Field(
        16,
        ge=1,
        description="Recordings per audio-encoder call. The batch gives each recording its own features to "
        "float rounding (transformers' encoder lets padding in; model/audio_encoder.py masks it), and saves "
        "issuing the encoder's operators once per recording. 1: each recording alone.",
    )
    max_new_tokens: int = 128
    """Upper bound on the answer length in tokens (a task's own budget is used when smaller)."""
    during_training: bool = True
    """Evaluate a subset of the eval split while training (after each epoch, see every_steps)."""
    subset: int = Field(32, description="Utterances of the eval split scored at each evaluation during training.")
    every_steps: int | None = Field(
        None,
        description="Also evaluate every N optimizer steps, mid-epoch; null: only after each epoch.",
    )
    merge_adapter: bool = Field(
        True,
        description="evaluate/score/serve: merge the LoRA into the weights once at load (faster "
        "generation, same answers) where the precision allows it: fp32, bf16, fp16; int8/nf4/selective "
        "stay unmerged (merging would re-quantise the base weights). Evaluation during training merges for its "
        "duration and then restores the exact base weights (not under FSDP or DeepSpeed).",
    )
    cache: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="KV cache of generation (transformers' cache_implementation): dynamic grows with each token; "
        "static is allocated once at its longest, the precondition of eval.compile. Same answers either way; "
        "static alone was 0.9x the step time at batch 32 on CPU and 1.74x on an H200 (docs/benchmarks.md).",
    )
    compile: bool | Literal["inductor", "cudagraphs"] = Field(
        False,
        description="torch.compile the decoding step (transformers' generate compile path; needs eval.cache=static). "
        "true (= inductor): also the audio encoder's conformer blocks, one by one; the first batches pay the "
        "compilation (15-36 s for the tiny model on a CPU core, ~50 s for the full model on an H200), then an H200 "
        "decoded a batch-32 step in 7.6 ms instead of 28.4 ms. cudagraphs: the decoding step is only traced and "
        "replayed as CUDA graphs, with the eager kernels (so the eager answers) and no C++ compiler; on a CPU it "
        "runs the traced step without graphs. Its GPU speed is unmeasured.",
    )

    @field_validator("compile")
    @classmethod
    def _compile_needs_static(cls, v: bool | str, info: Any) -> bool | str:
        if v and info.data.get("cache", "static") != "static":
            raise ValueError("needs eval.cache=static (generate compiles only a fixed-shape cache)")
        return v

    @field_validator("every_steps")
    @classmethod
    def _every(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1 (or null: evaluate after each epoch only)")
        return v

    @field_validator("batch_size", "max_new_tokens", "subset")
    @classmethod
    def _eval_at_least_one(cls, v: int | str) -> int | str:
        return v if v == "auto" else _at_least(1, v)


class RunConfig(_Section):
    """Everything one run needs; see configs/*.yaml for commented examples."""

    output_dir: str = "runs/default"
    """The run folder: config, metrics, checkpoints, adapter, evaluations."""
    seed: int = 42
    """Seeds data order, LoRA initialisation and dropout."""
    precision: Precision = "auto"
    """Precision plan; auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v < 2**32:
            raise ValueError("must be in [0, 2**32) (numpy's seed range)")
        return v


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


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The config class that holds the key at ``loc`` (a pydantic error location)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _unknown_key_message(loc: tuple) -> str:
    """'unknown key' with the closest real keys (difflib) and the command that lists them."""
    import difflib

    model = _section_model(loc)
    section = ".".join(str(p) for p in loc[:-1])
    keys = list(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(str(loc[-1]), keys, n=3, cutoff=0.6)
    prefix = f"{section}." if section else ""
    hint = f"did you mean {' or '.join(f'`{prefix}{k}`' for k in close)}? " if close else ""
    show = f"phi4mm-lora config show {section}" if section else "phi4mm-lora config show"
    return f"unknown key; {hint}`{show}` lists the keys"


def format_validation_error(exc: ValidationError) -> str:
    """All problems, one per line, with the dotted key (pydantic already collects them all)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown_key_message(tuple(err["loc"]))
        lines.append(f"  {loc}: {msg}")
    if len(lines) == 1:  # one problem, one line
        return f"run config: {lines[0].strip()}"
    return f"{len(lines)} problem(s) in the run config:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (optional) and apply ``key=value`` overrides, then validate everything."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} not found; pass an existing YAML (see configs/)")
        try:
            loaded = yaml.safe_load(read_text(p, "config file")) or {}
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


def _type_name(annotation: Any) -> str:
    """``int``, ``float | null``, ``str`` ... as a user reads them (Literal values are listed apart)."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "choice"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _allowed(annotation: Any) -> list[Any]:
    import typing

    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [v for a in typing.get_args(annotation) for v in _allowed(a)]


def describe_config(section: str | None = None) -> list[dict[str, Any]]:
    """Every key of the run config (or of one section) with type, default, allowed values and
    description, read from the typed config itself, so the list cannot drift from the code."""
    sections = {name: f.annotation for name, f in RunConfig.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    if section is not None and section not in RunConfig.model_fields:
        import difflib

        close = difflib.get_close_matches(section, list(RunConfig.model_fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise UserError(f"no config section {section!r}{hint} Sections: {', '.join(sections)}; top-level keys: "
                        + ", ".join(k for k in RunConfig.model_fields if k not in sections))
    rows: list[dict[str, Any]] = []

    def add(prefix: str, model: type[BaseModel], only: str | None = None) -> None:
        for name, f in model.model_fields.items():
            if only is not None and name != only:
                continue
            if name in sections and model is RunConfig:
                continue
            default = f.get_default(call_default_factory=True)
            rows.append({"key": prefix + name, "type": _type_name(f.annotation), "default": default,
                         "allowed": _allowed(f.annotation), "description": f.description or ""})

    if section is None or section not in sections:
        add("", RunConfig, only=section)
    for name, model in sections.items():
        if section is None or section == name:
            add(f"{name}.", model)
    return rows


def config_schema() -> dict[str, Any]:
    """The run config as JSON Schema (for YAML editors: completion, hover text, checking)."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **RunConfig.model_json_schema()}
    schema["title"] = "phi4mm-lora run config"
    return schema
