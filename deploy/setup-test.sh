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
