#!/usr/bin/env bash
# The CPU Gram (`bench --kernels --no-gpu`) beside numpy's OpenBLAS `X.T @ X` on the same shapes,
# rows and cores, each timed as the best of 3. Usage: scripts/gram-vs-blas.sh [ROWS] [WIDTHS]
# WIDTHS is comma-separated (default 1024,4096). Python with numpy: $COMQ_PYTHON or the cached
# environment of scripts/setup-python-env.sh, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-8192}
widths=${2:-1024,4096}
py=${COMQ_PYTHON:-$HOME/.cache/comq-gpu/pyenv/bin/python}
[ -x "$py" ] || py=python3
cargo build --release --quiet
shapes=$(echo "$widths" | tr ',' '\n' | sed 's/.*/&x&/' | paste -sd, -)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for i in 1 2 3; do
  ./target/release/comq-gpu bench --kernels --no-gpu --gram-rows "$rows" --shapes "$shapes" \
    --json "$out/k$i.json" >/dev/null
done
"$py" - "$out" "$rows" "$widths" <<'PY'
import json, os, sys, time
import numpy as np
out, rows, widths = sys.argv[1], int(sys.argv[2]), [int(w) for w in sys.argv[3].split(",")]
ours = {}
for f in sorted(os.listdir(out)):
    for r in json.load(open(os.path.join(out, f))):
        n = r["shape"][1]
        ours[n] = min(ours.get(n, float("inf")), r["gram_seconds"])
print(f"{'rows x n':>12} {'ours s':>8} {'numpy s':>8} {'ours / BLAS rate':>17}   ({os.cpu_count()} cores)")
for n in widths:
    x = np.random.default_rng(0).standard_normal((rows, n), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x.T @ x
        best = min(best, time.perf_counter() - t)
    print(f"{rows:>6} x {n:<5} {ours[n]:8.3f} {best:8.3f} {best / ours[n]:16.2f}x")
PY
