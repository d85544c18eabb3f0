#!/usr/bin/env bash
# deploy/gpu-check.sh: Defuse on an NVIDIA GPU, end to end, in one go (about 5 minutes
# on an H200; budget 10 on a fresh machine). Prints one table; every figure also goes
# to $OUT/gpu-check.json (OUT: the device tool's output folder, else runs/gpu-check).
#
#   1. trains the built-in MNIST models on the GPU and runs the whole job there
#      (identify on the MNIST test split, distill, automatic labels, correct);
#   2. runs identify again on the CPU with the same models and compares the failures:
#      the images flagged, and the codes of the failures both found (float tolerance);
#      Then identify once more on the device with bfloat16 autocast
#      (identify.precision), to compare its speed and its failures with float32;
#   3. runs the same job distributed (a coordinator and one GPU worker, state in
#      memory, artifacts in a folder): identify shards and one fine-tune round per
#      epoch on the worker's GPU; its failures must equal the embedded GPU run's;
#   4. prints perturbations/s (GPU, CPU) and the GPU's utilisation during identify.
#
# The binary: $DEFUSE_BIN, else gpu-bundle/defuse (deploy/gpu-bundle.sh builds it on a
# development machine: the same libtorch 2.11.0, CPU build, stripped; it loads
# libtorch_cuda at run time), else a CUDA build here with cargo against the torch
# wheel's own libtorch when cargo is installed. MNIST: gpu-bundle/mnist, else
# data/mnist. libtorch at run time: the torch wheel of the machine's Python.
#
# Usage: deploy/gpu-check.sh [--device cuda|cpu] [--quick]
#   --device cpu: the same steps with the CPU standing in for the GPU (a self-check of
#                 this script on a machine without one); --quick: 1 epoch, 600 images.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
device=cuda
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    *) echo "usage: $0 [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
  esac
done
out=${OUT:-runs/gpu-check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out/marks.txt"
work=$(mktemp -d /tmp/defuse-gpu-check.XXXXXX)
pids=()
cleanup() {
  for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM
log() { echo "gpu-check: $*" >&2; }
t0=$(date +%s)

# --- libtorch: the machine's torch wheel (the lent machines: /opt/torch/.venv) -------
py=python3
for c in /opt/torch/.venv/bin/python "${VIRTUAL_ENV:-/nonexistent}/bin/python"; do
  if [ -x "$c" ]; then py=$c; break; fi
done
torch_dir=$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null) || {
  [ "$device" = cpu ] && [ -n "${LIBTORCH:-}" ] && torch_dir=$LIBTORCH
}
[ -n "${torch_dir:-}" ] || { log "no Python torch found (tried $py) and no LIBTORCH"; exit 1; }
export LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "libtorch from $torch_dir"

# --- the binary ----------------------------------------------------------------------
bin=${DEFUSE_BIN:-}
if [ -z "$bin" ] && [ -x gpu-bundle/defuse ]; then bin=$root/gpu-bundle/defuse; fi
if [ -z "$bin" ]; then
  command -v cargo >/dev/null || { log "no gpu-bundle/defuse, no DEFUSE_BIN and no cargo: run deploy/gpu-bundle.sh on a development machine and carry gpu-bundle/"; exit 1; }
  log "building defuse (release) against $torch_dir"
  export LIBTORCH=$torch_dir LIBTORCH_BYPASS_VERSION_CHECK=1
  if [ "$device" = cuda ]; then
    cargo build --release -q -p defuse --features cuda
  else
    cargo build --release -q -p defuse
  fi
  bin=${CARGO_TARGET_DIR:-$root/target}/release/defuse
fi
"$bin" --version >/dev/null || { log "$bin does not start (libraries: ldd $bin)"; exit 1; }
log "binary $bin"

data=gpu-bundle/mnist
[ -d "$data" ] || data=data/mnist
[ -e "$data/t10k-images-idx3-ubyte" ] || [ -e "$data/t10k-images-idx3-ubyte.gz" ] || {
  log "no MNIST in gpu-bundle/mnist or data/mnist"; exit 1; }
data=$(cd "$data" && pwd)

gpu_name=cpu
if [ "$device" = cuda ]; then
  gpu_name=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
  log "GPU: $gpu_name"
  # utilisation sampled every 200 ms for the whole check; the identify-only runs'
  # windows (marks.txt) are cut out by gpu-check-compare.py
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
    -lms 200 >"$out/gpu-util.csv" 2>/dev/null &
  pids+=($!)
fi

if [ "$quick" = 1 ]; then
  epochs=(1 1); limit=600; shard=200
else
  epochs=(3 6); limit=0; shard=1000
fi
# a job file; $1 = out folder, $2 = device, $3 = extra TOML
job() {
  cat <<EOF
name = "gpu-check"
seed = 0
out = "$1"
device = "$2"
[data]
path = "$data"
[train]
classifier_epochs = ${epochs[0]}
vae_epochs = ${epochs[1]}
vae_latent = 10
[identify]
split = "test"
samples = 100
limit = $limit
shard_size = $shard
$3
[label]
mode = "source-majority"
EOF
}
# identify's rows per forward: large on a GPU, the CPU default on the CPU
gpu_sizes='batch_size = 512
chunk = 16384'
[ "$device" = cpu ] && gpu_sizes=''
stamp() { date +%s.%N; }

# --- 1. the whole job on the device, embedded -----------------------------------------
job "$work/dev" "$device" "$gpu_sizes" >"$work/dev.toml"
log "1/3 defuse run on $device (trains the models, then the whole job)"
s1=$(stamp)
"$bin" run "$work/dev.toml" >"$out/run-device.log" 2>&1 || { tail -20 "$out/run-device.log"; exit 1; }
e1=$(stamp)

# --- 2. identify on the CPU with the same models (stops at labelling: exit 3) ---------
models="[models]
classifier = \"$work/dev/models/classifier.safetensors\"
vae = \"$work/dev/models/vae.safetensors\""
{ job "$work/cpu" cpu ""; echo "$models"; } | sed 's/^mode = "source-majority"/mode = "manual"/' >"$work/cpu.toml"
log "2/3 identify on the CPU with the same models"
rc=0
"$bin" run "$work/cpu.toml" >"$out/run-cpu.log" 2>&1 || rc=$?
[ "$rc" = 3 ] || { tail -20 "$out/run-cpu.log"; log "the CPU run exited $rc, expected 3 (waiting for labels)"; exit 1; }
# identify alone on the device, in float32 and in bfloat16: clean rates, and the
# GPU's utilisation during each (the start and end of each go to marks.txt)
for prec in float32 bfloat16; do
  log "2/3 identify alone on $device in $prec with the same models"
  { job "$work/$prec" "$device" "$gpu_sizes
precision = \"$prec\""; echo "$models"; } | sed 's/^mode = "source-majority"/mode = "manual"/' >"$work/$prec.toml"
  echo "$prec start $(stamp)" >>"$out/marks.txt"
  rc=0
  "$bin" run "$work/$prec.toml" >"$out/run-$prec.log" 2>&1 || rc=$?
  echo "$prec end $(stamp)" >>"$out/marks.txt"
  [ "$rc" = 3 ] || { tail -20 "$out/run-$prec.log"; log "the $prec run exited $rc, expected 3"; exit 1; }
done

# --- 3. distributed: a coordinator and one worker on the device -----------------------
log "3/3 the same job on a coordinator and one $device worker"
port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc=$(port)
DEFUSE_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
DEFUSE_WORKER_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export DEFUSE_TOKEN DEFUSE_WORKER_TOKEN DEFUSE_COORDINATOR=http://127.0.0.1:$grpc
"$bin" coordinator --listen "127.0.0.1:$grpc" --artifacts "file://$work/artifacts" \
  --work-dir "$work/coordinator" --allow-path "$work" --allow-path "$data" \
  >"$out/coordinator.log" 2>&1 &
pids+=($!)
"$bin" worker --device "$device" --cache-dir "$work/worker" --exit-when-idle 30 \
  >"$out/worker.log" 2>&1 &
pids+=($!)
{ job "$work/dist-unused" "$device" "$gpu_sizes"; echo "$models"; } >"$work/dist.toml"
for _ in $(seq 50); do "$bin" status >/dev/null 2>&1 && break; sleep 0.2; done
s3=$(stamp)
id=$("$bin" submit "$work/dist.toml" --job-id gpu-check)
rc=0
"$bin" status "$id" --watch >"$out/dist-status.log" 2>&1 || rc=$?
e3=$(stamp)
[ "$rc" = 0 ] || { tail -5 "$out/dist-status.log"; tail -20 "$out/worker.log"; log "the distributed job ended with exit $rc"; exit 1; }
"$bin" results "$id" --out "$work/dist" >/dev/null

# --- compare and report ----------------------------------------------------------------
"$py" deploy/gpu-check-compare.py "$work" "$out" "$device" "$gpu_name" "$s1" "$e1" "$s3" "$e3" "$t0"
