#!/usr/bin/env bash
# Each supported vision-tower family at its real shape (random weights, scripts/family-shapes.py):
# `inspect`, then `run` with no calibration given (so on the bundled photos) with wall clock and peak memory
# (/usr/bin/time -v). Usage: scripts/family-shapes.sh [WORKDIR] [NAMES] [RUN OPTIONS...]
# NAMES is comma-separated (default clip-l14,siglip-so400m,dinov2-reg-b,swin-t,swin-b).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/comq-families}
names=${2:-clip-l14,siglip-so400m,dinov2-reg-b,swin-t,swin-b}
shift $(( $# > 2 ? 2 : $# ))
py=${COMQ_PYTHON:-$HOME/.cache/comq-gpu/pyenv/bin/python}
cargo build --release --quiet
mkdir -p "$work"
for name in ${names//,/ }; do
  dir="$work/$name"
  [ -f "$dir/model.safetensors" ] || "$py" scripts/family-shapes.py "$name" "$dir"
  echo "== $name"
  ./target/release/comq-gpu inspect "$dir" | grep -E "^forward pass|tensors,"
  rm -rf "$work/$name-q" "$work/$name-report.json"
  /usr/bin/time -v ./target/release/comq-gpu run "$dir" --out "$work/$name-q" \
    --report "$work/$name-report.json" -q "$@" 2> "$work/$name-time.txt"
  grep -E "Maximum resident set size|Elapsed \(wall clock\)" "$work/$name-time.txt"
  "$py" -c "import json; r=json.load(open('$work/$name-report.json')); t=r['totals']; print('layers', t['layers'], 'mean rel error', '%.3e' % t['mean_rel_error'], 'quantize s', round(t['seconds'], 1), 'device', r.get('device'))"
done
