#!/usr/bin/env bash
# Runs N copies of a command on this machine as one multi-process JAX job (CPU, gloo collectives).
#
#   launch/local_multiprocess.sh N [--devices D] CMD ARGS...
#   e.g. launch/local_multiprocess.sh 2 --devices 2 llava-jax train --config ... --workdir /tmp/run
#
# Each process gets D fake CPU devices (default 1) and the JAX_COORDINATOR_ADDRESS /
# JAX_NUM_PROCESSES / JAX_PROCESS_ID variables `llava-jax train` reads to call
# jax.distributed.initialize (other XLA_FLAGS in the environment are kept). Process i logs to
# $LOG_DIR/process_i.log (default: a temp folder) and process 0 also to stderr. Exits with the first non-zero exit code, else 0.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 N [--devices D] CMD ARGS..." >&2
  exit 2
fi
N=$1; shift
DEVICES=1
if [[ "${1:-}" == "--devices" ]]; then DEVICES=$2; shift 2; fi
PORT=${COORDINATOR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"

OTHER_XLA_FLAGS=$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g' <<< "${XLA_FLAGS:-}")

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="$OTHER_XLA_FLAGS --xla_force_host_platform_device_count=$DEVICES" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
    "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done
if [[ "${QUIET:-0}" != 1 ]]; then tail -n +1 -f "$LOG_DIR/process_0.log" >&2 & TAIL=$!; fi

status=0
for pid in "${pids[@]}"; do
  code=0
  wait "$pid" || code=$?
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    cleanup  # one process failing would leave the others waiting at a collective
  fi
done
[[ -n "${TAIL:-}" ]] && kill "$TAIL" 2>/dev/null || true
if [[ $status -ne 0 ]]; then echo "local_multiprocess: a process exited $status (logs in $LOG_DIR)" >&2; fi
exit $status
