#!/usr/bin/env bash
# A multi-host rehearsal on one machine: N local processes on 127.0.0.1, each with D fake CPU
# devices, one global mesh of N*D devices. Exactly the code path of a TPU pod or GPU cluster
# (jax.distributed, per-host batches, gathered log-probs, multi-process orbax checkpoints),
# configured through the SGPO_* environment variables instead of SLURM or TPU metadata.
#
# Usage:
#   WORKDIR=/tmp/rehearsal launch/local_multiprocess.sh --config=configs/tiny.py \
#       --config.model.tokenizer=gguf:smollm2 --config.data.source=prefs.jsonl
#   PROCESSES=4 DEVICES=2 WORKDIR=/tmp/r4 launch/local_multiprocess.sh --config=configs/tiny.py ...
#
# Logs go to $WORKDIR/process-<i>.log; the script waits for all processes and fails if any did.
set -euo pipefail
PROCESSES=${PROCESSES:-2}
DEVICES=${DEVICES:-4}
WORKDIR=${WORKDIR:?set WORKDIR to the run directory}
PORT=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
cd "$(dirname "$0")/.."
mkdir -p "$WORKDIR"
pids=()
for ((i = 0; i < PROCESSES; i++)); do
  SGPO_COORDINATOR=127.0.0.1:$PORT SGPO_NUM_PROCESSES=$PROCESSES SGPO_PROCESS_ID=$i \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" \
    python -m sgpo_jax.train --workdir="$WORKDIR" "$@" > "$WORKDIR/process-$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $WORKDIR/process-$i.log" >&2
    status=1
  fi
done
[[ $status == 0 ]] && echo "all $PROCESSES processes finished; metrics in $WORKDIR/metrics.jsonl"
exit $status
