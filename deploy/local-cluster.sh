#!/usr/bin/env bash
# A distributed Defuse on this machine, in one command: a private Redis (append-only
# file on), an S3-compatible server (s3s-fs), a coordinator and N workers on loopback.
#
#   deploy/local-cluster.sh [N_WORKERS] [CONFIG]    (defaults: 2, examples/mnist.toml)
#
# It submits CONFIG, follows it with `defuse status`, prints where the report is, and
# stops everything on exit (Ctrl-C included). Logs: runs/local-cluster/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2}
config=${2:-examples/mnist.toml}
deploy/setup.sh >/dev/null
deploy/setup-test.sh >/dev/null   # Redis and s3s-fs
. ./env.sh
cargo build --release -q -p defuse
bin=$CARGO_TARGET_DIR/release/defuse
s3s=$DEFUSE_CACHE/bin/bin/s3s-fs
dir=runs/local-cluster
mkdir -p "$dir/s3" "$dir/redis"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(port); s3_port=$(port); grpc_port=$(port); http_port=${DEFUSE_HTTP_PORT:-$(port)}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly yes --dir "$PWD/$dir/redis" >"$dir/redis.log" 2>&1 &
pids+=($!)
export AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local-secret AWS_REGION=us-east-1
"$s3s" --host 127.0.0.1 --port "$s3_port" --access-key local --secret-key local-secret "$dir/s3" >"$dir/s3.log" 2>&1 &
pids+=($!)
sleep 1
# fresh tokens (another user of this machine must not reach the cluster): the user
# token signs in to the page and is in $dir/token; jobs may read this repository
umask 077
DEFUSE_TOKEN=$(openssl rand -hex 32); DEFUSE_WORKER_TOKEN=$(openssl rand -hex 32)
export DEFUSE_TOKEN DEFUSE_WORKER_TOKEN
printf '%s\n' "$DEFUSE_TOKEN" >"$dir/token"
allow=(--allow-path "$PWD")                 # and where data/* links to (the cache)
for d in data/*; do allow+=(--allow-path "$(readlink -f "$d")"); done
"$bin" coordinator --listen "127.0.0.1:$grpc_port" --redis "redis://127.0.0.1:$redis_port/" \
  --artifacts s3://defuse/local --work-dir "$dir/work" --http-listen "127.0.0.1:$http_port" \
  "${allow[@]}" >"$dir/coordinator.log" 2>&1 &
pids+=($!)
export DEFUSE_COORDINATOR=http://127.0.0.1:$grpc_port
for i in $(seq 1 "$n"); do
  "$bin" worker --cache-dir "$dir/worker-$i" --threads 1 >"$dir/worker-$i.log" 2>&1 &
  pids+=($!)
done
sleep 1
job=$("$bin" submit "$config")
echo "submitted $job to $DEFUSE_COORDINATOR ($n workers); page: http://127.0.0.1:$http_port/jobs/$job (sign in with the token in $dir/token); logs in $dir/"
while true; do
  line=$("$bin" status "$job" | sed -n 2p)   # the job's row: id, state, step, shards
  echo "$line"
  case "$line" in
    *" done "*|*" failed "*|*" cancelled "*|*awaiting_labels*) break ;;
  esac
  sleep 5
done
echo "report: $dir/work/$job/report/index.html"
