#!/bin/bash
# The GPU lease's commands on the GPU image's libraries, here on the CPU with the tiny model: what would
# fail on the image fails here first, before a 15-minute lease pays for it (docs/benchmarks.md,
# "The GPU image on a CPU").
#
#   bash scripts/image_check.sh [STEP...]     default: every step
#     dry      bench_gpu.py --dry-run (the harness of train and cudnn's training rows)
#     compile  the same with train.compile=true (`compile`)
#     pool     the same with grad_accum 2 pooled into one pass (`pool`)
#     convs    the same with --no-cudnn and train.pad_audio_to_multiple_of=80 (`convs`)
#     evaltrain the same with the paper config's evaluation during training (`evaltrain`)
#     eval     bench_eval.py --profile (`eval`)
#     score    `phi4mm-lora score` on one bundled recording, both tasks, bf16 (the lease's `score`)
#     scorelen bench_score.py, default path, eval.max_new_tokens=63 (`scorelen`)
#     scoremany the same and eval.compile=cudagraphs, then 6 other recordings once each (`scoremany`)
#     agree    bench_score.py fp32, 2 calls, dynamic static static+compile (`agree`)
#     cudnn    bench_score.py with model.sdpa_cudnn=true, the non-default (`cudnn`'s scoring rows)
#     full     bench_eval.py --cache-variants at eval.batch_size=auto, bf16 (`full`, `cache`)
#     full32   the same in fp32: the static cache and the compiled path must give the same answers
#     encoder  bench_eval.py --encoder-batches 1 16 (`encoder`)
#     compare  bench_eval.py --compare, merged vs unmerged, batch 1 vs 32 (`compare`)
#     parts    bench_train_cpu.py with the lease's `parts` arguments, on the CPU
#     attention bench_attention.py, small (`attention`)
#     train    the paper config's `train` for 3 steps on the tiny pretrained-speech-LoRA model
#
# The image: Python 3.12, torch 2.11.0 and torchvision 0.26.0 (CUDA builds; they run on the CPU), transformers
# 5.17.0, accelerate 1.15.0, and what such an image ships besides (shared/docs/gpu-measurements.md), in a venv
# built once at $IMG (about 5 GB, two minutes from PyPI). Over it, .whl/ is installed exactly as gpu_lease.sh
# installs it on the GPU, so a wheel missing from .whl/ fails here too. Without .whl/, it first downloads
# scripts/lease-wheels.txt into it (what `run` must carry).
set -u
cd "$(dirname "$0")/.."
IMG=${IMG:-/tmp/phi4mm-image}
py312() {  # the first that runs: $PY312, python3.12 on PATH, pyenv's 3.12 (its shim may not run it)
  for c in "${PY312:-}" python3.12 $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null); do
    [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$c"; return; }
  done
}
PY312=$(py312)
W=${W:-/tmp/phi4mm-image-run}
STEPS=${*:-dry compile pool convs evaltrain eval score scorelen scoremany agree cudnn full full32 encoder compare parts attention train}
if [ ! -d .whl ]; then  # the wheels gpu_lease.sh carries, for the image's Python 3.12 on x86-64 Linux
  echo "downloading the lease's wheels (scripts/lease-wheels.txt) into .whl/"
  PIP_CONFIG_FILE=/dev/null python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl -r scripts/lease-wheels.txt \
    || { rm -rf .whl; echo "error: downloading the lease's wheels failed"; exit 1; }
fi
[ -n "$PY312" ] || { echo "error: no python3.12 (the image's Python); set PY312=/path/to/python3.12"; exit 2; }
if [ ! -f "$IMG/.ok" ]; then
  echo "building the image's libraries at $IMG"
  "$PY312" -m venv "$IMG" && PIP_CONFIG_FILE=/dev/null "$IMG/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 \
    transformers==5.17.0 accelerate==1.15.0 tokenizers safetensors scipy matplotlib tensorboard rich tqdm pyyaml \
    && touch "$IMG/.ok" || { echo "error: building $IMG failed"; exit 1; }
fi
rm -rf "$W" && mkdir -p "$W/bin"
# gpu_lease.sh's own install line: --no-deps over the image, so the image's torch and transformers stay
"$IMG/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" .whl/*.whl \
  || { echo "error: installing .whl/ failed"; exit 1; }
printf '#!/bin/sh\nexec %s "$@"\n' "$IMG/bin/python" > "$W/bin/python3" && chmod +x "$W/bin/python3"
export PATH=$W/bin:$PATH PYTHONPATH=$W/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
  PHI4MM_LORA_CACHE=$W/cache TOKENIZERS_PARALLELISM=false
python3 -c "import sys, torch, torchvision, transformers, peft, accelerate, bitsandbytes as b; print('Python', sys.version.split()[0],
  'torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'peft',
  peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" 2>&1 | grep -v kernels
CK=$W/tiny PRE=$W/tiny-pretrained
python3 -m phi4mm_lora tiny "$CK" > /dev/null && python3 -m phi4mm_lora tiny --base pretrained "$PRE" > /dev/null \
  || { echo "error: writing the tiny models failed"; exit 1; }
AUDIO=src/phi4mm_lora/assets/corpus/WAVE/SPEAKER0003/000300001.flac
EVAL="python3 scripts/bench_eval.py --model $CK --splits test"
failed=0
step() {  # step NAME CMD...: output in $W/NAME.log, one line here
  local name=$1 t=$SECONDS; shift
  if timeout 900 "$@" > "$W/$name.log" 2>&1; then echo "$name: ok in $((SECONDS - t)) s"
  else echo "$name: FAILED (exit $?) in $((SECONDS - t)) s; the end of $W/$name.log:"; tail -n 8 "$W/$name.log"; failed=1; fi
}
for s in $STEPS; do case $s in
  dry) step dry python3 scripts/bench_gpu.py --dry-run --out "$W/bench-gpu" ;;
  compile) step compile python3 scripts/bench_gpu.py --dry-run --out "$W/bench-gpu-compile" --set train.compile=true ;;
  pool) step pool python3 scripts/bench_gpu.py --dry-run --out "$W/bench-gpu-pool" --accum 2 --set train.micro_batch=4 ;;
  convs) step convs python3 scripts/bench_gpu.py --dry-run --out "$W/bench-gpu-convs" --no-cudnn \
      --set train.pad_audio_to_multiple_of=80 ;;
  evaltrain) step evaltrain python3 scripts/bench_gpu.py --dry-run --out "$W/bench-gpu-eval" \
      --set eval.during_training=true --set eval.every_steps=2 ;;
  eval) step eval $EVAL --precision bf16 --batch-size 32 --limit 8 --profile --json "$W/eval.json" ;;
  score) step score python3 -m phi4mm_lora score --model "$CK" --precision bf16 \
      --text 'COW WATCH WEEK SING CLOSE TODAY HOME' "$AUDIO" ;;
  scorelen) step scorelen python3 scripts/bench_score.py --model "$CK" --precision bf16 --variants dynamic \
      --set eval.max_new_tokens=63 --json "$W/scorelen.json" ;;
  scoremany) step scoremany python3 scripts/bench_score.py --model "$CK" --precision bf16 \
      --variants dynamic static+cudagraphs --set eval.max_new_tokens=63 --recordings 6 --json "$W/scoremany.json" ;;
  agree) step agree python3 scripts/bench_score.py --model "$CK" --precision fp32 --repeat 2 \
      --variants dynamic static static+compile --json "$W/agree.json" ;;
  cudnn) step cudnn python3 scripts/bench_score.py --model "$CK" --precision bf16 --variants dynamic \
      --set model.sdpa_cudnn=true --json "$W/cudnn.json" ;;
  full) step full $EVAL --precision bf16 --utterances 12 --batch-size auto --cache-variants --json "$W/full.json" ;;
  full32) step full32 bash -c "$EVAL --precision fp32 --utterances 12 --batch-size auto --cache-variants \
      --json $W/full32.json && ! grep -q DIFFERENT $W/full32.log" ;;  # fp32: a different answer is a fault
  encoder) step encoder python3 scripts/bench_eval.py --model "$CK" --precision bf16 --splits train test --limit 16 \
      --batch-size auto --encoder-batches 1 16 --json "$W/encoder.json" ;;
  compare) step compare $EVAL --precision bf16 --batch-size 32 --limit 8 --compare --batch1-limit 2 --json "$W/compare.json" ;;
  parts) step parts python3 scripts/bench_train_cpu.py --steps 3 --warmup 1 --threads 0 --profile --count-casts \
      --json "$W/parts.json" model.path="$CK" model.device=cpu precision=bf16 adapter.mode=pretrained \
      adapter.base=speech adapter.trainable=lora ;;
  attention) step attention python3 scripts/bench_attention.py --batch 2 --keys 50 --json "$W/attention.json" ;;
  train) step train python3 -m phi4mm_lora train configs/pronunciation-paper.yaml \
      data.path=src/phi4mm_lora/assets/corpus model.path="$PRE" output_dir="$W/run" train.max_steps=3 \
      train.batch_size=2 train.grad_accum=1 train.save_every_steps=null eval.during_training=false ;;
  *) echo "error: unknown step: $s"; exit 2 ;;
esac; done
[ $failed = 0 ] && echo "every step ran on the image's libraries" || echo "some steps FAILED: fix them before a lease"
exit $failed
