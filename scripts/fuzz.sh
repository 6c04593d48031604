#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) with cargo-fuzz (libFuzzer), then prints each
# target's executions and findings. Crashes land in fuzz/artifacts/<target>/; turn each into a
# regression test. Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz needs nightly flags; the stable toolchain accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
mkdir -p fuzz/corpus/safetensors_reader fuzz/corpus/calib_reader fuzz/corpus/recipe_parser fuzz/corpus/image_loader fuzz/corpus/side_files fuzz/corpus/resume_reader
cp -n assets/*.safetensors fuzz/corpus/safetensors_reader/ 2>/dev/null || true
cp -n assets/tiny-vit.calib.safetensors fuzz/corpus/calib_reader/ 2>/dev/null || true
cp -n tests/data/fmnist-vit-reference.safetensors fuzz/corpus/image_loader/ 2>/dev/null || true
# Real photos, when scripts/prepare-dinov2.sh has fetched them.
cp -n "${COMQ_DINOV2_DIR:-$HOME/.cache/comq-gpu/dinov2}"/photos/{coins.png,grace_hopper.jpg} fuzz/corpus/image_loader/ 2>/dev/null || true
printf 'bits = 4\nsym = true\nmax_shard_size = "2GB"\n[[layer]]\nmatch = "fc2"\nbits = 8\n' > fuzz/corpus/recipe_parser/seed.toml
printf '{"num_heads": 2, "pretrained_cfg": {"input_size": [3, 16, 16], "crop_pct": 0.9, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}' > fuzz/corpus/side_files/seed.json
for t in safetensors_reader calib_reader recipe_parser image_loader side_files resume_reader; do
  log=fuzz/$t.log
  cargo fuzz run "$t" -- -max_total_time="$secs" -max_len=65536 -rss_limit_mb=4096 > "$log" 2>&1 || true
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
  [ -n "$execs" ] || execs=$(grep -oE '#[0-9]+' "$log" | tail -1 | tr -d '#')
  crashes=$(ls fuzz/artifacts/$t 2>/dev/null | wc -l)
  echo "$t: ${secs}s, ${execs:-?} executions, $crashes findings"
done
