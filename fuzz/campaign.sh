#!/usr/bin/env bash
# The fuzzing campaign: every target for SECONDS_PER_TARGET seconds (default 540),
# JOBS targets at a time (default 2), each under `nice -n 10` and /usr/bin/time, from the
# committed seeds plus the working corpus in fuzz/corpus/<target> (not committed).
#   bash fuzz/campaign.sh                      # the recorded campaign (7 x 540 s)
#   SECONDS_PER_TARGET=60 bash fuzz/campaign.sh shadow_ops nested_ops
# Logs and CPU times go to fuzz/campaign-logs/<target>.log; crashes to
# fuzz/artifacts/<target>/. Exit status 1 if any target found a crash.
set -eu
cd "$(dirname "$0")"
SECS=${SECONDS_PER_TARGET:-540}
JOBS=${JOBS:-2}
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(ppc_hcalls shadow_ops nested_ops scenario_toml ppc_trace x86_trace nested_trace)
cargo +nightly fuzz build
# Run copies, so that rebuilding the targets meanwhile (e.g. planted bugs) cannot
# replace a running binary.
BIN=campaign-logs/bin
mkdir -p "$BIN"
for t in "${TARGETS[@]}"; do cp "target/x86_64-unknown-linux-gnu/release/$t" "$BIN/"; done
run_one() {
  local t=$1
  mkdir -p "corpus/$t" "artifacts/$t" "seeds/$t"
  local dict=()
  [ -f "dict/$t.dict" ] && dict=("-dict=dict/$t.dict")
  /usr/bin/time -f "cpu_seconds=%U+%S wall_seconds=%e max_rss_kb=%M" \
    nice -n 10 "$BIN/$t" "corpus/$t" "seeds/$t" "${dict[@]}" \
    -max_total_time="$SECS" -timeout=20 -rss_limit_mb=2560 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" >"campaign-logs/$t.log" 2>&1
}
export -f run_one
export SECS BIN
printf '%s\n' "${TARGETS[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {} && echo "{}: ok" || echo "{}: CRASH (see campaign-logs/{}.log)"' | tee campaign-logs/summary.txt
for t in "${TARGETS[@]}"; do
  printf '%-14s %s %s\n' "$t" "$(grep -o 'stat::number_of_executed_units: *[0-9]*' "campaign-logs/$t.log" | grep -o '[0-9]*$')" \
    "$(grep -o 'cpu_seconds=.*' "campaign-logs/$t.log")"
done | tee -a campaign-logs/summary.txt
! grep -q CRASH campaign-logs/summary.txt
