"""CLI: ``train``, ``validate``, ``bench train`` and ``demo``.

``train CONFIG.yaml [key=value ...] [--resume [DIR]]`` runs the recipe in
:mod:`phi4mm_lora.train.finetune` (wrap it in ``accelerate launch`` for several processes);
``validate`` shows the resolved config or every problem at once (exit 2); ``demo`` is the
README's first job: the tiny model learns the bundled corpus on CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

#: Embedded copy of configs/demo.yaml, so ``phi4mm-lora demo`` works from an installed
#: package with no repository checkout (a test keeps both identical).
DEMO_YAML = r"""# Demo: fine-tune the tiny model on the bundled generated corpus (APA + MDD) on CPU.
#   phi4mm-lora demo                      (this file, embedded in the package)
#   phi4mm-lora train configs/demo.yaml   (the same run, by hand)
# It shows learning, not skill. The base is the tiny model whose decoder was pretrained on
# generated text and speech to copy a quote and spell it as phones (never JSON; see README and
# model/tiny_base.py). Fine-tuning teaches it the answer format and the trained-on recordings'
# labels; it cannot teach it to hear pronunciation.
output_dir: runs/demo
seed: 1               # measured: seeds 0, 1, 2 parse 84%, 100%, 94% of all answers (docs/benchmarks.md)
precision: fp32
model:
  path: null            # empty: the tiny Phi-4-multimodal (real architecture, toy width)
  tiny: pretrained      # its decoder pretrained to copy and spell (random: the tests' model)
  device: cpu
adapter:
  mode: fresh           # a new LoRA (the tiny model's "pretrained" speech LoRA is random)
  r: 32
  alpha: 64
  dropout: 0.0
  # decoder linears + lm_head: the JSON tokens' output embeddings are the random tiny model's
  # (pretraining never wrote JSON), so the output head must learn them; the real model does not need this
  target_modules: (model\.layers\.\d+\.((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj)))|lm_head
  trainable: unfreeze   # LoRA + audio encoder + audio projector (the paper's Unfreeze strategy)
prompts:
  apa: short            # two-line instructions: the toy model does not learn to read the
  mdd: short            # 600-token rubric in minutes (the real model gets the default)
data:
  path: null            # empty: the bundled generated corpus (Speechocean762 layout)
  task: both
  limit: 32             # utterances (x2 tasks = 64 examples), seen 20 times each
train:
  epochs: 20
  batch_size: 4
  grad_accum: 1
  lr: 0.003
  scheduler: cosine
  warmup_ratio: 0.05
  max_grad_norm: null
  micro_batch: 4         # explicit, so CPU and GPU runs take the same path
  gradient_checkpointing: none
  group_by_length: true
  log_every_steps: 40
  save_every_steps: null
  save_every_epoch: false   # 20 sixteen-step epochs: checkpointing each would cost more than it saves
eval:
  during_training: false
  max_new_tokens: 96    # the longest answer of the bundled corpus is 75 tokens
"""


#: ``bench train`` variants (train.bench.VARIANTS; a test keeps both equal).
BENCH_VARIANTS = ("baseline", "pipeline", "pipeline+gc")


def _summary_line(summary: dict) -> str:
    keys = ("steps", "first_loss", "final_loss", "examples_per_s", "tokens_per_s", "wall_s", "peak_rss_mb")
    return ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}"
                     for k in keys)


def cmd_train(args: argparse.Namespace) -> int:
    """Train from a YAML config; ``--resume`` continues the latest (or a given) checkpoint."""
    from phi4mm_lora.config import load_config
    from phi4mm_lora.train import train

    cfg = load_config(args.config, args.overrides)
    evaluate_fn = None
    if cfg.eval.during_training:
        from phi4mm_lora.evaluate.run import make_epoch_evaluator

        evaluate_fn = make_epoch_evaluator(cfg)
    result = train(cfg, evaluate_fn=evaluate_fn, resume=args.resume, resume_with_changes=args.resume_with_changes,
                   config_file=args.config, progress=not args.no_progress)
    if "loss_curve" in result.summary:  # only the main process writes (and reports) the run files
        print(f"adapter: {result.adapter_dir}")
        print(f"loss curve: {result.summary['loss_curve']}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Print the resolved config after the checks ``train`` runs before loading a model (a
    UserError with all problems becomes exit 2 in main), so "config OK" means training starts."""
    import yaml

    from phi4mm_lora.config import load_config
    from phi4mm_lora.train.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    pf = preflight(cfg, config_file=args.config, resume=args.resume, resume_with_changes=args.resume_with_changes)
    for note in pf.notes:
        print(f"note: {note}")
    problems = pf.report.problems if pf.report is not None else []
    for p in problems[:5]:
        print(f"data: skipped {p}")
    if len(problems) > 5:
        print(f"data: ... and {len(problems) - 5} more skipped")
    print(f"config OK: {len(pf.examples or [])} training examples"
          + (f", resumes {pf.resume_from}" if pf.resume_from else ""))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from phi4mm_lora.train.bench import run_cli

    return run_cli(args)


def demo(args: argparse.Namespace) -> int:
    """The demo: config -> evaluate untrained -> train -> evaluate trained -> where to look."""
    from rich.console import Console

    from phi4mm_lora.config import load_config
    from phi4mm_lora.demo import learning_rows, render_learning_table, run_demo

    out = Path(args.output or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "demo.yaml"
    cfg_file.write_text(DEMO_YAML)
    cfg = load_config(cfg_file, [f"output_dir={out}", *(args.overrides or [])])
    print(f"demo: training the tiny model on the bundled corpus (APA + MDD) into {out}")
    res = run_demo(cfg, out, args.eval_limit, progress=not args.no_progress)
    Console().print(render_learning_table(learning_rows(res.before, res.after)))
    print(f"summary: {out / 'demo.md'}; evaluation reports: {out / 'eval-train-after' / 'report.md'}, "
          f"{out / 'eval-after' / 'report.md'}")
    print(f"demo finished in {res.seconds:.0f} s: {_summary_line(res.train_summary)}")
    print(f"loss curve: {res.train_summary['loss_curve']}")
    print(f"adapter: {res.adapter_dir}")
    print(f"metrics: {res.run_dir / 'metrics.jsonl'}  (tensorboard --logdir {res.run_dir / 'tensorboard'})")
    return 0


def _resume_flags(p: argparse.ArgumentParser, resume: bool = True) -> None:
    if resume:
        p.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                       help="continue the latest complete checkpoint of output_dir, or the checkpoint/run DIR")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="resume although settings changed that alter the data order or the schedule (batch size, "
                   "data, seed, lr, ...); they apply from the checkpoint on. Adapter shape changes stay refused")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``validate``, ``bench train`` and ``demo``."""
    t = subparsers.add_parser(
        "train", help="fine-tune with a run config (accelerate launch for several processes)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune Phi-4-multimodal with LoRA as the run config says; writes the run folder\n"
        "(output_dir): config.yaml, metrics.jsonl, tensorboard/, loss_curve.png, summary.json,\n"
        "checkpoints/step-N/ (newest train.keep_checkpoints kept) and the trained adapter/.",
        epilog="examples:\n"
        "  phi4mm-lora train configs/demo.yaml train.epochs=1\n"
        "  phi4mm-lora train configs/pronunciation-paper.yaml data.path=/data/speechocean762\n"
        "  phi4mm-lora train configs/pronunciation-paper.yaml data.path=... --resume\n"
        "  phi4mm-lora train CONFIG --resume --resume-with-changes train.epochs=5   (train a finished run further)\n"
        "  accelerate launch --num_processes 4 -m phi4mm_lora train configs/pronunciation-paper.yaml ...\n"
        "  accelerate launch --config_file configs/accelerate/fsdp.yaml -m phi4mm_lora train CONFIG ...\n"
        "  torchrun --nproc_per_node 2 -m phi4mm_lora train CONFIG model.device=cpu   (several CPU processes)\n"
        "Check a config first with: phi4mm-lora validate CONFIG [key=value ...]",
    )
    t.add_argument("config", help="run config YAML (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.lr=1e-4 train.max_steps=10")
    _resume_flags(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    t.set_defaults(handler=cmd_train)

    v = subparsers.add_parser(
        "validate", help="check a run config as train would before loading the model; every problem at once (exit 2)",
        description="Show the resolved run config and run every check train runs before it loads the model: "
        "config values, REQUIRED keys, output folder, model folder, data (layout and every audio file) and, "
        "with --resume, the checkpoint. 'config OK' means training will start.",
        epilog="Every key, with type, default and meaning: phi4mm-lora config show [SECTION]")
    v.add_argument("config", help="run config YAML")
    v.add_argument("overrides", nargs="*", metavar="key=value")
    v.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="check the checkpoint train --resume would continue")
    _resume_flags(v, resume=False)
    v.set_defaults(handler=cmd_validate, light=True)

    b = subparsers.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bt = bsub.add_parser("train", help="training-step throughput and peak memory vs a full-logits baseline")
    # the arguments live here, not in train.bench: importing that module imports torch, and
    # building the parser must stay fast (``phi4mm-lora --help`` in well under a second)
    bt.add_argument("--layers", type=int, default=2, help="decoder layers of the benchmark model (default 2)")
    bt.add_argument("--steps", type=int, default=1, help="timed optimizer steps per variant (default 1)")
    bt.add_argument("--variants", default=",".join(BENCH_VARIANTS), help=f"comma list of {', '.join(BENCH_VARIANTS)}")
    bt.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    bt.set_defaults(handler=cmd_bench_train)

    d = subparsers.add_parser("demo", help="train the tiny model on the bundled corpus on CPU and show what it learnt (a few minutes)")
    d.add_argument("--output", metavar="DIR", help="run folder (default runs/demo-<time>)")
    d.add_argument("--eval-limit", type=int, default=8, metavar="N",
                   help="held-out (test-split) utterances scored before and after training (x2 tasks; default 8); "
                   "the trained-on utterances are scored too")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo config")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(handler=demo)


__all__ = ["DEMO_YAML", "cmd_train", "cmd_validate", "demo", "register"]

