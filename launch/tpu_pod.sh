#!/usr/bin/env bash
# SaRO on a Cloud TPU pod slice: the same command on every worker (jax.distributed.initialize()
# auto-detects the slice). Assumes the repo and its .venv (launch/setup.sh with
# `pip install -e '.[tpu]'`) exist at $REPO on every worker and the workdir is shared by all
# workers (e.g. a Filestore/NFS mount or a gcsfuse-mounted bucket).
#
#   TPU=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh \
#       --config configs/saro.py:qwen2_5_7b --workdir /mnt/shared/runs/saro-qwen
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE}"
REPO=${REPO:-~/saro_jax}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO && .venv/bin/python -m saro_jax.main --multihost$args"
