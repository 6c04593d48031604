#!/usr/bin/env bash
# Runs the accuracy options alone and together on one model, at several widths, and writes one
# JSON line per run (scripts/accuracy-table.py turns them into the README's Markdown table).
#
# Usage: accuracy-matrix.sh MODEL CALIB EVAL EVAL_COUNT OUT_DIR [extra run options...]
#
#   MODEL       a model comq-gpu recognises (a bare backbone cannot take --rotate: give it a head)
#   CALIB       --images for the calibration (folder or pack)
#   EVAL        --eval images (labels give top-1; fidelity is to the FP32 model in every case)
#   EVAL_COUNT  how many of them
#   OUT_DIR     runs go to OUT_DIR/<setting>-<width>/, the lines to OUT_DIR/results.jsonl
#
# Environment: COMQ_BIN (default target/release/comq-gpu), SETTINGS and WIDTHS (space-separated
# names from the lists below, default all), DEVICE (default cpu). A run whose report exists is
# not run again, so an interrupted matrix goes on where it stopped.
#
# Every run is `run --eval`, so each line has FP32, RTN and the chosen recipe side by side, the
# run's wall clock and its quantize stage. Wall clocks mean something only on an idle machine.
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
MODEL=$1 CALIB=$2 EVAL=$3 COUNT=$4 OUT=$5
shift 5
BIN=${COMQ_BIN:-target/release/comq-gpu}
DEVICE=${DEVICE:-cpu}
mkdir -p "$OUT"

setting_args() {
  case $1 in
    paper) echo "--preset paper" ;;
    default) echo "" ;;
    augment) echo "--augment auto" ;;
    rotate) echo "--rotate" ;;
    corrected) echo "--calib-mode corrected" ;;
    all) echo "--augment auto --rotate --calib-mode corrected" ;;
    *) echo "unknown setting $1" >&2; exit 2 ;;
  esac
}
width_args() {
  case $1 in
    w4) echo "--bits 4" ;;
    w3) echo "--bits 3" ;;
    w2) echo "--bits 2" ;;
    w4g128) echo "--bits 4 --group-size 128" ;;
    w3g128) echo "--bits 3 --group-size 128" ;;
    t3) echo "--target-bits 3" ;;
    t2.5) echo "--target-bits 2.5" ;;
    *) echo "unknown width $1" >&2; exit 2 ;;
  esac
}

SETTINGS=${SETTINGS:-paper default augment rotate corrected all}
WIDTHS=${WIDTHS:-w4 w3 w2 w4g128 w3g128 t3 t2.5}
for w in $WIDTHS; do
  for s in $SETTINGS; do
    dir="$OUT/$s-$w"
    if [ ! -f "$dir/report.json" ]; then
      mkdir -p "$dir"
      # shellcheck disable=SC2046
      if ! "$BIN" run "$MODEL" --images "$CALIB" --device "$DEVICE" $(width_args "$w") \
        $(setting_args "$s") --eval "$EVAL" --eval-count "$COUNT" --out "$dir/model" \
        --report "$dir/report.json.tmp" -q "$@" > "$dir/log" 2>&1; then
        echo "$s $w: failed (see $dir/log)" >&2
        tail -3 "$dir/log" >&2
        continue
      fi
      mv "$dir/report.json.tmp" "$dir/report.json"
      rm -rf "$dir/model"
    fi
    python3 - "$dir/report.json" "$s" "$w" >> "$OUT/results.jsonl" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
stages = {s["stage"]: s["seconds"] for s in r["profile"]["stages"]}
rows = {x["model"].split(" ")[0]: x for x in r["eval"]["rows"]}
def cell(x):
    f = x.get("fidelity") or {}
    a = x.get("accuracy") or {}
    return {"top1": a.get("top1"), "cls": f.get("cls_cosine"), "rel_mse": f.get("rel_mse"),
            "nn": f.get("nn_agreement"), "top1_agree": f.get("top1_agreement")}
mixed = r.get("mixed_precision") or {}
print(json.dumps({"setting": sys.argv[2], "width": sys.argv[3],
                  "fp32": cell(rows["FP32"]), "rtn": cell(rows["RTN"]), "ours": cell(rows["COMQ"]),
                  "wall": r["profile"]["wall_seconds"] - stages.get("evaluate", 0.0), "quantize": stages.get("quantize"),
                  "mean_bits": mixed.get("average_bits") if isinstance(mixed, dict) else None}))
EOF
    tail -1 "$OUT/results.jsonl"
  done
done
