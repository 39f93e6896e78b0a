#!/usr/bin/env bash
# One process driving all local GPUs (e.g. 8x H100 in one node): no jax.distributed needed.
#
# Usage:
#   WORKDIR=runs/llama3 launch/single_node_gpu.sh --config.model.source=/models/Meta-Llama-3-8B-Instruct
#   CUDA_VISIBLE_DEVICES=0,1,2,3 CONFIG=configs/mistral.py WORKDIR=runs/zephyr launch/single_node_gpu.sh
#
# The default mesh shards parameters, gradients and Adam state over every visible GPU (FSDP,
# data=1); the batch is split over the same devices. Rerunning the same command resumes.
#
# SETUP=1 first runs pip install -e ".[$JAX_EXTRA]" in this checkout: the package with the
# CUDA build of its supported jax range (JAX_EXTRA: cuda13 by default, cuda12 for older drivers).
set -euo pipefail
CONFIG=${CONFIG:-configs/llama.py}
WORKDIR=${WORKDIR:?set WORKDIR to the run directory}
MESH=${MESH:---config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1}
cd "$(dirname "$0")/.."
if [[ "${SETUP:-0}" == 1 ]]; then
  pip install -e ".[${JAX_EXTRA:-cuda13}]"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export SGPO_DISTRIBUTED=off  # one process, even inside a SLURM allocation
# shellcheck disable=SC2086
exec python -m sgpo_jax.train --config="$CONFIG" --workdir="$WORKDIR" $MESH "$@"
