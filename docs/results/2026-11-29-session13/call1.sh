#!/usr/bin/env bash
# session 13 call 1: generate(fp8=True) against bf16 in the same processes, d30@1024 stable all compiled
set -u
out=$1; mkdir -p $out/r
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
GEN="--official-root .official/STAR --configs d30@1024 --samplers stable --cuda-graphs --skip-eager --skip-plain --compile-decoder --compile-head --compile-blocks --compile-text --only-all-compiled --fp8 --warmup 1"
(export CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_0
 timeout 560 python benchmarks/bench_generate.py $GEN --repeats 2 --batches 16 --json $out/r/b16.json > $out/r/b16.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_1
 timeout 330 python benchmarks/bench_generate.py $GEN --whole-graph --repeats 3 --batches 1 --json $out/r/b1.json > $out/r/b1.log 2>&1
 timeout 100 python benchmarks/check_fp8.py --json $out/r/check_fp8.json > $out/r/check_fp8.log 2>&1
 timeout 100 python benchmarks/bench_fp8.py --json $out/r/fp8.json > $out/r/fp8.log 2>&1) &
wait
date -u
for f in b16 b1; do echo "== $f"; grep -A12 "^### End-to-end" $out/r/$f.log | tail -8; grep -i "error\|Traceback" $out/r/$f.log | head -5; done
tail -22 $out/r/check_fp8.log; tail -13 $out/r/fp8.log
cd $out && tar czf r.tgz r && rm -rf r
