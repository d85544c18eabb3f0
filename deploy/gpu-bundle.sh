#!/usr/bin/env bash
# deploy/gpu-bundle.sh: what deploy/gpu-check.sh needs on a GPU machine that has
# PyTorch but no Rust and no network, in gpu-bundle/ (ignored by git; about 40 MiB):
# the release `defuse` binary built here against libtorch 2.11.0 (the version of the
# lent machines' torch wheel), stripped, and MNIST gzipped. The binary loads
# libtorch_cuda.so at run time when a job asks for a GPU (core/src/frozen.rs), so
# this CPU build runs on the GPU machine with LD_LIBRARY_PATH at its torch/lib.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh >/dev/null
. ./env.sh
cargo build --release -q -p defuse
mkdir -p gpu-bundle/mnist
cp "$CARGO_TARGET_DIR/release/defuse" gpu-bundle/defuse
strip gpu-bundle/defuse
for f in data/mnist/*-ubyte; do
  gzip -9 -c "$f" >"gpu-bundle/mnist/$(basename "$f").gz"
done
du -sh gpu-bundle gpu-bundle/* gpu-bundle/mnist/*
