#!/usr/bin/env bash
# Creates (once) the Python environment the interoperability and reference tests use:
# transformers, compressed-tensors, torch and timm (with the torchvision its layers import), pinned.
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
echo "$ENV_DIR/bin/python"
