#!/usr/bin/env bash
# Steady-state replay of the vendored PPC traces by revmap beside the C reference
# replayer (hptref), on the same traces in the same run.
#
#   bash scripts/bench-vs-c.sh [TRACE...]     # default: traces/boot.txt.gz traces/resize.txt.gz
#
# HPTREF_SRC: the C reference's sources (default ../shared/anchors/hptref beside the
# repository, as in the project's checkout layout); it is copied to a temporary
# directory and built there with make (gcc, zlib if present). RUNS (default 11) is both
# revmap's --runs and hptref's -n. revmap is built with the dist profile (fat LTO).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${HPTREF_SRC:-../shared/anchors/hptref}
runs=${RUNS:-11}
[ -f "$src/hptref.c" ] || { echo "no hptref.c in $src: set HPTREF_SRC" >&2; exit 2; }
[ $# -gt 0 ] || set -- traces/boot.txt.gz traces/resize.txt.gz
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp -r "$src"/. "$build"/
make -s -C "$build" >/dev/null
cargo build -q --profile dist -p revmap-cli
echo "# load: $(cut -d' ' -f1-3 /proc/loadavg), nproc: $(nproc)"
echo "# revmap bench replay --runs $runs (hcalls_per_s_median: steady state)"
target/dist/revmap bench replay --runs "$runs" --json "$@"
echo "# hptref -n $runs (replay_hcalls_per_s_median)"
"$build/hptref" -n "$runs" "$@"
