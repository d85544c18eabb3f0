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

# A folder of pinned PyPI packages (`pip install --target`), installed from scratch
# when its pins change: pinned_env <folder> <what, for the log> <pin>...
pinned_env() {
  local dir=$1 what=$2
  shift 2
  local stamp
  stamp=$(printf '%s\n' "$@" | sha256sum | cut -c1-16)
  if [ ! -f "$dir/.complete-$stamp" ]; then
    log "installing $what into $dir"
    rm -rf "$dir.tmp"
    python3 -m pip install --quiet --disable-pip-version-check --target "$dir.tmp" "$@"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
    touch "$dir/.complete-$stamp"
  fi
}

# The Python client's tests (python/tests, run by cli/tests/python.rs): pytest and
# pandas, pinned, in a folder of their own; pyarrow reads the Parquet files Defuse
# writes and writes the ones the data tests read.
pinned_env "$cache/py-client-env" "pytest + pandas + pyarrow" "pytest==8.3.4" "pandas==2.2.3" "numpy==2.2.6" "pyarrow==22.0.0"

# Offline checks of the Helm chart (deploy/check-chart.py): Helm 4 as a library and the
# Kubernetes JSON schemas, every package pinned. Its own folder (~360 MB): a second
# `pip install --target` into pytest-env would have to replace that folder's bin/.
# Reinstalled from scratch when the pins change.
chart_pins=(
  "helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0"
  "jsonschema==4.26.0" "jsonschema-specifications==2025.9.1" "referencing==0.37.0"
  "rpds-py==2026.9.1" "attrs==26.1.0" "PyYAML==6.0.4" "packaging==26.4"
  "importlib-resources==7.1.0" "typing-extensions==4.16.0"
)
pinned_env "$cache/chart-env" "helm-python-sdk + kubernetes-validate" "${chart_pins[@]}"

# Redis (Debian's package; tests start private servers on free ports)
if ! command -v redis-server >/dev/null 2>&1; then
  log "installing redis-server"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q redis-server >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }
  else sudo apt-get install -y -q redis-server >/dev/null; fi
  # the package starts a system server on 6379; tests never use it
  (service redis-server stop || systemctl stop redis-server) >/dev/null 2>&1 || true
fi

# openssl (the TLS test makes a private CA) and curl (it checks HTTPS), Debian's
for tool in openssl curl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    log "installing $tool"
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q "$tool" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "$tool" >/dev/null; }
    else sudo apt-get install -y -q "$tool" >/dev/null; fi
  fi
done

# S3-compatible server for tests: s3s-fs 0.14.1 (later versions need a newer Rust)
bin=$cache/bin
if [ ! -x "$bin/bin/s3s-fs" ]; then
  log "building s3s-fs 0.14.1 (one time, a few minutes)"
  cargo install --quiet --root "$bin" s3s-fs@0.14.1 --features binary --locked
fi

# The browser test (cli/tests/web.rs): Debian's Chromium, driven by playwright-core
# from npm with executablePath set (playwright's own browser download cannot work here).
if ! command -v chromium >/dev/null 2>&1; then
  log "installing chromium"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else sudo apt-get install -y -q chromium >/dev/null; fi
fi
nodeenv=$cache/node-env
if [ ! -f "$nodeenv/.complete-playwright-core-1.65.1" ]; then
  log "installing playwright-core 1.65.1 into $nodeenv"
  mkdir -p "$nodeenv"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund --prefix "$nodeenv" playwright-core@1.65.1 >/dev/null
  touch "$nodeenv/.complete-playwright-core-1.65.1"
fi

# Test binaries (about 0.5 GB each, a set per build of the workspace) pile up in the
# shared target folder and once filled the disk: those not rebuilt for a day go
# (cargo links them again when they are needed).
target=${CARGO_TARGET_DIR:-$cache/target}
if [ -d "$target/debug/deps" ]; then
  find "$target/debug/deps" -maxdepth 1 -type f -perm -u+x ! -name '*.*' -mmin +1440 -delete 2>/dev/null || true
fi
