#!/usr/bin/env bash
# Runs every test of the project: lint gates, unit and integration tests (network-namespace tests
# need root, iptables and nft), and the deploy/manifest checks. Prints one closing line
# "N passed, N failed". Under NODEDNS_REQUIRE_ALL=1 (set by .ci/run) no test may skip.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0

echo "== cargo fmt --check"
cargo fmt --all -- --check || status=1
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings || status=1
echo "== cargo test"
# --all-targets also runs each criterion bench once (test mode), so benches cannot rot.
cargo test --locked --all-targets 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
passed=$(grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '; [0-9]+ failed' "$log" | awk '{s+=$2} END {print s+0}')

echo "== loom model check of readslots (every interleaving up to LOOM_MAX_PREEMPTIONS preemptions)"
# Two preemptions: about 40,000 interleavings, under a minute; three take over ten minutes here.
LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}" \
  cargo test --locked --features loom --lib readslots::loom -- --nocapture --test-threads 1 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
passed=$((passed + $(grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')))
failed=$((failed + $(grep -Eo '; [0-9]+ failed' "$log" | awk '{s+=$2} END {print s+0}')))

echo "== cargo deny (licenses, bans, sources; advisories cannot be fetched here, see deny.toml)"
if cargo deny --version >/dev/null 2>&1; then
  if cargo deny --locked check licenses bans sources; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    status=1
  fi
elif [ "${NODEDNS_REQUIRE_ALL:-0}" = 1 ]; then
  echo "FAIL: cargo-deny is not installed (.ci/run installs it)"
  failed=$((failed + 1))
  status=1
else
  echo "SKIP: needs cargo-deny (cargo install --locked cargo-deny)"
fi

if [ -f tests/deploy/run.sh ]; then
  echo "== deploy checks"
  bash tests/deploy/run.sh 2>&1 | tee "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
  if [ -n "$line" ]; then
    passed=$((passed + $(echo "$line" | awk '{print $1}')))
    failed=$((failed + $(echo "$line" | awk '{print $3}')))
  fi
fi

# Coverage-guided fuzzing of every parser of network and disk input, each target for a bounded
# time from its committed corpus (NODEDNS_FUZZ_SECONDS, default 20); a crash fails the run.
echo "== fuzz"
bash fuzz/run.sh ci "${NODEDNS_FUZZ_SECONDS:-20}" 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
passed=$((passed + $(grep -c '^fuzz .*: ok$' "$log")))
failed=$((failed + $(grep -c '^fuzz .*: CRASH' "$log")))

[ "$status" -eq 0 ] || [ "$failed" -gt 0 ] || failed=1
echo "$passed passed, $failed failed"
exit "$status"
