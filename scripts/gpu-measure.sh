#!/usr/bin/env bash
# Every owed GPU figure in one run, on a machine with a GPU and the release binary.
#
# Usage: scripts/gpu-measure.sh [OUTDIR] [BINARY]
#   OUTDIR  where the JSON, the per-step logs and gpu-measure.md go [default: gpu-measure]
#   BINARY  the comq-gpu release binary [default: .gl/bin/comq-gpu, else target/release/comq-gpu]
# Environment:
#   BUDGET  seconds the whole script may take [default: 470]; each step gets at most its own
#           limit and never more than what is left, so the script ends inside BUDGET and the
#           steps that did not fit are listed as such in the table.
#   WORK    scratch folder for the synthetic models and image packs [default: /tmp/comq-gpu-measure]
#
# Steps, most important first: devices; bench --quick (GPU/CPU parity); bench --kernels
# (ViT-L shapes, Gram over 16384 rows); bench on the ViT-B and ViT-L layer shapes (GPU vs CPU,
# code disagreement); bench --forward vit-b16; bench --model vit-l16 --images 1024 with
# --preset paper (greedy and shared order); the default recipe on the same model; the
# calibration-count table (256..4096 images) on ViT-L. Then scripts/gpu-table.py turns the
# JSON into gpu-measure.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-measure}
bin=${2:-}
if [ -z "$bin" ]; then
  if [ -x .gl/bin/comq-gpu ]; then bin=.gl/bin/comq-gpu; else bin=target/release/comq-gpu; fi
fi
[ -x "$bin" ] || { echo "no comq-gpu binary at $bin (build with cargo build --release)" >&2; exit 2; }
bin=$(realpath "$bin")
budget=${BUDGET:-470}
work=${WORK:-/tmp/comq-gpu-measure}
mkdir -p "$out" "$work"
out=$(realpath "$out")
start=$(date +%s)
export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}
: >"$out/steps.tsv"

# step NAME LIMIT CMD...: runs CMD with at most min(LIMIT, time left) seconds, its output in
# NAME.txt, and records the outcome in steps.tsv (name, status, seconds).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - ($(date +%s) - start)))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped (budget)\t0\n' "$name" >>"$out/steps.tsv"
    echo "== $name: skipped, $left s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t0 rc
  t0=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" >"$out/$name.txt" 2>&1
  rc=$?
  local dt
  dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  cat "$out/$name.txt"
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timed out"; elif [ $rc -ne 0 ]; then status="failed ($rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >>"$out/steps.tsv"
}

{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host $(uname -srm), $(nproc) cores"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
} | tee "$out/host.txt"

step devices 30 "$bin" devices --json
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if ! grep -q '"name"' "$out/devices.txt" && [ -f "$icd" ] && [ -z "${VK_DRIVER_FILES:-}" ]; then
  echo "no adapter found: trying again with VK_DRIVER_FILES=$icd"
  export VK_DRIVER_FILES=$icd
  step devices 30 "$bin" devices --json
fi
cp "$out/devices.txt" "$out/devices.json" 2>/dev/null
step quick 60 "$bin" bench --quick --json "$out/quick.json"
step kernels 90 "$bin" bench --kernels --no-cpu --gram-rows 16384 --json "$out/kernels.json"
step layers 120 "$bin" bench --repeats 3 --json "$out/layers.json"
step forward 60 "$bin" bench --forward vit-b16 --images 64 --json "$out/forward.json"
step e2e-paper-greedy 150 "$bin" bench --model vit-l16 --images 1024 --no-cpu \
  --work-dir "$work" --json "$out/e2e-paper-greedy.json"
step e2e-paper-shared 120 "$bin" bench --model vit-l16 --images 1024 --no-cpu --order shared \
  --work-dir "$work" --json "$out/e2e-paper-shared.json"
# The default recipe (GPTQ start, damping, grid-shrink search, held-out choice) on the first
# 4 of the 24 blocks: the whole model does not fit this script's budget with it.
step e2e-default-4b 150 "$bin" bench --model vit-l16 --images 1024 --no-cpu --preset default \
  --blocks 4 --work-dir "$work" --json "$out/e2e-default-4b.json"
for n in 256 512 2048 4096; do
  step "calib-$n" 150 "$bin" bench --model vit-l16 --images "$n" --no-cpu \
    --work-dir "$work" --json "$out/calib-$n.json"
done

if command -v python3 >/dev/null; then
  python3 scripts/gpu-table.py "$out" >"$out/gpu-measure.md" && cat "$out/gpu-measure.md"
else
  echo "python3 not found: the JSON is in $out, no Markdown table"
fi
echo "total $(($(date +%s) - start)) s"
