#!/usr/bin/env bash
# Unpack the transformers releases serving engines pin (vLLM 0.34.0: >=5.16.1,<5.23; SGLang 0.5.23: ==5.19.0)
# under DIR, one directory per release, for the slow test that loads every export with them:
#
#     bash scripts/old_transformers.sh /work/oldtf
#     HF_HYBRID_OLD_TRANSFORMERS=/work/oldtf/5.16.1:/work/oldtf/5.19.0:/work/oldtf/5.22.2 \
#         python -m pytest -m slow tests/test_serving_exports.py
#
# Nothing is installed into the running environment: each release is a wheel unzipped into DIR/VERSION and put
# first on PYTHONPATH by the test. 5.16.1 needs huggingface-hub < 2 (newer environments have 2.x); it is
# installed next to it, inside DIR/5.16.1.
set -euo pipefail
dir=${1:?usage: scripts/old_transformers.sh DIR}
mkdir -p "$dir/wheels"
for version in 5.16.1 5.19.0 5.22.2; do
    pip download --quiet --no-deps "transformers==$version" -d "$dir/wheels"
    rm -rf "${dir:?}/$version"
    python -m zipfile -e "$dir/wheels/transformers-$version-py3-none-any.whl" "$dir/$version"
done
pip install --quiet --target "$dir/5.16.1" "huggingface-hub>=1.5,<2"
echo "HF_HYBRID_OLD_TRANSFORMERS=$dir/5.16.1:$dir/5.19.0:$dir/5.22.2"
