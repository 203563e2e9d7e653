#!/usr/bin/env bash
# The speed measurements of issues 2 and 7 (docs/performance.md), stage by stage, a few stages per GPU call
# (a call runs 10 min at most; the default stages take ~9 min on an H200):
#   bash benchmarks/speed_suite.sh $OUT                # on the device machine, carrying .whl and .official:
#     d=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --target $d .whl/*.whl \
#       && export PYTHONPATH=$d:$PWD && bash benchmarks/speed_suite.sh $OUT
#   TINY=1 bash benchmarks/speed_suite.sh /tmp/suite   # CPU smoke run of the same commands (tiny models)
# Stages (each under its own time limit, logs and JSON in the output folder, the tables printed last):
#   check     : benchmarks/check_gpu_paths.py: the compiled inference paths give the eager results (limit 150 s)
#   train     : compiled training blocks + VQ encoder against eager and the official trainer, d16 @256
#   train_d30 : the same at d30 @256 without the official rows (not in the default list)
#   train_images : d16 @256 compiled, images encoded inside the step, and the official trainer (not in the default list)
#   train_1024 : d30 @1024 FlexAttention, eager and compiled at batch 32, and the official trainer (not in the default list)
#   generate_small : d16 @256 and d30 @512 generation with CUDA graphs, both samplers, against the official code
#               (not in the default list)
#   train_tokens : d16 @256 on pre-tokenized batches (TokenizedDataModule), compiled with the compiled CLIP, and the
#               official trainer
#   tokenizer : the 1024 px tokenizer, compiled (TOKENIZER_VARIANTS=compile_max: max-autotune, >200 s), against VAR
#   generate  : d30 @1024 stable generation with CUDA graphs, the compiled decoder, the compiled sampler head and
#               the compiled block regions (generate(compile_blocks=True)), against the official code
#   attention : benchmarks/bench_attention.py, the SDPA/Flex kernels at starkit's shapes (not in the default list)
#   syncs     : benchmarks/find_syncs.py, host synchronisations of a d16 @256 step and generation (not in the default list)
#   fp8       : benchmarks/bench_fp8.py, FP8 against bf16 for d30's linear layers, then benchmarks/check_fp8.py (the
#               accuracy of generate(fp8=True) and its Triton kernel) (not in the default list)
#   profile   : benchmarks/profile_generate.py --per-scale of PROFILE_CASES (default d16@256:parallel:1, the
#               question of the sixth comparison) with graphs and every compiled path (not in the default list)
#   layouts   : benchmarks/bench_attention_layouts.py --dynamic, the self-attention step's memory layouts (not in the
#               default list)
#   kernels   : benchmarks/bench_kernels.py, fc1 with GELU in the epilogue and the decoder's conv_out as tap_conv3x3
#               against what they replaced (not in the default list)
#   multigpu  : on a machine with 2+ GPUs (nvidia-h200-x2): the 2-GPU FSDP test, then benchmarks/bench_multigpu.py
#               d30 @256 (single, DDP, FSDP; 6 min on 2 H200s); MULTIGPU_CONFIGS=d30@1024 in a second call (token dropping,
#               batch 8 per GPU; ~7.5 min with the test): run it alone (not in the default list)
# Pick stages with STAGES="train tokenizer" (default: check generate, 510 s of limits: a device call runs 600 s at
# most, so keep the sum of the chosen stages' limits below that); *_LIMIT variables set time limits.
# Narrower runs: T1024_COMPILE=on (compiled rows only), SMALL_CONFIGS=d16@256, SMALL_ARGS / GENERATE_ARGS add
# bench_generate.py options (e.g. --only-all-compiled: no row per compiled path alone).
set -uo pipefail
out=${1:?usage: speed_suite.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.." || exit 1  # .official/ is looked up in the repository root
stages=${STAGES:-check generate}
tiny=()
[ -n "${TINY:-}" ] && tiny=(--tiny --text random)
export PYTHONUNBUFFERED=1

run() {  # run NAME SECONDS COMMAND...: output to $out/NAME.log, never fails the suite
  local name=$1 limit=$2
  shift 2
  echo "[suite $(date -u +%H:%M:%S)] $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?  # (read before the date below resets $?; 124 = stopped at the limit)
  echo "[suite $(date -u +%H:%M:%S)] $name exit $rc"
}

official_star=()
[ -d .official/STAR ] && official_star=(--official-root .official/STAR)
for stage in $stages; do
  case $stage in
    train)
      run train_d16 170 python "$here/bench_train.py" "${official_star[@]}" "${tiny[@]}" --configs d16@256 \
        --compile off,on --search 64,128 --steps 4 --warmup 2 --profile-dir "$out/prof" --json "$out/train_d16.json"
      ;;
    train_tokens)
      run train_tokens "${TOKENS_LIMIT:-170}" python "$here/bench_train.py" "${official_star[@]}" "${tiny[@]}" \
        --configs d16@256 --compile "${TOKENS_COMPILE:-on}" --search 64,128 --pretokenized --compile-text --steps 4 --warmup 2 \
        --json "$out/train_tokens.json" ;;
    train_d30)
      run train_d30 150 python "$here/bench_train.py" "${tiny[@]}" --configs d30@256 --compile off,on --search 32 \
        --steps 4 --warmup 2 --json "$out/train_d30.json" ;;
    check)
      check_args=()
      [ -n "${TINY:-}" ] && check_args=(--tiny)
      run check "${CHECK_LIMIT:-150}" python "$here/check_gpu_paths.py" "${check_args[@]}" ;;
    train_images)
      run train_images "${IMAGES_LIMIT:-200}" python "$here/bench_train.py" "${official_star[@]}" "${tiny[@]}" \
        --configs d16@256 --compile on --search 64,128 --steps 4 --warmup 2 --json "$out/train_images.json" ;;
    train_1024)
      run train_1024 "${T1024_LIMIT:-420}" python "$here/bench_train.py" "${official_star[@]}" "${tiny[@]}" \
        --configs d30@1024 --attentions flex --compile "${T1024_COMPILE:-off,on}" --search "${T1024_BATCH:-2,32}" --steps 3 --warmup 1 \
        --json "$out/train_1024.json" ;;
    generate_small)
      run generate_small "${SMALL_LIMIT:-300}" python "$here/bench_generate.py" "${official_star[@]}" "${tiny[@]}" \
        --configs "${SMALL_CONFIGS:-d16@256,d30@512}" --cuda-graphs --skip-eager --compile-decoder --compile-blocks --compile-text --warmup 2 --repeats 3 \
        ${SMALL_ARGS:-} --json "$out/generate_small.json" ;;
    tokenizer)
      tok_args=(--official-root .official/VAR --variants "${TOKENIZER_VARIANTS:-compile}" --resolutions 1024 --skip-train
                --warmup 2 --repeats 6 --json "$out/tokenizer.json")
      [ -n "${TINY:-}" ] && tok_args=(--tiny --official-root .official/VAR --skip-train --json "$out/tokenizer.json")
      run tokenizer "${TOKENIZER_LIMIT:-150}" python "$here/bench_tokenizer.py" "${tok_args[@]}" ;;
    generate)
      run generate_1024 "${GENERATE_LIMIT:-360}" python "$here/bench_generate.py" "${official_star[@]}" "${tiny[@]}" \
        --configs d30@1024 --cuda-graphs --skip-eager --compile-decoder --compile-head --compile-blocks --compile-text \
        --samplers stable --warmup 1 --repeats 2 ${GENERATE_ARGS:-} --json "$out/generate_1024.json" ;;
    attention)
      attention_args=(--json "$out/attention.json")
      [ -n "${TINY:-}" ] && attention_args+=(--tiny)
      run attention "${ATTENTION_LIMIT:-200}" python "$here/bench_attention.py" "${attention_args[@]}" ;;
    syncs)
      run syncs "${SYNCS_LIMIT:-120}" python "$here/find_syncs.py" --config d16@256 --batch 8 ;;
    fp8)
      fp8_args=(--json "$out/fp8.json")
      [ -n "${TINY:-}" ] && fp8_args+=(--tiny)
      run fp8 "${FP8_LIMIT:-120}" python "$here/bench_fp8.py" "${fp8_args[@]}"
      check_args=(--json "$out/check_fp8.json")
      [ -n "${TINY:-}" ] && check_args+=(--tiny --config d16@256)
      run check_fp8 "${CHECK_FP8_LIMIT:-120}" python "$here/check_fp8.py" "${check_args[@]}" ;;
    kernels)
      kernels_args=(--small-rows --json "$out/kernels.json")
      [ -n "${TINY:-}" ] && kernels_args+=(--tiny)
      run kernels "${KERNELS_LIMIT:-90}" python "$here/bench_kernels.py" "${kernels_args[@]}" ;;
    profile)
      profile_args=(--cases "${PROFILE_CASES:-d16@256:parallel:1}" --cuda-graphs --compile-decoder --compile-blocks
                    --compile-text --per-scale ${PROFILE_ARGS:-})
      [ -n "${TINY:-}" ] && profile_args+=(--tiny --text random --no-kernels --warmup 1 --repeats 1)
      run profile "${PROFILE_LIMIT:-200}" python "$here/profile_generate.py" "${profile_args[@]}" ;;
    layouts)
      layouts_args=(--dynamic --json "$out/layouts.json")
      [ -n "${TINY:-}" ] && layouts_args+=(--tiny)
      run layouts "${LAYOUTS_LIMIT:-150}" python "$here/bench_attention_layouts.py" "${layouts_args[@]}" ;;
    multigpu)
      if [ -n "${TINY:-}" ]; then
        run multigpu "${MULTIGPU_LIMIT:-300}" python "$here/bench_multigpu.py" --tiny --gpus 2 --out "$out/multigpu.json"
      else
        run multigpu_fsdp_test 150 python -m pytest -q tests/test_multigpu.py -k "fsdp_two_gpus or per_block"
        run multigpu "${MULTIGPU_LIMIT:-400}" python "$here/bench_multigpu.py" --configs "${MULTIGPU_CONFIGS:-d30@256}" \
          --steps 5 --warmup 2 --timeout 140 --out "$out/multigpu.json"
      fi ;;
    *) echo "unknown stage $stage (check, train, train_d30, train_tokens, train_images, train_1024, tokenizer, generate," \
            "generate_small, attention, syncs, fp8, kernels, layouts, profile, multigpu)" >&2 ;;
  esac
done
echo
for log in "$out"/*.log; do
  echo "== $(basename "$log")"
  grep -E '^\||^- |^### |^variants' "$log" | tail -40
done
