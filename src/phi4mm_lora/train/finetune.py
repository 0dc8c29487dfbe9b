"""The training recipe: one readable function, setup -> train -> cleanup.

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
   seed and epoch) gives this step ``W * A`` micro-batches; process ``r`` takes every W-th;
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
from phi4mm_lora.data.collate import Collator, batch_plan, estimate_length
from phi4mm_lora.errors import UserError
from phi4mm_lora.train import checkpoint as ckpt
from phi4mm_lora.train import distributed, trackers
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


def _mixed_precision(plan) -> str:
    """fp16 plans need loss scaling; bf16 plans autocast so fp32 LoRA and bf16 base mix cleanly."""
    if plan.dtype == torch.float16:
        return "fp16"
    if plan.dtype == torch.bfloat16:
        return "bf16"
    return "no"


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute decoder activations in backward (non-reentrant, so frozen inputs work with LoRA).

    transformers 5.2x renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable`` and warns on the old name; older 5.x only has the old one.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def steps_per_epoch(n_batches: int, world: int, accum: int) -> int:
    """Optimizer steps in one epoch. One process keeps a short last step; several drop it
    (a process with no micro-batch would stall the others' gradient all-reduce)."""
    per_step = world * accum
    return math.ceil(n_batches / per_step) if world == 1 else n_batches // per_step


def rank_batches(plan: list[list[int]], step: int, world: int, rank: int, accum: int) -> list[list[int]]:
    """This process's micro-batches of optimizer step ``step`` (within the epoch)."""
    chunk = plan[step * world * accum : (step + 1) * world * accum]
    return chunk[rank::world]


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
    run folder), then :func:`_train` does the work.
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
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from phi4mm_lora.data.examples import DEFAULT_AUDIO_TOKEN, build_examples
    from phi4mm_lora.model.adapters import load_extra_modules, save_trained
    from phi4mm_lora.model.load import load_model, resolve_path
    from phi4mm_lora.model.precision import check_plan, pick_device, resolve_plan

    t_start = time.perf_counter()
    tc = cfg.train
    run_dir = Path(cfg.output_dir).expanduser()

    # ------------------------------------------------------------------ setup
    plan_guess = resolve_plan(cfg.precision, pick_device(cfg.model.device))
    # accelerate keeps its settings in a process-wide singleton; a second run in the same
    # process (tests, a notebook, demo then eval) may use another precision, so start clean.
    # The distributed process group (PartialState) is kept.
    AcceleratorState._reset_state()
    trackers.check_available(tc.report_to)
    accelerator = Accelerator(mixed_precision=_mixed_precision(plan_guess), cpu=plan_guess.device.type == "cpu",
                              log_with=trackers.log_with(tc.report_to, run_dir) or None)
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index

    def say(msg: str) -> None:
        if main:
            (log or tqdm.write)(msg)

    resume_from = pf.resume_from
    resolve_path(cfg.model)  # builds the tiny model on first use; that draws random numbers, so before seeding
    set_seed(cfg.seed)
    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    model, processor, state = loaded.model, loaded.processor, loaded.adapters
    problems = check_plan(model)
    if problems:
        raise UserError("refusing to train: " + "; ".join(problems[:5]))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("refusing to train: no parameter requires grad (check adapter.mode/adapter.trainable)")
    if loaded.plan.lora_dtype is None:
        # fp32 master weights for everything that trains (unfrozen towers load in the plan's
        # bf16/fp16): small AdamW updates vanish in bf16, and fp16 loss scaling cannot unscale
        # fp16 gradients. autocast still runs the matmuls in half precision.
        for p in params:
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    n_trainable = sum(p.numel() for p in params)
    if tc.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False

    if pf.examples is not None and processor.audio_token == DEFAULT_AUDIO_TOKEN:
        examples, report = pf.examples, pf.report  # built by the pre-flight checks
    else:
        examples, report = build_examples(cfg.data, cfg.prompts, cfg.data.train_split,
                                          audio_token=processor.audio_token, seed=cfg.seed)
    if not examples:
        raise UserError(f"no training examples in split {cfg.data.train_split!r}: {report}")
    cache = None
    if cfg.data.feature_cache:
        from phi4mm_lora.data.cache import FeatureCache

        cache = FeatureCache(cfg.data.feature_cache, processor.audio_processor)
    collator = Collator(processor, padding_side=tc.padding_side, feature_cache=cache)
    lengths = [estimate_length(ex) for ex in examples]
    n_batches = math.ceil(len(examples) / tc.batch_size)
    spe = steps_per_epoch(n_batches, world, tc.grad_accum)
    if spe == 0:
        raise UserError(f"{len(examples)} examples make {n_batches} batches, fewer than processes x grad_accum "
                        f"({world} x {tc.grad_accum}); lower train.batch_size or train.grad_accum")
    total_steps = math.ceil(tc.epochs * spe)
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    n_epochs = math.ceil(total_steps / spe)
    if pf.state is not None and pf.state["global_step"] >= total_steps:
        from phi4mm_lora.train.preflight import NothingToDo

        raise NothingToDo(f"run {run_dir} already finished: {resume_from.name} is step {pf.state['global_step']} "
                          f"of {total_steps}; nothing changed. To train further, raise train.epochs or "
                          "train.max_steps (with --resume-with-changes)")

    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = get_scheduler(tc.scheduler, optimizer, num_warmup_steps=int(tc.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    # The scheduler is not prepared: accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    peft = accelerator.unwrap_model(model)
    setup_notes = distributed.check_setup(accelerator, tc.grad_accum)

    epoch0, step0, global_step = 0, 0, 0
    if resume_from is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        st = pf.state if pf.state is not None else ckpt.load_training_state(resume_from)
        adapter = resume_from / ckpt.ADAPTER_DIR
        try:
            if not distributed.load_trained(accelerator, model, peft, state.trainable_adapter, adapter):
                set_peft_model_state_dict(peft, load_file(str(adapter / "adapter_model.safetensors")),
                                          adapter_name=state.trainable_adapter)
                load_extra_modules(peft, adapter)
            distributed.load_optimizer_state(accelerator, model, optimizer, st["optimizer"], resume_from)
        except (RuntimeError, ValueError, KeyError) as exc:  # shapes or parameter groups differ
            raise UserError(f"checkpoint {resume_from} does not fit this model/adapter ({str(exc).splitlines()[0][:160]}); "
                            "resume with the settings it was saved with") from None
        scheduler.load_state_dict(st["scheduler"])
        for note in _apply_changed_schedule(optimizer, scheduler, tc, pf.changed):
            pf.notes.append(note)
        if st.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(st["scaler"])
        epoch0, step0, global_step = st["epoch"], st["step_in_epoch"], st["global_step"]
        ckpt.load_rng(resume_from, rank)
        say(f"resumed from {resume_from} (epoch {epoch0}, step {global_step})")

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = run_dir / "metrics.jsonl"
    if main:
        dump_config(cfg, run_dir / "config.yaml")
        if resume_from is None:
            metrics_file.write_text("")
        else:  # drop lines logged after the checkpoint we resume from (and a torn last line)
            kept, torn = read_metrics(metrics_file, global_step)
            pf.notes.extend(torn)
            _write_jsonl(metrics_file, [finite_row(r) for r in kept])
    trackers.start(accelerator, cfg, run_dir)  # train.report_to; the config as hyperparameters
    say(f"run {run_dir}: {len(examples)} examples, {spe} steps/epoch, {total_steps} steps, "
        f"{world} process(es) ({distributed.kind(accelerator)}), precision {loaded.plan.name}, trainable {n_trainable:,} params "
        f"({state.trainable_adapter}{' + ' + ', '.join(state.unfrozen_prefixes) if state.unfrozen_prefixes else ''})")
    for note in report.problems[:5]:
        say(f"data: skipped {note}")
    for note in setup_notes:
        say(f"warning: {note}")
    for note in pf.notes:
        say(f"note: {note}")

    def record(row: dict) -> None:
        if main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(finite_row(row), allow_nan=False) + "\n")

    last_ckpt: Path | None = resume_from

    def save_checkpoint(epoch: int, step_in_epoch: int) -> Path:
        final = run_dir / "checkpoints" / ckpt.checkpoint_name(global_step)
        tmp = ckpt.temp_dir_for(final)
        if main:
            ckpt.ensure_space(final, last_ckpt, n_trainable)
            ckpt.begin_atomic_dir(final)
        accelerator.wait_for_everyone()
        with ckpt.disk_full_guard(final, last_ckpt, n_trainable):
            _write_checkpoint(final, tmp, epoch, step_in_epoch)
        if main:
            ckpt.prune_checkpoints(run_dir, tc.keep_checkpoints)
        accelerator.wait_for_everyone()
        return final

    def _write_checkpoint(final: Path, tmp: Path, epoch: int, step_in_epoch: int) -> None:
        ckpt.save_rng(tmp, rank)
        # collectives: under FSDP/DeepSpeed every process helps gather the full tensors
        trained = distributed.gather_trained(accelerator, model, peft)
        optim_state = distributed.optimizer_state(accelerator, model, optimizer, tmp)
        accelerator.wait_for_everyone()
        if main:
            save_trained(peft, state, tmp / ckpt.ADAPTER_DIR, trained)
            torch.save({
                "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                "world_size": world, "config": cfg.model_dump(mode="json"), "total_steps": total_steps,
            }, tmp / ckpt.STATE_FILE)
            ckpt.finish_atomic_dir(tmp, final)

    last_eval_step: int | None = None

    def run_eval(epoch_value: float, when: str, step: int | None = None) -> None:
        """evaluate_fn on the main process, logged as eval/<key>; ``step`` marks a mid-epoch call."""
        nonlocal last_eval_step
        if main:
            model.eval()
            with torch.no_grad():
                extra = {} if step is None else {"step": step}
                result = dict(evaluate_fn(peft, processor, epoch_value, **extra))
            model.train()
            erow = {"type": "eval", "step": global_step, "epoch": epoch_value, **result}
            eval_rows.append(erow)
            record(erow)
            accelerator.log({f"eval/{k}": v for k, v in result.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=global_step)
            say(f"eval {when}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in result.items()))
        last_eval_step = global_step
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ train
    model.train()
    losses: list[float] = []
    eval_rows: list[dict] = []
    n_examples = n_tokens = 0
    t_loop = time.perf_counter()
    bar = tqdm(total=total_steps, initial=global_step, desc="train", unit="step", disable=not (main and progress),
               dynamic_ncols=True)
    for epoch in range(epoch0, n_epochs):
        plan = batch_plan(lengths, tc.batch_size, cfg.seed, epoch, tc.group_by_length)
        first = step0 if epoch == epoch0 else 0
        last = min(spe, first + total_steps - global_step)
        mine = [b for s in range(first, last) for b in rank_batches(plan, s, world, rank, tc.grad_accum)]
        loader = torch.utils.data.DataLoader(_MicroBatches(examples, mine, collator), batch_size=None,
                                             num_workers=tc.num_workers, collate_fn=lambda b: b,
                                             # own generator: iter() must not draw from the global RNG,
                                             # or a resumed run's dropout masks would drift from the original
                                             generator=torch.Generator().manual_seed(cfg.seed + epoch))
        it = iter(loader)
        for s in range(first, last):
            n_micro = len(rank_batches(plan, s, world, rank, tc.grad_accum))
            micro = [_to_device(next(it), accelerator.device) for _ in range(n_micro)]
            ids = [i for b in micro for i in b["example_ids"]]
            n_local = sum(loss_mod.count_label_tokens(b["labels"]) for b in micro)
            n_total = int(accelerator.reduce(torch.tensor(n_local, device=accelerator.device), "sum"))
            loss_sum = torch.zeros((), device=accelerator.device)
            for j, b in enumerate(micro):
                sync = nullcontext() if j == n_micro - 1 else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    part, _ = loss_mod.answer_loss_sum(model, b)
                    # DDP, FSDP and DeepSpeed average gradients over processes; * world undoes that.
                    accelerator.backward(part / max(n_total, 1) * world)
                loss_sum += part.detach().float()
            step_loss = float(accelerator.reduce(loss_sum, "sum")) / max(n_total, 1)
            if not math.isfinite(step_loss):
                where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
                raise TrainingDiverged(
                    f"loss is {step_loss} at step {global_step + 1} (epoch {epoch}); examples in this step: "
                    f"{', '.join(ids[:16])}{' ...' if len(ids) > 16 else ''}; {where}. Lower train.lr, "
                    "check these samples, or use another precision")
            grad_norm = None
            if tc.max_grad_norm is not None:
                grad_norm = distributed.grad_norm_value(accelerator.clip_grad_norm_(
                    distributed.clip_parameters(accelerator, model, params), tc.max_grad_norm))
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1

            step_examples = int(accelerator.reduce(torch.tensor(sum(len(b["example_ids"]) for b in micro),
                                                                device=accelerator.device), "sum"))
            step_tokens = int(accelerator.reduce(sum(b["attention_mask"].sum() for b in micro), "sum"))
            n_examples += step_examples
            n_tokens += step_tokens
            elapsed = time.perf_counter() - t_loop
            losses.append(step_loss)
            row = {"type": "train", "step": global_step, "epoch": epoch + (s + 1) / spe, "loss": step_loss,
                   "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "label_tokens": n_total,
                   "examples_per_s": n_examples / elapsed, "tokens_per_s": n_tokens / elapsed}
            record(row)
            accelerator.log({f"train/{k}": row[k] for k in ("loss", "lr", "grad_norm", "examples_per_s", "tokens_per_s")
                             if row[k] is not None}, step=global_step)
            bar.set_postfix(loss=f"{step_loss:.4f}", ex_s=f"{row['examples_per_s']:.2f}", refresh=False)
            bar.update(1)
            if global_step % tc.log_every_steps == 0 or global_step == total_steps:
                say(f"step {global_step}/{total_steps} epoch {row['epoch']:.2f} loss {step_loss:.4f} "
                    f"lr {row['lr']:.2e} {row['examples_per_s']:.2f} ex/s {row['tokens_per_s']:.0f} tok/s")
            if tc.save_every_steps and global_step % tc.save_every_steps == 0:
                last_ckpt = save_checkpoint(epoch, s + 1)
                say(f"checkpoint {last_ckpt}")
            every = cfg.eval.every_steps
            if (every and global_step % every == 0 and s + 1 < spe and evaluate_fn is not None
                    and cfg.eval.during_training and distributed.can_evaluate_on_main(accelerator)):
                run_eval(round(epoch + (s + 1) / spe, 4), f"at step {global_step}", step=global_step)

        epoch_done = last == spe
        if epoch_done:
            if tc.save_every_epoch and not (tc.save_every_steps and global_step % tc.save_every_steps == 0):
                last_ckpt = save_checkpoint(epoch + 1, 0)
                say(f"checkpoint {last_ckpt} (end of epoch {epoch + 1})")
            if evaluate_fn is not None and cfg.eval.during_training and not distributed.can_evaluate_on_main(accelerator):
                if epoch == epoch0:
                    say(f"warning: no evaluation during training under {distributed.kind(accelerator)} (the weights "
                        "are sharded; generating on one process would hang the others); evaluate a checkpoint "
                        "afterwards: phi4mm-lora evaluate --config CONFIG.yaml --adapter RUN/checkpoints/step-N/adapter")
            elif evaluate_fn is not None and cfg.eval.during_training and last_eval_step != global_step:
                run_eval(epoch + 1, f"after epoch {epoch + 1}")
        if global_step >= total_steps:
            break
    bar.close()

    # ------------------------------------------------------------------ cleanup
    adapter_dir = run_dir / "adapter"
    trained = distributed.gather_trained(accelerator, model, peft)  # collective
    if main:
        with ckpt.disk_full_guard(adapter_dir, last_ckpt, n_trainable):
            ckpt.write_atomic_dir(adapter_dir, lambda tmp: save_trained(peft, state, tmp, trained))
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - t_start
    loop_s = time.perf_counter() - t_loop
    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "adapter_dir": str(adapter_dir), "steps": global_step, "total_steps": total_steps,
        "epochs": global_step / spe, "processes": world, "precision": loaded.plan.name,
        "trainable_params": n_trainable, "train_examples": len(examples),
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "examples_per_s": n_examples / loop_s if loop_s > 0 else None,
        "tokens_per_s": n_tokens / loop_s if loop_s > 0 else None,
        "wall_s": wall, "peak_rss_mb": _peak_rss_mb(), "resumed_from": str(resume_from) if resume_from else None,
        "last_checkpoint": str(last_ckpt) if last_ckpt else None, "eval": eval_rows[-1] if eval_rows else None,
    }
    if main:
        summary["loss_curve"] = str(plot_losses(metrics_file, run_dir / "loss_curve.png", title=f"training loss - {run_dir.name}"))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        trackers.log_files(accelerator, [run_dir / "loss_curve.png", run_dir / "summary.json", metrics_file])
        trackers.finish(accelerator, cfg, summary)  # TensorBoard: the config as hparams with the final numbers
        say("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in summary.items() if k != "eval"))
    accelerator.end_training()
    return TrainResult(run_dir, adapter_dir, summary, losses)


__all__ = ["EvaluateFn", "enable_activation_checkpointing", "TrainResult", "TrainingDiverged", "plot_losses", "rank_batches", "steps_per_epoch", "train"]

