#!/usr/bin/env bash
# The ninth comparison (docs/performance.md): split-K at few rows on/off, d30 @1024 batch 1, two processes per GPU of an
# nvidia-h200-x2 in swapped order, then check_gpu_paths and bench_small_scales. On the device machine: bash benchmarks/split_k_ab.sh
d=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --target $d .whl/*.whl && export PYTHONPATH=$d:$PWD PYTHONUNBUFFERED=1; git log --oneline -1
C="python benchmarks/bench_generate.py --configs d30@1024 --samplers stable --cuda-graphs --skip-eager --skip-plain --compile-decoder --compile-head --compile-blocks --compile-text --only-all-compiled --whole-graph --warmup 1 --repeats 3 --batches 1"
R=$OUT/r; mkdir -p $R
(export CUDA_VISIBLE_DEVICES=0; TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) $C --official-root .official/STAR --json $R/on_gpu0.json > $R/on_gpu0.log 2>&1; TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) $C --no-split-k --json $R/off_gpu0.json > $R/off_gpu0.log 2>&1; TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout 110 python benchmarks/check_gpu_paths.py > $R/check.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1; TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) $C --no-split-k --json $R/off_gpu1.json > $R/off_gpu1.log 2>&1; TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) $C --json $R/on_gpu1.json > $R/on_gpu1.log 2>&1; TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout 150 python benchmarks/bench_small_scales.py --priorities default --json $R/small_on.json > $R/small_on.log 2>&1) &
wait
tar czf $OUT/results.tgz -C $OUT r
for f in $R/*.log; do echo "== $f"; grep -E "^\[bench.*(b1|b16):|^\| [0-9]|^\| .*ok|FAIL|Error|error" $f | cut -c1-230 | tail -14; done
