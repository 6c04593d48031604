#!/usr/bin/env bash
# Creates (once) the Python environment the interoperability and reference tests use:
# transformers, compressed-tensors, torch and timm (with the torchvision its layers import), pinned.
# Beside it, in <env>/legacy (put first on PYTHONPATH, reusing the environment's torch), the last
# transformers 4 with its compressed-tensors: transformers 5.23 cannot load any packed DINOv2, 4.57
# can, and the interoperability test loads our DINOv2 output with it.
# It lives outside the checkout and is reused while its stamp matches; new pins are installed into
# an existing environment. Prints the environment's python path on the last line.
set -euo pipefail
ENV_DIR=${COMQ_PYENV:-$HOME/.cache/comq-gpu/pyenv}
PINS="torch==2.15.0 transformers==5.23.0 compressed-tensors==0.20.0 safetensors numpy timm==1.0.31 torchvision==0.29.2"
STAMP="$ENV_DIR/.comq-pins"
if [ ! -x "$ENV_DIR/bin/python" ]; then
  echo "creating the Python test environment in $ENV_DIR" >&2
  rm -rf "$ENV_DIR"
  python3 -m venv "$ENV_DIR"
  "$ENV_DIR/bin/pip" install -q --upgrade pip >&2
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$PINS" ]; then
  echo "installing into the Python test environment: $PINS" >&2
  # shellcheck disable=SC2086
  "$ENV_DIR/bin/pip" install -q $PINS >&2
  echo "$PINS" > "$STAMP"
fi
LEGACY_PINS="transformers==4.57.6 compressed-tensors==0.12.2 huggingface_hub==0.36.0 tokenizers==0.22.1 accelerate==1.10.1 requests==2.34.2 urllib3==2.8.0 idna==3.20 charset_normalizer==3.5.3 certifi==2026.10.19.post1 psutil==7.2.2"
LEGACY="$ENV_DIR/legacy"
if [ "$(cat "$LEGACY/.comq-pins" 2>/dev/null)" != "$LEGACY_PINS" ]; then
  echo "installing the legacy loaders into $LEGACY: $LEGACY_PINS" >&2
  rm -rf "$LEGACY"
  # shellcheck disable=SC2086
  "$ENV_DIR/bin/pip" install -q --no-deps --target "$LEGACY" $LEGACY_PINS >&2
  echo "$LEGACY_PINS" > "$LEGACY/.comq-pins"
fi
echo "$ENV_DIR/bin/python"
