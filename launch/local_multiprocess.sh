#!/usr/bin/env bash
# N JAX processes on this machine (jax.distributed over 127.0.0.1), e.g. to rehearse a multi-host
# run on CPU before a pod. Each process gets DEVICES virtual CPU devices; logs go to
# <workdir>/process_<i>.log and process 0 also prints to the terminal. EXTRA_XLA_FLAGS, if set, are
# appended to each process's XLA_FLAGS.
#
#   NUM_PROCESSES=2 DEVICES=2 bash launch/local_multiprocess.sh \
#       --config configs/saro.py --workdir runs/saro-tiny-2proc
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES=${DEVICES:-2}
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
PY=${PY:-.venv/bin/python}
LOGDIR=${LOGDIR:-runs/local_multiprocess_logs}
mkdir -p "$LOGDIR"

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES} ${EXTRA_XLA_FLAGS:-}" \
      JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JAX_NUM_PROCESSES="$NUM_PROCESSES" JAX_PROCESS_ID="$i" \
      "$PY" -m saro_jax.main --multihost "$@" > "$LOGDIR/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -f "$LOGDIR/process_0.log" --pid "${pids[0]}" &
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
echo "all $NUM_PROCESSES processes finished (exit status $status); logs in $LOGDIR"
exit "$status"
