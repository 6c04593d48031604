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
#   STEPS   the steps to run, space-separated names or shell patterns (`size-*`) [default: all];
#           `devices` always runs. A step left out is listed as not chosen.
#
# Steps, most important first: devices; bench --quick (GPU/CPU parity); bench --kernels
# (ViT-L shapes, Gram over 16384 rows); bench on the ViT-B and ViT-L layer shapes (GPU vs CPU,
# code disagreement); bench --forward vit-b16; bench --model vit-l16 --images 1024 with
# --preset paper (greedy and shared order); the default recipe on the same model; the
# calibration-count table (256..4096 images) on ViT-L; the model-size table (ViT-S/14 to the 6B
# shape, `--memory-limit 8GB`, the 6B shape in bf16 on its first 4 of 48 blocks, which is what
# its per-block memory plan needs); the default recipe on the whole ViT-L/16. With nvidia-smi,
# each step's peak GPU memory (the whole card, sampled every 100 ms) goes into steps.tsv. Then scripts/gpu-table.py turns the
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
# NAME.txt, and records the outcome in steps.tsv (name, status, seconds, peak GPU MiB).
chosen() {
  [ -z "${STEPS:-}" ] && return 0
  local p
  for p in $STEPS devices; do
    # shellcheck disable=SC2053
    [[ $1 == $p ]] && return 0
  done
  return 1
}
step() {
  local name=$1 limit=$2
  shift 2
  if ! chosen "$name"; then
    printf '%s\tnot chosen\t0\t\n' "$name" >>"$out/steps.tsv"
    return
  fi
  local left=$((budget - ($(date +%s) - start)))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped (budget)\t0\n' "$name" >>"$out/steps.tsv"
    echo "== $name: skipped, $left s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t0 rc smi=
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 \
      >"$out/$name.gpumem" 2>/dev/null &
    smi=$!
  fi
  t0=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" >"$out/$name.txt" 2>&1
  rc=$?
  local gpumem=
  if [ -n "$smi" ]; then
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    gpumem=$(sort -n "$out/$name.gpumem" | tail -1)
  fi
  local dt
  dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  cat "$out/$name.txt"
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timed out"; elif [ $rc -ne 0 ]; then status="failed ($rc)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$gpumem" >>"$out/steps.tsv"
}

{
  # The binary's own commit where gpu-prepare.sh recorded it (a copied tree's git may be stale).
  if [ -f "$(dirname "$bin")/commit.txt" ]; then
    echo "commit $(cat "$(dirname "$bin")/commit.txt") (binary)"
  else
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  fi
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
# The same with every GPTQ factor built on the host and sent (no device-built factors for the
# 1024-wide layers): which of the two is faster on this card.
step e2e-default-4b-host-factor 150 env COMQ_DEVICE_FACTOR=off "$bin" bench --model vit-l16 \
  --images 1024 --no-cpu --preset default --blocks 4 --work-dir "$work" \
  --json "$out/e2e-default-4b-host-factor.json"
for n in 256 512 2048 4096; do
  step "calib-$n" 150 "$bin" bench --model vit-l16 --images "$n" --no-cpu \
    --work-dir "$work" --json "$out/calib-$n.json"
done

# The model-size table: the same recipe and image count on every shape, within 8 GB of device
# memory. The 6B shape (12 GB in bf16) runs its first 4 blocks: memory is planned per block.
for m in vit-s14 vit-b16 vit-l16 vit-h14; do
  step "size-$m" 200 "$bin" bench --model "$m" --images 1024 --no-cpu --memory-limit 8GB \
    --work-dir "$work" --json "$out/size-$m.json"
done
step size-vit-6b 200 "$bin" bench --model vit-6b --dtype bf16 --blocks 4 --images 1024 --no-cpu \
  --memory-limit 8GB --work-dir "$work" --json "$out/size-vit-6b.json"
step e2e-default 400 "$bin" bench --model vit-l16 --images 1024 --no-cpu --preset default \
  --work-dir "$work" --json "$out/e2e-default.json"

if command -v python3 >/dev/null; then
  python3 scripts/gpu-table.py "$out" >"$out/gpu-measure.md" && cat "$out/gpu-measure.md"
else
  echo "python3 not found: the JSON is in $out, no Markdown table"
fi
echo "total $(($(date +%s) - start)) s"
