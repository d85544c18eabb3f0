#!/usr/bin/env bash
# What the test suite needs beyond deploy/setup.sh. Idempotent, cached.
set -euo pipefail
cache=${DEFUSE_CACHE:-$HOME/.cache/defuse}
log() { echo "setup-test: $*" >&2; }
mkdir -p "$cache"

# Python side of the tests: scikit-learn as the DP-GMM reference, torch for fixtures.
pyenv=$cache/pytest-env
if [ ! -f "$pyenv/.complete" ]; then
  log "installing scikit-learn + numpy + scipy into $pyenv"
  python3 -m pip install --quiet --disable-pip-version-check --target "$pyenv" \
    "numpy<3" "scipy" "scikit-learn==1.5.2"
  touch "$pyenv/.complete"
fi

# Redis (Debian's package; tests start private servers on free ports)
if ! command -v redis-server >/dev/null 2>&1; then
  log "installing redis-server"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q redis-server >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }
  else sudo apt-get install -y -q redis-server >/dev/null; fi
  # the package starts a system server on 6379; tests never use it
  (service redis-server stop || systemctl stop redis-server) >/dev/null 2>&1 || true
fi

# S3-compatible server for tests: s3s-fs 0.14.1 (later versions need a newer Rust)
bin=$cache/bin
if [ ! -x "$bin/bin/s3s-fs" ]; then
  log "building s3s-fs 0.14.1 (one time, a few minutes)"
  cargo install --quiet --root "$bin" s3s-fs@0.14.1 --features binary --locked
fi
