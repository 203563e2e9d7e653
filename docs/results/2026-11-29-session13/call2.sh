#!/usr/bin/env bash
# session 13 call 2: profiles of d30@1024 stable b16, all compiled, fp8 (GPU 0) and bf16 (GPU 1)
set -u
out=$1; mkdir -p $out/r
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
P="--cases d30@1024:stable:16 --cuda-graphs --compile-decoder --compile-head --compile-blocks --compile-text --warmup 1 --repeats 1 --rows 60"
(export CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_0
 timeout 400 python benchmarks/profile_generate.py $P --fp8 > $out/r/profile_b16_fp8.txt 2>&1) &
(export CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_1
 timeout 400 python benchmarks/profile_generate.py $P > $out/r/profile_b16_bf16.txt 2>&1) &
wait
date -u
for f in fp8 bf16; do echo "== $f"; grep -A12 "kernel category" $out/r/profile_b16_$f.txt; done
cd $out && tar czf r.tgz r && rm -rf r
