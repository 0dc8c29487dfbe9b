#!/bin/bash
# Every GPU measurement of issues 10 and 11, for one short GPU lease (docs/benchmarks.md, "GPU lease").
#
#   bash scripts/gpu_lease.sh STEP...      steps, in the order given:
#     ckpt     write the random full-size checkpoint to /tmp/full (skipped when it is there; ~30 s)
#     train    bench_gpu.py: the earlier table's rows + bf16 batch 1 + auto (~45 s a row, 7 rows)
#     eval     bench_eval.py: test split, 50 utterances x 2 tasks, batch 32, merged, + profile (~100 s)
#     compile  bench_gpu.py with train.compile=true: bf16 batch 8 and batch 1 without checkpointing, then batch 8 with
#              (each row compiles in its own process: about 2 min a row on an H200, so 400 s holds two rows)
#     parts    bench_train_cpu.py on the GPU: a step split into parts, syncs, profiles of a batch-8 and a batch-1
#              step, and LoRA inputs as-is vs PEFT's fp32 cast timed in one process (--count-casts) (~60 s)
#     score    `phi4mm-lora score` on one 5.0 s bundled recording, both tasks: prints the time; then bench_score.py:
#              the same recording 3 times per variant, dynamic vs static vs static+compile, cold and warm, and
#              where each variant's answers part from the baseline's (~220 s: compiles)
#     scorelen bench_score.py, the default path (dynamic cache, bf16), eval.max_new_tokens=63: decoding stops where a
#              trained model would on this recording (its MDD answer is 63 tokens with <|end|>, its APA answer 21);
#              the forced budgets of `score` (120 shared steps) are a random model's, which never stops (~40 s)
#     scoremany bench_score.py, eval.max_new_tokens=63, the default path and eval.compile=cudagraphs (the eager kernels
#              replayed as CUDA graphs: where its answers part, first call, warm), then per variant the 6 longest
#              other bundled recordings (4.4-5.9 s) once each: a new audio length per request, as a service (~120 s)
#     agree    bench_score.py in fp32, 2 calls per variant: where rounding is ~1e-6, whether the compiled
#              path computes what the eager one does (bf16 alone cannot tell a subtle fault) (~200 s)
#     compare  bench_eval.py --compare: unmerged vs merged, batch 1 vs 32 (~90 s)
#     cache    bench_eval.py --cache-variants: dynamic vs static vs static+compile (minutes: compiles)
#     attention bench_attention.py: one decoding step's attention, repeat_kv vs kv heads, batch 32 and 8 (~10 s)
#     evaltrain bench_gpu.py, bf16 batch 8 auto, with the paper config's evaluation during training after the 10
#              timed steps: its seconds and share of an epoch (issue 11: at most 10%) (~90 s)
#     pool     bench_gpu.py, bf16, 8 x grad_accum 8 (the paper's step): micro-batch 8 (8 passes), then the step
#              pooled into passes of 16 (none) and 64 (full checkpointing) (~150 s)
#     convs    bench_gpu.py, bf16 without checkpointing, batch 8 then batch 1: cuDNN on, then --no-cudnn, then cuDNN on
#              with train.pad_audio_to_multiple_of=80: whether the audio encoder's per-shape cuDNN convolution plans
#              are the fixed cost of a step, and whether fewer audio shapes remove it (~300 s)
#     auto     bench_eval.py on train + test (~150 utterances x 2 tasks), batch 32 then eval.batch_size=auto,
#              the same examples: fewer, larger batches on a host-bound step (~150 s)
#     cudnn    model.sdpa_cudnn=true, then false (PyTorch's cuDNN attention builds plans per new shape): per
#              setting, one recording scored 3 times (cold, warm); then bench_gpu bf16 batch 8 without
#              checkpointing, 10 steps, with cuDNN, without, and with cuDNN and train.pad_to_multiple_of=64
#              (fewer distinct shapes) (~220 s)
#     encoder  bench_eval.py --encoder-batches 1 16 on train + test at eval.batch_size=auto: recordings encoded
#              alone vs 16 at a time (exact; preparation was a third of evaluation at batch 256) (~120 s)
#     full     bench_eval.py --cache-variants on 256 test utterances x 2 tasks (repeated recordings) at
#              eval.batch_size=auto: full batches, dynamic vs static vs static+compile (~300 s: compiles)
#
# The limits add up to more than one 15-minute lease: pick by issue (docs/benchmarks.md, "The next lease"), e.g.
# `ckpt scoremany full`, then `convs parts pool`.
# Needs: the project's missing packages as wheels in .whl/ (scripts/lease-wheels.txt; scripts/image_check.sh downloads
# them and runs these commands on the image's libraries on a CPU first; carry .whl).
# Results: small files only (logs, JSON, markdown) in $OUT/res.tgz, re-packed after every step, so
# a call that runs out of time still returns what finished. Each step has its own time limit.
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
RES=/tmp/res
CK=/tmp/full
mkdir -p "$OUT" "$RES"
log() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
pack() { (cd /tmp && find res -type f \( -name '*.log' -o -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.txt' \) \
  -size -2M | tar czf "$OUT/res.tgz" -T -); }
if [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.ok || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
  PHI4MM_LORA_CACHE=/tmp/cache TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, transformers, peft, accelerate, bitsandbytes as b; print(sys.version.split()[0],
    'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
    'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)"
} > "$RES/env.txt" 2>&1
cat "$RES/env.txt"
run() {  # run NAME LIMIT CMD...: output to $RES/NAME.log, its end on stdout, then pack
  local name=$1 limit=$2; shift 2
  log "start $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  log "end $name: exit $?"; grep -v "Loading weights\|Writing model" "$RES/$name.log" | tail -n 45; pack
}
EVAL="python3 scripts/bench_eval.py --model $CK --precision bf16 --splits test --batch-size 32"
for step in "$@"; do case $step in
  ckpt) [ -f $CK/config.json ] || run ckpt 120 python3 -c "
import sys, time; sys.path.insert(0, 'scripts'); from pathlib import Path; from bench_precision import write_full_size
t = time.time(); write_full_size(Path('$CK')); print(f'wrote a random full-size checkpoint in {time.time() - t:.1f} s')" ;;
  train) run train 360 python3 scripts/bench_gpu.py --checkpoint $CK --steps 10 --warmup 3 --out $RES/bench-gpu \
      --rows bf16:8:full,bf16:8:none,selective:1:full,selective:8:full,nf4:8:full,bf16:1:none,bf16:8:auto ;;
  compile) run compile 400 python3 scripts/bench_gpu.py --checkpoint $CK --steps 12 --warmup 5 \
      --out $RES/bench-gpu-compile --set train.compile=true --rows bf16:8:none,bf16:1:none,bf16:8:full ;;
  eval) run eval 150 $EVAL --limit 50 --profile --json $RES/eval.json ;;
  parts) run parts 150 python3 scripts/bench_train_cpu.py --steps 4 --warmup 1 --threads 0 --profile --count-casts \
      --json $RES/parts.json model.path=$CK model.device=cuda precision=bf16 adapter.mode=pretrained \
      adapter.base=speech adapter.trainable=lora ;;
  score) run score 300 bash -c "python3 -m phi4mm_lora score --model $CK --precision bf16 \
      --text 'COW WATCH WEEK SING CLOSE TODAY HOME' src/phi4mm_lora/assets/corpus/WAVE/SPEAKER0003/000300001.flac &&
      python3 scripts/bench_score.py --model $CK --precision bf16 --variants dynamic static static+compile \
      --json $RES/score.json" ;;
  scorelen) run scorelen 150 python3 scripts/bench_score.py --model $CK --precision bf16 --variants dynamic \
      --set eval.max_new_tokens=63 --json $RES/scorelen.json ;;
  scoremany) run scoremany 240 python3 scripts/bench_score.py --model $CK --precision bf16 \
      --variants dynamic static+cudagraphs --set eval.max_new_tokens=63 --recordings 6 --json $RES/scoremany.json ;;
  agree) run agree 300 python3 scripts/bench_score.py --model $CK --precision fp32 --repeat 2 \
      --variants dynamic static static+compile --json $RES/agree.json ;;
  compare) run compare 150 $EVAL --limit 32 --compare --batch1-limit 2 --json $RES/compare.json ;;
  cache) run cache 240 $EVAL --limit 32 --cache-variants --json $RES/cache.json ;;
  attention) run attention 60 bash -c "python3 scripts/bench_attention.py --json $RES/attention-b32.json &&
      python3 scripts/bench_attention.py --batch 8 --keys 500 --json $RES/attention-b8.json" ;;
  evaltrain) run evaltrain 180 python3 scripts/bench_gpu.py --checkpoint $CK --steps 10 --warmup 3 \
      --out $RES/bench-gpu-eval --rows bf16:8:auto --set eval.during_training=true --set eval.every_steps=10 ;;
  pool) run pool 240 bash -c "for m in 8:none 16:none 64:full; do python3 scripts/bench_gpu.py --checkpoint $CK \
      --accum 8 --steps 3 --warmup 1 --out $RES/bench-gpu-pool-\${m%%:*} --rows bf16:8:\${m##*:} \
      --set train.micro_batch=\${m%%:*}; done" ;;
  convs) run convs 330 bash -c "for c in cudnn no-cudnn pad80; do python3 scripts/bench_gpu.py --checkpoint $CK \
      --steps 10 --warmup 3 --out $RES/convs-\$c --rows bf16:8:none,bf16:1:none \$([ \$c = no-cudnn ] && echo --no-cudnn) \
      \$([ \$c = pad80 ] && echo --set train.pad_audio_to_multiple_of=80); done" ;;
  auto) run auto 240 bash -c "python3 scripts/bench_eval.py --model $CK --precision bf16 --splits train test \
      --batch-size 32 --json $RES/auto-b32.json && python3 scripts/bench_eval.py --model $CK --precision bf16 \
      --splits train test --batch-size auto --json $RES/auto.json" ;;
  cudnn) run cudnn 300 bash -c "for f in true false; do
      python3 scripts/bench_score.py --model $CK --precision bf16 --variants dynamic --set model.sdpa_cudnn=\$f \
        --json $RES/cudnn-\$f-score.json; done;
      for s in model.sdpa_cudnn=true model.sdpa_cudnn=false train.pad_to_multiple_of=64; do
      python3 scripts/bench_gpu.py --checkpoint $CK --steps 10 --warmup 3 --out $RES/cudnn-train-\${s//[.=]/-} \
        --rows bf16:8:none --set \$s; done" ;;
  encoder) run encoder 180 python3 scripts/bench_eval.py --model $CK --precision bf16 --splits train test \
      --batch-size auto --encoder-batches 1 16 --json $RES/encoder.json ;;
  full) run full 420 python3 scripts/bench_eval.py --model $CK --precision bf16 --splits test --utterances 256 \
      --batch-size auto --cache-variants --json $RES/full.json ;;
  *) echo "unknown step: $step"; exit 2 ;;
esac; done
log "done"; pack
