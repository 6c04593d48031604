#!/usr/bin/env bash
# Prepares what a bare GPU machine without a Rust toolchain lacks, in one folder to carry there:
# the Vulkan loader and the GL vendor-neutral dispatch libraries (amd64 packages: NVIDIA's
# Vulkan driver lives in libGLX_nvidia, which needs libglvnd; without them wgpu finds no
# adapter) and the release binary.
#
# Usage (in the project root): scripts/gpu-prepare.sh [DIR]   [default: .gl, git-ignored]
# On the GPU machine, from a copy of the project with DIR beside it:
#   for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
#   export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json  # where it exists
#   scripts/gpu-measure.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gl}
mkdir -p "$dir/bin" .git/info
grep -qxF "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
if ! ls "$dir"/libvulkan1_*.deb "$dir"/libglvnd0_*.deb >/dev/null 2>&1; then
  lists=$(mktemp -d)
  mkdir -p "$lists/partial"
  o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=$lists"
  apt-get $o update >/dev/null
  (cd "$dir" && apt-get $o download libvulkan1 libglvnd0 libgl1 libglx0 libegl1 libopengl0 libgles2)
  rm -rf "$lists"
fi
cargo build --release --locked
cp target/release/comq-gpu "$dir/bin/"
git rev-parse --short HEAD >"$dir/bin/commit.txt"
ls -l "$dir" "$dir/bin"
