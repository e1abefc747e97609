#!/usr/bin/env bash
# Download, HERE (a machine with PyPI access), the wheels the GPU device machines lack, into .whl/
# at the repository root.  The device machines (nvidia-h100-x1 / nvidia-h200) have Python 3.12,
# torch 2.11 + CUDA 13, transformers, huggingface-hub 1.33, safetensors, numpy, einops, pyyaml ...
# but no megatron-core and no diffusers, and no network.  tools/gpu_check.sh installs what lies in
# .whl/ there (`run` with carry: [".whl"]).
#
# What is fetched, and why nothing else:
#   megatron-core 0.16.1  cp312 manylinux x86_64 (needs torch, numpy, packaging: all there)
#   diffusers     0.42.1  py3 (needs huggingface-hub>=1.32 (1.33 there), safetensors>=0.8 (0.8
#                         there), filelock, numpy, regex, requests, Pillow (all there) and
#                         importlib_metadata, which it imports only on Python < 3.8: not carried)
#   torchao       0.16.0  abi3 (no deps): model.fp8=tensorwise | rowwise (torchao's FP8 GEMMs in the
#                         local spec), since Transformer Engine is too large to carry (DESIGN.md 8)
# The versions are the ones CI pins (requirements-ci.txt).  Keep one version of each package in
# .whl/: two stop the whole install there.  .whl/ is ignored by git (/.whl/ in .gitignore).
#
# Usage: bash tools/fetch_gpu_wheels.sh        (prints the wheels and their total size)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
MEGATRON_CORE_VERSION=${MEGATRON_CORE_VERSION:-0.16.1}
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
TORCHAO_VERSION=${TORCHAO_VERSION:-0.16.0}
DEST=.whl

if ! git check-ignore -q "$DEST/x.whl" 2>/dev/null; then
    echo "/.whl/" >> .git/info/exclude   # keep the wheels out of commits
fi

rm -rf "$DEST"
mkdir -p "$DEST"
# the exact form of the device README: cp312, manylinux x86_64 platforms, binaries only, no deps
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "megatron-core==${MEGATRON_CORE_VERSION}" "diffusers==${DIFFUSERS_VERSION}" \
    "torchao==${TORCHAO_VERSION}"

count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne 3 ]; then
    echo "expected 3 wheels in $DEST, found $count" >&2
    exit 1
fi
for whl in "$DEST"/*.whl; do
    printf '%8s  %s\n' "$(du -k "$whl" | cut -f1)K" "$(basename "$whl")"
    unzip -p "$whl" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/            /'
done
total_kib=$(du -sk "$DEST" | cut -f1)
echo "total: ${total_kib} KiB in $DEST (the device's working-tree limit is 64 MiB)"
if [ "$total_kib" -gt $((48 * 1024)) ]; then
    echo "warning: $DEST is over 48 MiB; the repository itself must fit in the rest" >&2
fi
