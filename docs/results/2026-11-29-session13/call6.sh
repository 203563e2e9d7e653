#!/usr/bin/env bash
# session 13 call 6: library defaults (no Inductor options): d30@1024 b16 bf16/fp8 vs official (GPU 0); d30@512 / d16@256 b1 parallel bf16/fp8 vs official (GPU 1)
set -u
out=$1; mkdir -p $out/r
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
C="--official-root .official/STAR --samplers stable --cuda-graphs --skip-eager --skip-plain --compile-decoder --compile-head --compile-blocks --compile-text --only-all-compiled --fp8 --warmup 1"
(export CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/ind6_0
 timeout 330 python benchmarks/bench_generate.py $C --configs d30@1024 --repeats 3 --batches 16 --json $out/r/b16.json > $out/r/b16.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind6_1
 for c in d30@512 d16@256; do timeout 160 python benchmarks/bench_generate.py $C --configs $c --samplers parallel --whole-graph --repeats 5 --batches 1 --json $out/r/b1_$c.json > $out/r/b1_$c.log 2>&1; done) &
wait
date -u
for f in b16 b1_d30@512 b1_d16@256; do echo "== $f"; grep -A12 "^### End-to-end" $out/r/$f.log | tail -5; grep -i "error\|Traceback" $out/r/$f.log | head -3; done
cd $out && tar czf r.tgz r && rm -rf r
