#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (e.g. v5p-32: 16 chips on 4 hosts).
#
# Usage (from your workstation, with gcloud authenticated):
#   TPU=my-v5p-32 ZONE=us-east5-a WORKDIR=/mnt/ckpt/llama3-sgpo \
#     launch/tpu_pod.sh --config.model.source=meta-llama/Meta-Llama-3-8B-Instruct
#
# Every worker runs the same command; JAX reads the pod topology from the TPU metadata
# (SGPO_DISTRIBUTED=auto -> jax.distributed.initialize() without arguments), builds one mesh over
# all 16 chips and each host feeds its own rows of every global batch. Process 0 writes metrics,
# caches and the export; all processes write their checkpoint shards, so WORKDIR must be the
# same shared path on every worker (a Filestore/NFS mount, or a gcsfuse mount of a bucket: set
# BUCKET to mount gs://$BUCKET at /mnt/$BUCKET on every worker first).
#
# Environment:
#   TPU, ZONE        (required) TPU VM name and zone; PROJECT optional
#   WORKDIR          (required) shared run directory (see above)
#   CONFIG           training config (default configs/llama.py)
#   REPO_DIR         checkout of this repository on the workers (default ~/sgpo_jax)
#   SYNC=1           copy this checkout to every worker first (gcloud scp --recurse)
#   SETUP=1          pip install the package on every worker first (pip install -e "REPO_DIR[tpu]":
#                    the package with the jax[tpu] build of its supported jax range)
#   BUCKET=name      mount gs://name at /mnt/name with gcsfuse on every worker first
#   MESH             mesh flags (default: --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1)
# Extra arguments are passed to python -m sgpo_jax.train (e.g. --config.train.micro_batches=1).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
: "${WORKDIR:?set WORKDIR to a path shared by all workers (NFS/Filestore or a gcsfuse mount)}"
CONFIG=${CONFIG:-configs/llama.py}
REPO_DIR=${REPO_DIR:-sgpo_jax}
MESH=${MESH:---config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1}
GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=(--zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && TARGET+=(--project="$PROJECT")
HERE=$(cd "$(dirname "$0")/.." && pwd)

if [[ "${SYNC:-0}" == 1 ]]; then
  "${GCLOUD[@]}" scp --recurse "$HERE" "$TPU:~/$REPO_DIR" "${TARGET[@]}"
fi
if [[ "${SETUP:-0}" == 1 ]]; then
  "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --command \
    "pip install -e \"\$HOME/$REPO_DIR[tpu]\""
fi
if [[ -n "${BUCKET:-}" ]]; then
  "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --command \
    "sudo mkdir -p /mnt/$BUCKET && sudo chown \$USER /mnt/$BUCKET && (mountpoint -q /mnt/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/$BUCKET)"
fi

ARGS=$(printf ' %q' "$@")
"${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --command \
  "cd ~/$REPO_DIR && SGPO_DISTRIBUTED=auto python -m sgpo_jax.train --config=$CONFIG --workdir=$WORKDIR $MESH$ARGS"
