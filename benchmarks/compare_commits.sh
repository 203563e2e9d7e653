#!/usr/bin/env bash
# Time the same benchmark at several commits in one device call (same GPU, same run): the way to find
# which change made a figure move, and to measure a change against the previous version.
#
#   bash benchmarks/compare_commits.sh prepare b2953cf db4020e HEAD     # here: export each tree to .commits/
#   bash benchmarks/compare_commits.sh run $OUT -- --configs d16@256 --batches 1 --cuda-graphs --skip-eager \
#       --compile-decoder --compile-blocks --compile-text --samplers parallel --warmup 2 --repeats 5 --only-all-compiled
#
# `prepare` writes each commit's tree (git archive, no history) to .commits/<nn>-<sha> (git-ignored;
# carry ".commits" in the device call); `run` runs benchmarks/bench_generate.py of each tree with that tree
# first on PYTHONPATH (its own library and its own benchmark script), in the order prepared, writes
# $OUT/commit-<n>-<sha>.json and .log, and prints one table of every row last. Arguments after `--` go to
# every run (give only options that all the commits' bench_generate.py accept); the official code is
# not timed here (add --official-root to one run by hand if wanted). COMMIT_LIMIT (default 150) seconds per
# commit.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
store="${COMPARE_COMMITS_DIR:-$root/.commits}"  # where the trees go (carry it; tests use another folder)

case "${1:-}" in
  prepare)
    shift
    rm -rf "$store" && mkdir -p "$store"
    n=0
    for rev in "$@"; do
      sha=$(git -C "$root" rev-parse --short "$rev") || exit 1
      dir="$store/$(printf %02d $n)-$sha"  # zero-padded: the run order is the glob's
      mkdir -p "$dir" && git -C "$root" archive "$sha" starkit benchmarks | tar -x -C "$dir" || exit 1
      echo "$dir"
      n=$((n + 1))
    done ;;
  run)
    out=${2:?usage: compare_commits.sh run OUT -- ARGS}
    shift 2
    [ "${1:-}" = "--" ] && shift
    mkdir -p "$out"
    for dir in "$store"/*/; do
      name=$(basename "$dir")
      echo "[compare $(date -u +%H:%M:%S)] $name"
      (cd "$dir" && PYTHONPATH="$dir:${PYTHONPATH:-}" timeout "${COMMIT_LIMIT:-150}" \
        python3 benchmarks/bench_generate.py "$@" --json "$out/commit-$name.json") >"$out/commit-$name.log" 2>&1
      grep -E "^\[bench" "$out/commit-$name.log" | grep -v ceiling | tail -4
    done
    python3 - "$out" <<'EOF'
import glob, json, os, sys
print("\n| commit | impl | config | sampler | batch | latency (s) | runs (s) |\n|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "commit-*.json"))):
    name = os.path.basename(path)[len("commit-"):-len(".json")]
    for r in json.load(open(path))["rows"]:
        if "latency_s" not in r:
            continue
        runs = " ".join(f"{t:.4f}" for t in r.get("latency_all", []))
        print(f"| {name} | {r['impl']} | {r['config']} | {r['sampler']} | {r['batch']} | {r['latency_s']:.4f} | {runs} |")
EOF
    ;;
  *) echo "usage: compare_commits.sh prepare REV... | run OUT -- BENCH_GENERATE_ARGS" >&2; exit 2 ;;
esac
