#!/usr/bin/env bash
# session 13 call 3: Inductor multi_kernel (1: persistent vs looped reductions benchmarked; 2: persistent forced) in the inference regions, d30@1024 stable b16 bf16 + fp8
set -u
out=$1; mkdir -p $out/r
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
GEN="--configs d30@1024 --samplers stable --cuda-graphs --skip-eager --skip-plain --compile-decoder --compile-head --compile-blocks --compile-text --only-all-compiled --fp8 --warmup 1 --repeats 2 --batches 16"
(export CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_0
 timeout 560 python benchmarks/bench_generate.py $GEN --official-root .official/STAR --inductor-option triton.multi_kernel=1 --json $out/r/b16_mk1.json > $out/r/b16_mk1.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_1
 timeout 560 python benchmarks/bench_generate.py $GEN --inductor-option triton.multi_kernel=2 --json $out/r/b16_mk2.json > $out/r/b16_mk2.log 2>&1) &
wait
date -u
for f in b16_mk1 b16_mk2; do echo "== $f"; grep -A12 "^### End-to-end" $out/r/$f.log | tail -4; grep -i "error\|Traceback" $out/r/$f.log | head -5; done
cd $out && tar czf r.tgz r && rm -rf r
