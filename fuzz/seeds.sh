#!/usr/bin/env bash
# Regenerates the committed seed corpora of the parser targets from the vendored traces
# and scenarios (decompressed slices: a few KiB each, well under the 2 MB budget):
#   bash fuzz/seeds.sh
# The structured targets (ppc_hcalls, shadow_ops, nested_ops) take `arbitrary` bytes,
# not trace text: their seeds are the minimised corpus of the campaign (campaign.sh).
set -eu  # no pipefail: `zcat | head` ends zcat with SIGPIPE
cd "$(dirname "$0")"
T=../traces
S=seeds

# $1 dir, $2 name prefix, $3 gz trace, $4 lines per slice, $5 slices, [$6 header lines]
slices() {
  local dir=$1 pre=$2 src=$3 n=$4 k=$5 head=${6:-0}
  mkdir -p "$dir"
  local total
  total=$(zcat "$src" | grep -vc '^# console:' || true)
  local step=$(((total - head) / k))
  for i in $(seq 0 $((k - 1))); do
    local from=$((head + 1 + i * step))
    {
      if [ "$head" -gt 0 ]; then zcat "$src" | grep -v '^#' | head -n "$head"; fi
      zcat "$src" | grep -v '^# console:' | sed -n "${from},$((from + n - 1))p"
    } >"$dir/$pre-$i.txt"
  done
}

rm -rf "$S"
# PPC hypercall traces: windows of records, the head with its console lines, and one
# gzip'd slice (the readers decompress by magic).
for t in boot resize; do slices "$S/ppc_trace" "$t" "$T/$t.txt.gz" 40 10; done
zcat "$T/boot.txt.gz" | head -n 60 >"$S/ppc_trace/boot-head.txt"
zcat "$T/resize.txt.gz" | grep -m1 -B3 -A3 H_RESIZE_HPT_PREPARE >"$S/ppc_trace/resize-prepare.txt"
zcat "$T/boot.txt.gz" | grep -v '^# console:' | sed -n 2000,2040p | gzip -9n >"$S/ppc_trace/boot-slice.txt.gz"
# x86 walk traces.
for t in boot max-boot; do slices "$S/x86_trace" "$t" "$T/x86/$t.txt.gz" 24 10; done
zcat "$T/x86/boot.txt.gz" | head -n 40 >"$S/x86_trace/boot-head.txt"
zcat "$T/x86/max-boot.txt.gz" | grep -v '^# console:' | sed -n 5000,5030p | gzip -9n >"$S/x86_trace/max-boot-slice.txt.gz"
# Nested traces: the two header records, then a window of the body.
for t in nested-basic nested-small; do slices "$S/nested_trace" "$t" "$T/nested/$t.txt.gz" 40 8 2; done
zcat "$T/nested/nested-small.txt.gz" | head -n 60 >"$S/nested_trace/small-head.txt"
# Scenarios: the shipped default, a minimal file, one per section, a deterministic one.
mkdir -p "$S/scenario_toml"
cp ../scenarios/default.toml "$S/scenario_toml/default.toml"
printf 'seed = 9\n[guest]\nvcpus = 1\n' >"$S/scenario_toml/minimal.toml"
printf '[deterministic]\nsteps = 8\nram_mib = 16\n[guest]\nram_mib = 64\nhpt_order = 18\n' >"$S/scenario_toml/deterministic.toml"
printf '[[resize]]\nat = 0.5\norder_delta = -1\n[[resize]]\nat = 1.0\norder_delta = 8\n' >"$S/scenario_toml/resize.toml"
printf '[host]\nactors = ["aging", "migration"]\npage_in = false\nmax_outstanding = 1\nops_per_tick = 3\n' >"$S/scenario_toml/host.toml"
printf '[workload]\nlinear_page_shift = 16\npage_size_weights = [0, 0, 1]\n[workload.mix]\ntouch = 1\nfork = 0\n' >"$S/scenario_toml/workload.toml"
du -sh "$S"
