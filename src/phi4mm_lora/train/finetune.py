"""The training recipe: :class:`FinetuneRecipe`, setup -> fit (train steps) -> cleanup, behind :func:`train`.

Run with ``phi4mm-lora train CONFIG.yaml`` on one device, under ``accelerate launch
--num_processes N -m phi4mm_lora train CONFIG.yaml`` on several GPUs (DDP), or with
``torchrun --nproc_per_node N -m phi4mm_lora train ...`` for several CPU processes (gloo;
``accelerate launch --cpu`` alone starts a single process), and with FSDP or DeepSpeed ZeRO
through an accelerate config (``accelerate launch --config_file configs/accelerate/fsdp.yaml
-m phi4mm_lora train CONFIG.yaml``). No code change: the :class:`accelerate.Accelerator` owns
device placement, gradient synchronisation and fp16 loss scaling; what sharded parameters
change (saving, resuming, clipping, evaluation) is in :mod:`phi4mm_lora.train.distributed`;
everything else is plain PyTorch that reads top to bottom. FSDP2 is tested (on CPU, 2 processes
equal 1); FSDP1 and DeepSpeed are not (see that module).

What each optimizer step does (``W`` processes, ``A`` = ``train.grad_accum``):

1. the epoch's batch plan (:func:`~phi4mm_lora.data.collate.batch_plan`, deterministic in
   seed and epoch) gives this step ``W * A`` batches; process ``r`` takes every W-th and cuts
   each into micro-batches of ``train.micro_batch`` (the memory plan,
   :mod:`phi4mm_lora.train.memory_plan`, which also chooses gradient checkpointing);
2. the label tokens of all of them are counted (all-reduced over processes) *first*, so each
   micro-batch's summed loss is divided by the step's total: gradient accumulation and
   multi-process training then give exactly the gradient of one big batch;
3. loss is computed on answer positions only (:mod:`phi4mm_lora.train.loss`);
4. a non-finite loss stops the run naming the step, the examples and the last checkpoint;
5. clip, optimizer step, scheduler step; metrics to ``metrics.jsonl`` and the trackers of
   ``train.report_to`` (TensorBoard by default; :mod:`phi4mm_lora.train.trackers`).

Checkpoints (:mod:`phi4mm_lora.train.checkpoint`) every ``train.save_every_steps`` and at
each epoch end; ``resume`` restores adapters, optimizer, scheduler, RNG and the position in
the data. After each epoch (and every ``eval.every_steps`` steps, when set) an optional
``evaluate_fn(model, processor, epoch) -> dict`` is called (when ``eval.during_training``) and
its numbers are logged with the losses; at the end the config goes to TensorBoard as hparams; under FSDP
or ZeRO-3 it is skipped with a warning (generation on one process would deadlock the others):
evaluate the saved checkpoint with ``phi4mm-lora evaluate`` instead.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phi4mm_lora.config import RunConfig, dump_config
from phi4mm_lora.data.collate import Collator, batch_plan, estimate_length, longest_tokens
from phi4mm_lora.errors import UserError
from phi4mm_lora.model import blocks
from phi4mm_lora.train import checkpoint as ckpt
from phi4mm_lora.train import distributed, memory_plan, trackers
from phi4mm_lora.train import loss as loss_mod

#: ``evaluate_fn(peft_model, processor, epoch)`` -> flat dict of numbers to log; called after each
#: epoch, and with ``eval.every_steps`` also mid-epoch as ``evaluate_fn(model, processor, epoch, step=N)``.
EvaluateFn = Callable[[torch.nn.Module, Any, int], dict[str, float]]


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the message names the step, the examples and the last checkpoint."""

    exit_code = 3


@dataclass
class TrainResult:
    """Where things went and the headline numbers (also in ``summary.json``)."""

    run_dir: Path
    adapter_dir: Path
    summary: dict[str, Any]
    losses: list[float] = field(default_factory=list)


class _MicroBatches(torch.utils.data.Dataset):
    """Item ``i`` is the collated ``i``-th micro-batch of this process (lets workers prefetch)."""

    def __init__(self, examples: list, batches: list[list[int]], collator: Collator) -> None:
        self.examples, self.batches, self.collator = examples, batches, collator

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.collator([self.examples[j] for j in self.batches[i]])


def _mixed_precision(precision_plan) -> str:
    """fp16 plans need loss scaling; bf16 plans autocast so fp32 LoRA and bf16 base mix cleanly."""
    if precision_plan.dtype == torch.float16:
        return "fp16"
    if precision_plan.dtype == torch.bfloat16:
        return "bf16"
    return "no"


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def steps_per_epoch(n_batches: int, world: int, accum: int) -> int:
    """Optimizer steps in one epoch. One process keeps a short last step; several drop it
    (a process with no micro-batch would stall the others' gradient all-reduce)."""
    per_step = world * accum
    return math.ceil(n_batches / per_step) if world == 1 else n_batches // per_step


def rank_batches(batches: list[list[int]], step: int, world: int, rank: int, accum: int) -> list[list[int]]:
    """This process's batches of optimizer step ``step`` (within the epoch)."""
    chunk = batches[step * world * accum : (step + 1) * world * accum]
    return chunk[rank::world]


def step_micro_batches(batches: list[list[int]], step: int, world: int, rank: int, accum: int,
                       micro_batch: int, pool_by: list[int] | None = None) -> list[list[int]]:
    """This process's micro-batches of step ``step``: its batches, each cut into passes of at most
    ``micro_batch`` examples (``train.micro_batch``), or, given the examples' lengths ``pool_by``
    (a plan whose micro-batch is larger than the batch), pooled into passes
    (:func:`~phi4mm_lora.train.memory_plan.pool_step`); the step's examples stay the same."""
    mine = rank_batches(batches, step, world, rank, accum)
    if pool_by is not None and len(mine) > 1:
        return memory_plan.pool_step(mine, pool_by, micro_batch)
    return [m for b in mine for m in memory_plan.split_batch(b, micro_batch)]


def plot_losses(metrics_file: Path, out_png: Path, title: str = "training loss") -> Path:
    """Loss per step, with the epoch evaluations (if any) on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps, values = [r["step"] for r in train], [r["loss"] for r in train]
    ax.plot(steps, values, color="tab:blue", lw=0.8, alpha=0.45, label="train loss")
    window = max(5, len(values) // 20)
    if len(values) > 2 * window:  # batches of different tasks differ a lot: show the trend too
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"mean of last {window} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = ax.twinx()
        keys = [k for k in evals[-1] if k not in ("type", "step", "epoch") and isinstance(evals[-1][k], (int, float))]
        for k in keys[:6]:
            ax2.plot([r["step"] for r in evals], [r.get(k, float("nan")) for r in evals], marker="o", ls="--", label=f"eval {k}")
        ax2.set_ylabel("evaluation")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def train(
    cfg: RunConfig,
    evaluate_fn: EvaluateFn | None = None,
    *,
    resume: str | Path | bool | None = None,
    resume_with_changes: bool = False,
    config_file: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Fine-tune according to ``cfg``; returns the run folder, final adapter and summary.

    First every check that needs no model (:func:`~phi4mm_lora.train.preflight.preflight`, the
    same that ``validate`` runs), then the run folder is locked for this process (one owner per
    run folder), then :class:`FinetuneRecipe` does the work (setup -> fit -> cleanup).
    """
    from phi4mm_lora.train.preflight import preflight
    from phi4mm_lora.train.runlock import RunLock

    main = int(os.environ.get("RANK", "0")) == 0  # the Accelerator does not exist yet
    pf = preflight(cfg, config_file=config_file, resume=resume, resume_with_changes=resume_with_changes, main=main)
    lock = RunLock(pf.run_dir).acquire() if main else None
    try:
        if lock is not None and lock.took_over:
            pf.notes.append(f"took over the run folder from {lock.took_over} (no longer running)")
        return _train(cfg, pf, evaluate_fn, progress=progress, log=log)
    finally:
        if lock is not None:
            lock.release()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))


def finite_row(row: dict) -> dict:
    """Non-finite numbers become null: ``Infinity``/``NaN`` are not JSON (RFC 8259)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def read_metrics(path: Path, upto_step: int) -> tuple[list[dict], list[str]]:
    """Rows of ``metrics.jsonl`` up to ``upto_step``; lines that are not JSON (a torn last line
    after a crash) are dropped and named in the notes."""
    rows, notes = [], []
    if not path.is_file():
        return rows, notes
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row["step"]
        except (ValueError, KeyError, TypeError):
            notes.append(f"dropped line {n} of {path} (not a complete JSON record: {line[:40]!r})")
            continue
        if step <= upto_step:
            rows.append(row)
    return rows, notes


def _apply_changed_schedule(optimizer, scheduler, tc, changed: dict) -> list[str]:
    """After ``--resume-with-changes``: the new lr/weight decay/schedule take effect for real
    (loading the optimizer and scheduler state restored the old ones)."""
    keys = [k for k in changed if k in ("train.lr", "train.weight_decay", "train.scheduler", "train.warmup_ratio",
                                        "train.epochs", "train.max_steps")]
    if not keys:
        return []
    scheduler.base_lrs = [tc.lr for _ in scheduler.base_lrs]
    for group, lam in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = tc.lr
        group["weight_decay"] = tc.weight_decay
        group["lr"] = tc.lr * lam(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return [f"applied from step {scheduler.last_epoch}: " + ", ".join(f"{k}={changed[k][1]}" for k in keys)]


def _train(
    cfg: RunConfig,
    pf,
    evaluate_fn: EvaluateFn | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """The run itself, after :func:`train`'s checks and lock."""
    recipe = FinetuneRecipe(cfg, pf, evaluate_fn, progress=progress, log=log)
    recipe.setup()
    recipe.fit()
    return recipe.cleanup()


@dataclass
class StepOutcome:
    """What one optimizer step did, summed over processes."""

    loss: float
    grad_norm: float | None
    label_tokens: int
    examples: int
    tokens: int


class FinetuneRecipe:
    """The recipe in torchtune's shape: :meth:`setup` -> :meth:`fit` -> :meth:`cleanup`.

    :meth:`fit` runs the epochs; each optimizer step is :meth:`train_step` on this process's
    micro-batches; :meth:`save_checkpoint` and :meth:`evaluate` run between steps. Every part
    is a method of its own, so a profiler or ``scripts/bench_train_cpu.py`` can time it alone.
    :func:`train` is the public entry point (checks and run-folder lock first).
    """

    def __init__(self, cfg: RunConfig, pf, evaluate_fn: EvaluateFn | None = None, *, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        self.t_start = time.perf_counter()
        self.cfg, self.tc, self.pf, self.evaluate_fn = cfg, cfg.train, pf, evaluate_fn
        self.progress, self.log = progress, log
        self.run_dir = Path(cfg.output_dir).expanduser()
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.resume_from: Path | None = pf.resume_from
        self.last_ckpt: Path | None = pf.resume_from
        self.epoch0 = self.step0 = self.global_step = 0
        self.losses: list[float] = []
        self.eval_rows: list[dict] = []
        self.n_examples = self.n_tokens = 0
        self.last_eval_step: int | None = None

    def say(self, msg: str) -> None:
        if self.main:
            from tqdm.auto import tqdm

            (self.log or tqdm.write)(msg)

    def record(self, row: dict) -> None:
        """One line of ``metrics.jsonl`` (main process)."""
        if self.main:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps(finite_row(row), allow_nan=False) + "\n")

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Accelerator, model, data, optimizer, resume, run folder - in this order (the seed is
        set before the model loads; nothing draws random numbers between here and the loop)."""
        self._setup_accelerator()
        self._setup_model()
        self._setup_data()
        self._setup_memory_plan()
        self._setup_compile()
        self._setup_optimizer()
        if self.resume_from is not None:
            self._resume()
        self._start_run_folder()

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from phi4mm_lora.model.precision import pick_device, resolve_plan

        precision_plan = resolve_plan(self.cfg.precision, pick_device(self.cfg.model.device))
        # accelerate keeps its settings in a process-wide singleton; a second run in the same
        # process (tests, a notebook, demo then eval) may use another precision, so start clean.
        # The distributed process group (PartialState) is kept.
        AcceleratorState._reset_state()
        trackers.check_available(self.tc.report_to)
        self.accelerator = Accelerator(mixed_precision=_mixed_precision(precision_plan),
                                       cpu=precision_plan.device.type == "cpu",
                                       log_with=trackers.log_with(self.tc.report_to, self.run_dir) or None)
        acc = self.accelerator
        self.main, self.world, self.rank = acc.is_main_process, acc.num_processes, acc.process_index
        #: :meth:`lora_inputs_as_is` active: only where ``acc.autocast()`` really autocasts (not fp32
        #: plans, nor DeepSpeed, which casts the model itself). Tests flip it to compare both ways.
        self.uncast_lora_inputs = bool(acc.native_amp)

    def _setup_model(self) -> None:
        from accelerate.utils import set_seed

        from phi4mm_lora.model.load import load_model, resolve_path

        cfg = self.cfg
        resolve_path(cfg.model)  # builds the tiny model on first use; that draws random numbers, so before seeding
        set_seed(cfg.seed)
        # load_model refuses a model that cannot train (precision.check_plan): checked once, there
        self.loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
        self.model, self.processor, self.adapters = self.loaded.model, self.loaded.processor, self.loaded.adapters
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise UserError("refusing to train: no parameter requires grad (check adapter.mode/adapter.trainable)")
        if self.loaded.plan.lora_dtype is None:
            # fp32 master weights for everything that trains (unfrozen towers load in the plan's
            # bf16/fp16): small AdamW updates vanish in bf16, and fp16 loss scaling cannot unscale
            # fp16 gradients. autocast still runs the matmuls in half precision.
            for p in self.params:
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()
        self.n_trainable = sum(p.numel() for p in self.params)
        self.model.config.use_cache = False

    def _setup_data(self) -> None:
        from phi4mm_lora.data.examples import build_examples, with_audio_token

        cfg, tc, pf = self.cfg, self.tc, self.pf
        if pf.examples is not None:  # built by the pre-flight checks
            self.examples, self.report = with_audio_token(pf.examples, self.processor.audio_token), pf.report
        else:
            self.examples, self.report = build_examples(cfg.data, cfg.prompts, cfg.data.train_split,
                                                        audio_token=self.processor.audio_token, seed=cfg.seed)
        if not self.examples:
            raise UserError(f"no training examples in split {cfg.data.train_split!r}: {self.report}")
        cache = None
        if cfg.data.feature_cache:
            from phi4mm_lora.data.cache import FeatureCache

            cache = FeatureCache(cfg.data.feature_cache, self.processor.audio_processor)
        self.collator = Collator(self.processor, padding_side=tc.padding_side, feature_cache=cache,
                                 pad_to_multiple_of=tc.pad_to_multiple_of,
                                 audio_frames_multiple=tc.pad_audio_to_multiple_of)
        self.lengths = [estimate_length(ex) for ex in self.examples]
        n_batches = math.ceil(len(self.examples) / tc.batch_size)
        self.spe = steps_per_epoch(n_batches, self.world, tc.grad_accum)
        if self.spe == 0:
            raise UserError(f"{len(self.examples)} examples make {n_batches} batches, fewer than processes x grad_accum "
                            f"({self.world} x {tc.grad_accum}); lower train.batch_size or train.grad_accum")
        self.total_steps = math.ceil(tc.epochs * self.spe)
        if tc.max_steps is not None:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.n_epochs = math.ceil(self.total_steps / self.spe)
        if pf.state is not None and pf.state.global_step >= self.total_steps:
            from phi4mm_lora.train.preflight import NothingToDo

            raise NothingToDo(f"run {self.run_dir} already finished: {self.resume_from.name} is step "
                              f"{pf.state.global_step} of {self.total_steps}; nothing changed. To train further, "
                              "raise train.epochs or train.max_steps (with --resume-with-changes)")

    def _setup_memory_plan(self) -> None:
        """Gradient checkpointing and micro-batch (:mod:`~phi4mm_lora.train.memory_plan`): ``auto`` picks
        the fastest that fits this device's free memory; set before the model is wrapped."""
        tc, acc = self.tc, self.accelerator
        micro = tc.micro_batch
        if distributed.is_deepspeed(acc):  # accelerate steps the DeepSpeed engine after every backward
            if micro != "auto" and micro < tc.batch_size:
                raise UserError(f"with DeepSpeed use train.micro_batch=auto or >= train.batch_size ({tc.batch_size}): "
                                "accelerate steps the DeepSpeed engine after every backward pass")
            micro = tc.batch_size
        available = memory_plan.device_memory(acc.device)
        self.plan = memory_plan.choose_plan(
            memory_plan.footprint(self.model, self.loaded.plan.dtype), batch_size=tc.batch_size,
            grad_accum=tc.grad_accum, longest_tokens=-(-longest_tokens(self.examples, self.processor.tokenizer)
                                                       // tc.pad_to_multiple_of) * tc.pad_to_multiple_of,
            available=available, mode=tc.gradient_checkpointing, micro_batch=micro, device=str(acc.device))
        memory_plan.apply_checkpointing(self.model, self.plan.gradient_checkpointing)
        self.pool_by = self.lengths if self.plan.pooled else None  # the lengths pooled passes are sorted by

    def _setup_compile(self) -> None:
        """``train.compile``: each decoder layer and each of the audio encoder's conformer blocks
        through ``torch.compile`` (:mod:`phi4mm_lora.model.blocks` says why block by block), after
        checkpointing is set (transformers' checkpoint then wraps the compiled layer) and before
        accelerate wraps the model. On a GPU the win is fusion and fewer launches (the step is
        launch- and elementwise-bound: docs/benchmarks.md, "GPU measurements"); on a CPU only the
        compile time shows."""
        if not self.tc.compile:
            return
        layers = list(blocks.decoder_layers(self.model).values())
        audio = blocks.conformer_blocks(self.model)
        blocks.compile_each([*layers, *audio])
        self.say(f"compile: torch.compile on {len(layers)} decoder layers and {len(audio)} audio encoder blocks "
                 "(the first steps compile)")

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        tc = self.tc
        fused = tc.fused_optimizer and distributed.fused_optimizer_ok(self.accelerator)
        optimizer = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused or None)
        how = "fused: one kernel updates them all" if fused else "unfused (train.fused_optimizer=false, or FSDP/DeepSpeed)"
        self.say(f"optimizer: AdamW over {len(self.params)} trainable tensors, {how}")
        self.scheduler = get_scheduler(tc.scheduler, optimizer, num_warmup_steps=int(tc.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        # The scheduler is not prepared: accelerate would step it once per process.
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.peft = self.accelerator.unwrap_model(self.model)
        self.setup_notes = distributed.check_setup(self.accelerator, tc.grad_accum)

    def _resume(self) -> None:
        """Adapters, optimizer, scheduler, loss scaler, RNG and position from ``resume_from``."""
        from phi4mm_lora.model.adapter_io import load_adapter

        acc, folder, trainable = self.accelerator, self.resume_from, self.adapters.trainable_adapter
        st = self.pf.state if self.pf.state is not None else ckpt.load_training_state(folder)
        adapter = folder / ckpt.ADAPTER_DIR
        try:
            if not distributed.load_trained(acc, self.model, self.peft, trainable, adapter):
                load_adapter(self.peft, trainable, adapter)
            distributed.load_optimizer_state(acc, self.model, self.optimizer, st.optimizer, folder)
        except (RuntimeError, ValueError, KeyError) as exc:  # shapes or parameter groups differ
            raise UserError(f"checkpoint {folder} does not fit this model/adapter ({str(exc).splitlines()[0][:160]}); "
                            "resume with the settings it was saved with") from None
        self.scheduler.load_state_dict(st.scheduler)
        for note in _apply_changed_schedule(self.optimizer, self.scheduler, self.tc, self.pf.changed):
            self.pf.notes.append(note)
        if st.scaler is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(st.scaler)
        self.epoch0, self.step0, self.global_step = st.epoch, st.step_in_epoch, st.global_step
        ckpt.load_rng(folder, self.rank)
        self.say(f"resumed from {folder} (epoch {self.epoch0}, step {self.global_step})")

    def _start_run_folder(self) -> None:
        """config.yaml, metrics.jsonl (cut back to the resumed step), trackers, the opening lines."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            dump_config(self.cfg, self.run_dir / "config.yaml")
            if self.resume_from is None:
                self.metrics_file.write_text("")
            else:  # drop lines logged after the checkpoint we resume from (and a torn last line)
                kept, torn = read_metrics(self.metrics_file, self.global_step)
                self.pf.notes.extend(torn)
                _write_jsonl(self.metrics_file, [finite_row(r) for r in kept])
        trackers.start(self.accelerator, self.cfg, self.run_dir)  # train.report_to; the config as hyperparameters
        a = self.adapters
        self.say(f"run {self.run_dir}: {len(self.examples)} examples, {self.spe} steps/epoch, {self.total_steps} steps, "
                 f"{self.world} process(es) ({distributed.kind(self.accelerator)}), precision {self.loaded.plan.name}, "
                 f"trainable {self.n_trainable:,} params "
                 f"({a.trainable_adapter}{' + ' + ', '.join(a.unfrozen_prefixes) if a.unfrozen_prefixes else ''})")
        for line in self.plan.lines():
            self.say(line)
        for note in self.report.problems[:5]:
            self.say(f"data: skipped {note}")
        for note in self.setup_notes:
            self.say(f"warning: {note}")
        for note in self.pf.notes:
            self.say(f"note: {note}")

    # ------------------------------------------------------------------ train
    def epoch_loader(self, epoch: int, batches: list[list[int]], first: int, last: int):
        """This process's collated micro-batches of steps ``first..last-1`` of ``epoch``."""
        tc = self.tc
        mine = [b for s in range(first, last)
                for b in step_micro_batches(batches, s, self.world, self.rank, tc.grad_accum, self.plan.micro_batch,
                                            self.pool_by)]
        return torch.utils.data.DataLoader(_MicroBatches(self.examples, mine, self.collator), batch_size=None,
                                           num_workers=tc.num_workers, collate_fn=lambda b: b,
                                           # own generator: iter() must not draw from the global RNG,
                                           # or a resumed run's dropout masks would drift from the original
                                           generator=torch.Generator().manual_seed(self.cfg.seed + epoch))

    def fit(self) -> None:
        """The epochs: batch plan, loader, :meth:`train_step` per optimizer step, checkpoints and
        evaluations as configured; stops after ``total_steps``."""
        from tqdm.auto import tqdm

        tc, acc = self.tc, self.accelerator
        self.model.train()
        self.t_loop = time.perf_counter()
        self.bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step",
                        disable=not (self.main and self.progress), dynamic_ncols=True)
        for epoch in range(self.epoch0, self.n_epochs):
            batches = batch_plan(self.lengths, tc.batch_size, self.cfg.seed, epoch, tc.group_by_length)
            first = self.step0 if epoch == self.epoch0 else 0
            last = min(self.spe, first + self.total_steps - self.global_step)
            it = iter(self.epoch_loader(epoch, batches, first, last))
            for s in range(first, last):
                n_micro = len(step_micro_batches(batches, s, self.world, self.rank, tc.grad_accum, self.plan.micro_batch,
                                                 self.pool_by))
                micro = [_to_device(next(it), acc.device) for _ in range(n_micro)]
                outcome = self.train_step(micro, epoch)
                self.global_step += 1
                self._log_step(outcome, epoch, s)
                if tc.save_every_steps and self.global_step % tc.save_every_steps == 0:
                    self.last_ckpt = self.save_checkpoint(epoch, s + 1)
                    self.say(f"checkpoint {self.last_ckpt}")
                every = self.cfg.eval.every_steps
                if every and self.global_step % every == 0 and s + 1 < self.spe and self._evaluates_during_training():
                    self.evaluate(round(epoch + (s + 1) / self.spe, 4), f"at step {self.global_step}", step=self.global_step)
            if last == self.spe:
                self._end_epoch(epoch)
            if self.global_step >= self.total_steps:
                break
        self.bar.close()

    def train_step(self, micro: list[dict], epoch: int) -> StepOutcome:
        """One optimizer step over this process's micro-batches (already on the device).

        The label tokens of all micro-batches of all processes are counted first, so each
        micro-batch's summed loss divided by that total gives exactly the gradient of one big
        batch; a non-finite loss raises :class:`TrainingDiverged` before the optimizer moves.
        """
        acc, world, tc = self.accelerator, self.world, self.tc
        n_micro = len(micro)
        ids = [i for b in micro for i in b["example_ids"]]
        n_local = sum(loss_mod.count_label_tokens(b["labels"]) for b in micro)
        n_total = int(acc.reduce(torch.tensor(n_local, device=acc.device), "sum"))
        loss_sum = torch.zeros((), device=acc.device)
        with self.lora_inputs_as_is():  # forward and backward: checkpointing recomputes in backward
            for j, b in enumerate(micro):
                sync = nullcontext() if j == n_micro - 1 else acc.no_sync(self.model)
                with sync, acc.autocast():
                    part, _ = loss_mod.answer_loss_sum(self.model, b)
                    # DDP, FSDP and DeepSpeed average gradients over processes; * world undoes that.
                    acc.backward(part / max(n_total, 1) * world)
                loss_sum += part.detach().float()
        step_loss = float(acc.reduce(loss_sum, "sum")) / max(n_total, 1)
        if not math.isfinite(step_loss):
            where = f"last good checkpoint: {self.last_ckpt}" if self.last_ckpt else "no checkpoint was saved yet"
            raise TrainingDiverged(
                f"loss is {step_loss} at step {self.global_step + 1} (epoch {epoch}); examples in this step: "
                f"{', '.join(ids[:16])}{' ...' if len(ids) > 16 else ''}; {where}. Lower train.lr, "
                "check these samples, or use another precision")
        grad_norm = None
        if tc.max_grad_norm is not None:
            grad_norm = distributed.grad_norm_value(acc.clip_grad_norm_(
                distributed.clip_parameters(acc, self.model, self.params), tc.max_grad_norm))
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        examples = int(acc.reduce(torch.tensor(sum(len(b["example_ids"]) for b in micro), device=acc.device), "sum"))
        tokens = int(acc.reduce(sum(b["attention_mask"].sum() for b in micro), "sum"))
        return StepOutcome(step_loss, grad_norm, n_total, examples, tokens)

    def lora_inputs_as_is(self):
        """While active, PEFT's LoRA layers take their input in the dtype it arrives in (the
        autocast dtype) instead of casting it to the adapter's fp32: PEFT's own switch.

        PEFT casts every LoRA input to the adapter weights' dtype before dropout and ``lora_A``.
        Under bf16/fp16 autocast with fp32 adapters that is an fp32 copy of each LoRA input
        activation (4149 x 8192 for one ``down_proj`` of a batch-8 step), dropout in fp32, and
        autocast casting it straight back for the matmul; backward repeats the casts (on an H200
        the step's ``aten::copy_`` took 61 ms of 372 ms busy). ``lora_A`` runs in the half dtype
        either way and half -> fp32 -> half is exact, so without dropout the weights are
        identical; with dropout they are not bit-identical (CPU dropout scales by ``1/(1-p)`` in
        the input's dtype): ``tests/test_lora_input_cast.py``. Held over forward *and* backward:
        gradient checkpointing recomputes the forward inside ``acc.backward``. A no-op where
        nothing autocasts (fp32 plans).
        """
        from peft.helpers import disable_input_dtype_casting

        return disable_input_dtype_casting(self.model, active=self.uncast_lora_inputs)

    def _log_step(self, out: StepOutcome, epoch: int, s: int) -> None:
        """metrics.jsonl, trackers, progress bar and (every ``log_every_steps``) one line."""
        self.n_examples += out.examples
        self.n_tokens += out.tokens
        elapsed = time.perf_counter() - self.t_loop
        self.losses.append(out.loss)
        row = {"type": "train", "step": self.global_step, "epoch": epoch + (s + 1) / self.spe, "loss": out.loss,
               "lr": self.scheduler.get_last_lr()[0], "grad_norm": out.grad_norm, "label_tokens": out.label_tokens,
               "examples_per_s": self.n_examples / elapsed, "tokens_per_s": self.n_tokens / elapsed}
        self.record(row)
        self.accelerator.log({f"train/{k}": row[k] for k in ("loss", "lr", "grad_norm", "examples_per_s", "tokens_per_s")
                              if row[k] is not None}, step=self.global_step)
        self.bar.set_postfix(loss=f"{out.loss:.4f}", ex_s=f"{row['examples_per_s']:.2f}", refresh=False)
        self.bar.update(1)
        if self.global_step % self.tc.log_every_steps == 0 or self.global_step == self.total_steps:
            self.say(f"step {self.global_step}/{self.total_steps} epoch {row['epoch']:.2f} loss {out.loss:.4f} "
                     f"lr {row['lr']:.2e} {row['examples_per_s']:.2f} ex/s {row['tokens_per_s']:.0f} tok/s")

    def _evaluates_during_training(self) -> bool:
        return (self.evaluate_fn is not None and self.cfg.eval.during_training
                and distributed.can_evaluate_on_main(self.accelerator))

    def _end_epoch(self, epoch: int) -> None:
        """The epoch-end checkpoint and evaluation (each unless the last step already did it)."""
        tc = self.tc
        if tc.save_every_epoch and not (tc.save_every_steps and self.global_step % tc.save_every_steps == 0):
            self.last_ckpt = self.save_checkpoint(epoch + 1, 0)
            self.say(f"checkpoint {self.last_ckpt} (end of epoch {epoch + 1})")
        if self.evaluate_fn is None or not self.cfg.eval.during_training:
            return
        if not distributed.can_evaluate_on_main(self.accelerator):
            if epoch == self.epoch0:
                self.say(f"warning: no evaluation during training under {distributed.kind(self.accelerator)} (the "
                         "weights are sharded; generating on one process would hang the others); evaluate a checkpoint "
                         "afterwards: phi4mm-lora evaluate --config CONFIG.yaml --adapter RUN/checkpoints/step-N/adapter")
        elif self.last_eval_step != self.global_step:
            self.evaluate(epoch + 1, f"after epoch {epoch + 1}")

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, epoch: int, step_in_epoch: int) -> Path:
        """``checkpoints/step-N`` written atomically (all processes take part); older ones pruned."""
        final = self.run_dir / "checkpoints" / ckpt.checkpoint_name(self.global_step)
        tmp = ckpt.temp_dir_for(final)
        if self.main:
            ckpt.ensure_space(final, self.last_ckpt, self.n_trainable)
            ckpt.begin_atomic_dir(final)
        self.accelerator.wait_for_everyone()
        with ckpt.disk_full_guard(final, self.last_ckpt, self.n_trainable):
            self._write_checkpoint(final, tmp, epoch, step_in_epoch)
        if self.main:
            ckpt.prune_checkpoints(self.run_dir, self.tc.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return final

    def train_state(self, epoch: int, step_in_epoch: int, optimizer_state: dict | None) -> ckpt.TrainState:
        acc = self.accelerator
        return ckpt.TrainState(
            global_step=self.global_step, epoch=epoch, step_in_epoch=step_in_epoch, optimizer=optimizer_state,
            scheduler=self.scheduler.state_dict(), scaler=acc.scaler.state_dict() if acc.scaler is not None else None,
            world_size=self.world, config=self.cfg.model_dump(mode="json"), total_steps=self.total_steps)

    def _write_checkpoint(self, final: Path, tmp: Path, epoch: int, step_in_epoch: int) -> None:
        from phi4mm_lora.model.adapters import save_trained

        acc = self.accelerator
        ckpt.save_rng(tmp, self.rank)
        # collectives: under FSDP/DeepSpeed every process helps gather the full tensors
        trained = distributed.gather_trained(acc, self.model, self.peft)
        optim_state = distributed.optimizer_state(acc, self.model, self.optimizer, tmp)
        acc.wait_for_everyone()
        if self.main:
            save_trained(self.peft, self.adapters, tmp / ckpt.ADAPTER_DIR, trained)
            self.train_state(epoch, step_in_epoch, optim_state).save(tmp)
            ckpt.finish_atomic_dir(tmp, final)

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, epoch_value: float, when: str, step: int | None = None) -> None:
        """evaluate_fn on the main process, logged as eval/<key>; ``step`` marks a mid-epoch call."""
        if self.main:
            from phi4mm_lora.model.inference import merged_for_a_while

            self.model.eval()
            t0 = time.perf_counter()
            acc = self.accelerator  # sharded or engine-owned weights (FSDP, DeepSpeed) are not merged into
            merge = self.cfg.eval.merge_adapter and not (distributed.is_fsdp(acc) or distributed.is_deepspeed(acc))
            with torch.no_grad(), merged_for_a_while(self.peft, self.loaded.plan, list(self.adapters.active), merge):
                extra = {} if step is None else {"step": step}
                result = dict(self.evaluate_fn(self.peft, self.processor, epoch_value, **extra))
            result.setdefault("seconds", round(time.perf_counter() - t0, 2))  # issue 11: its share of an epoch
            self.model.train()
            erow = {"type": "eval", "step": self.global_step, "epoch": epoch_value, **result}
            self.eval_rows.append(erow)
            self.record(erow)
            self.accelerator.log({f"eval/{k}": v for k, v in result.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=self.global_step)
            self.say(f"eval {when}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in result.items()))
        self.last_eval_step = self.global_step
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> TrainResult:
        """The final adapter, summary.json, the loss curve, trackers closed."""
        from phi4mm_lora.model.adapters import save_trained

        acc, run_dir, losses = self.accelerator, self.run_dir, self.losses
        adapter_dir = run_dir / "adapter"
        trained = distributed.gather_trained(acc, self.model, self.peft)  # collective
        if self.main:
            with ckpt.disk_full_guard(adapter_dir, self.last_ckpt, self.n_trainable):
                ckpt.write_atomic_dir(adapter_dir, lambda tmp: save_trained(self.peft, self.adapters, tmp, trained))
        acc.wait_for_everyone()
        wall = time.perf_counter() - self.t_start
        loop_s = time.perf_counter() - self.t_loop
        eval_s = sum(row.get("seconds", 0.0) for row in self.eval_rows) if self.eval_rows else None
        summary: dict[str, Any] = {
            "run_dir": str(run_dir), "adapter_dir": str(adapter_dir), "steps": self.global_step,
            "total_steps": self.total_steps, "epochs": self.global_step / self.spe, "processes": self.world,
            "precision": self.loaded.plan.name, "trainable_params": self.n_trainable, "train_examples": len(self.examples),
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "min_loss": min(losses) if losses else None,
            "examples_per_s": self.n_examples / loop_s if loop_s > 0 else None,
            "tokens_per_s": self.n_tokens / loop_s if loop_s > 0 else None,
            "wall_s": wall, "peak_rss_mb": _peak_rss_mb(),
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "last_checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "eval": self.eval_rows[-1] if self.eval_rows else None,
            # issue 11: evaluation during training should cost at most 10% of the training around it
            "eval_s": eval_s, "eval_share": eval_s / (loop_s - eval_s) if eval_s is not None and loop_s > eval_s else None,
            "memory_plan": self.plan.as_dict(),
        }
        if self.main:
            curve = plot_losses(self.metrics_file, run_dir / "loss_curve.png", title=f"training loss - {run_dir.name}")
            summary["loss_curve"] = str(curve)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            trackers.log_files(acc, [run_dir / "loss_curve.png", run_dir / "summary.json", self.metrics_file])
            trackers.finish(acc, self.cfg, summary)  # TensorBoard: the config as hparams with the final numbers
            self.say("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in summary.items() if k not in ("eval", "memory_plan")))
        acc.end_training()
        return TrainResult(run_dir, adapter_dir, summary, losses)


__all__ = ["EvaluateFn", "FinetuneRecipe", "StepOutcome", "TrainResult",
           "TrainingDiverged", "plot_losses", "rank_batches", "step_micro_batches", "steps_per_epoch", "train"]
