#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer's coverage instrumentation on the stable toolchain and
# runs them. Every file in fuzz/src/bin/ is a target; its seeds are fuzz/corpus/TARGET/.
#
#   fuzz/run.sh build                      build every target
#   fuzz/run.sh run TARGET [SECONDS] [-- libFuzzer flags...]
#                                          fuzz one target (default 20 s); new inputs that reach
#                                          new coverage go to fuzz/work/TARGET (not committed),
#                                          a crash to fuzz/artifacts/TARGET/ and exit status 1
#   fuzz/run.sh ci [SECONDS]               build, then fuzz every target SECONDS (default 20)
#                                          from its committed corpus; fails on any crash
#   fuzz/run.sh merge TARGET               fold fuzz/work/TARGET into the committed corpus
#                                          (only inputs that add edges, kept small)
#   fuzz/run.sh repro TARGET FILE          run one input (e.g. a crash artifact)
#
# No nightly toolchain is needed: the instrumentation is the stable `-C passes=sancov-module`
# plus LLVM options, what `cargo fuzz --sanitizer none` passes; libfuzzer-sys builds libFuzzer.
set -euo pipefail
cd "$(dirname "$0")"
host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
bin_dir="$CARGO_TARGET_DIR/$host/release"

targets() { for f in src/bin/*.rs; do basename "$f" .rs; done; }

build() {
  # --target keeps the instrumentation off build scripts and proc macros.
  RUSTFLAGS="-C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=4 \
-C llvm-args=-sanitizer-coverage-inline-8bit-counters -C llvm-args=-sanitizer-coverage-pc-table \
-C llvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -C debug-assertions \
-C overflow-checks" \
    cargo build --release --locked --target "$host" --bins "$@"
}

run() {
  local t=$1 secs=${2:-20}
  shift $(($# < 2 ? $# : 2))
  [ "${1:-}" = "--" ] && shift
  mkdir -p "work/$t" "artifacts/$t" "corpus/$t"
  # -rss_limit_mb and -max_len bound memory; -timeout turns a stall into a failure.
  "$bin_dir/$t" "work/$t" "corpus/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -max_len=70000 -artifact_prefix="artifacts/$t/" -print_final_stats=1 "$@"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  run) shift; run "$@" ;;
  ci)
    secs=${2:-20}
    build
    failed=0
    for t in $(targets); do
      echo "== fuzz $t (${secs}s)"
      log=$(mktemp)
      if run "$t" "$secs" >"$log" 2>&1; then
        grep -E '^stat::number_of_executed_units|^Done [0-9]+ runs' "$log" || true
        echo "fuzz $t: ok"
      else
        tail -n 40 "$log"
        echo "fuzz $t: CRASH (input in fuzz/artifacts/$t/)"
        failed=1
      fi
      rm -f "$log"
    done
    exit "$failed"
    ;;
  merge)
    t=$2
    mkdir -p "corpus/$t"
    # Set cover on edges alone: hit-count features would keep thousands of near-copies.
    "$bin_dir/$t" -set_cover_merge=1 -use_counters=0 -use_cmp=0 -max_len=4096 "corpus/$t" "work/$t"
    ;;
  repro) "$bin_dir/$2" "$3" ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
