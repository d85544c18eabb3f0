#!/usr/bin/env bash
# Python side of the benchmarks (not of the tests): PyTorch 2.11.0, the same libtorch
# Defuse links, for the reference identify loops, and scikit-learn 1.5.2 for the
# DP-GMM comparison. `import torch` needs libtorch_python.so, which links the CUDA
# libraries, so the wheel comes with its pinned CUDA dependencies (~4 GB, once); the
# benchmarks run it on the CPU only. Idempotent, cached.
set -euo pipefail
cache=${DEFUSE_CACHE:-$HOME/.cache/defuse}
env=$cache/bench-env
pins=("torch==2.11.0" "numpy==2.3.4" "scipy==1.16.3" "scikit-learn==1.5.2")
stamp=$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-16)
if [ ! -f "$env/.complete-$stamp" ]; then
  echo "bench setup: installing PyTorch 2.11.0 (CPU use) + scikit-learn into $env" >&2
  rm -rf "$env.tmp"
  python3 -m pip install --quiet --disable-pip-version-check --target "$env.tmp" "${pins[@]}"
  rm -rf "$env"
  mv "$env.tmp" "$env"
  touch "$env/.complete-$stamp"
fi
echo "$env"
