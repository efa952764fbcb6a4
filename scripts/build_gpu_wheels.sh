#!/usr/bin/env bash
# Fill .whl/ with the wheels scripts/gpu_check.py installs on the GPU image, which has no network (torch 2.11,
# Triton 3.6, transformers 5.17, Python 3.12, x86-64). gpu_check.py installs each one only where the image's
# version is missing or too old (pip install --no-index --find-links .whl).
#
#   scripts/build_gpu_wheels.sh            # run from anywhere; needs pip and PyPI; PYTHON=... picks the python
#
# Holds: transformers 5.24.0 (the newest we support; the floor is 5.23), fla-core 0.6.0, peft 0.21.2, hf-hybrid built from
# this tree, and the x86-64 / CPython 3.12 wheels of transformers 5.24's requirements that an image may lack.
# The folder travels with the working tree in the device call (carry [".whl"]), 64 MiB in all: checked below.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=64

# one version of each: two of one package stop the whole install
PURE=(transformers==5.24.0 fla-core==0.6.0 peft==0.21.2)
BINARY=(tokenizers==0.23.3 huggingface-hub==1.33.0 safetensors==0.8.0 regex==2026.11.19)
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${PURE[@]}" "${BINARY[@]}"
log=$(mktemp)  # the build backend's deprecation notices: shown only if the build fails
"$PY" -m pip wheel -q --no-deps -w "$DEST" . >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
rm -f "$log"
rm -rf build hf_hybrid.egg-info

wheels_bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
ls -1 "$DEST"
total=$((wheels_bytes + tree_bytes))
awk -v w="$wheels_bytes" -v t="$tree_bytes" -v l="$LIMIT_MIB" 'BEGIN { m = 1048576;
    printf "wheels %.1f MiB + tracked tree %.1f MiB = %.1f MiB (limit %d MiB for what travels)\n", w / m, t / m, (w + t) / m, l }'
if ((total > LIMIT_MIB * 1048576)); then
    echo "error: .whl plus the tree exceed ${LIMIT_MIB} MiB; the device call would refuse them" >&2
    exit 1
fi
