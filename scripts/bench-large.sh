#!/usr/bin/env bash
# Peak host memory of `run` on a sharded synthetic model of about 2 GB (64 × [65536, 128] f32),
# measured with /usr/bin/time -v. Usage: scripts/bench-large.sh [WORKDIR] [DEVICE]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/comq-large}
device=${2:-cpu}
cargo build --release --quiet --example make_large
cargo build --release --quiet
[ -f "$work/model/model.safetensors.index.json" ] || ./target/release/examples/make_large "$work/model"
du -sb "$work/model"
rm -rf "$work/out"
/usr/bin/time -v ./target/release/comq-gpu run "$work/model" --data-free --device "$device" --bits 4 \
  --out "$work/out" --max-shard-size 100MB --report "$work/report.json" -q 2> "$work/time.txt"
grep -E "Maximum resident set size|Elapsed \(wall clock\)" "$work/time.txt"
du -sb "$work/out"
python3 -c "import json; r=json.load(open('$work/report.json')); print('layers', r['totals']['layers'], 'seconds', round(r['totals']['seconds'],1), 'peak_rss_bytes', r['peak_rss_bytes'])"
