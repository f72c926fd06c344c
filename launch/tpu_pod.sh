#!/usr/bin/env bash
# LLaVA-1.5 on a Cloud TPU VM slice: create it, copy the code, build the venv on every worker,
# then run stage 1 (pretrain) and stage 2 (finetune) with the SAME command on all workers.
#
#   PROJECT=my-proj ZONE=us-central2-b TPU_NAME=llava ACCELERATOR=v4-64 \
#   BUCKET=gs://my-bucket SIZE=7b launch/tpu_pod.sh [create|setup|pretrain|finetune|all|delete]
#
# Data: LCS-558K (blip_laion_cc_sbu_558k.json + images) and llava_v1_5_mix665k.json + its image
# folders, readable from every worker (a GCS FUSE mount or a copy on each VM's disk), at
# $DATA/pretrain and $DATA/finetune. Workdirs live in $BUCKET, so a preempted slice resumes by
# re-running the same stage: every checkpoint (params, optimizer, step, data position) is there.
# `jax.distributed.initialize()` runs on every worker (TPU_WORKER_HOSTNAMES lists the slice).
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
TPU_NAME=${TPU_NAME:-llava}
ACCELERATOR=${ACCELERATOR:-v4-64}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
SIZE=${SIZE:-7b}
DATA=${DATA:-/mnt/data}
VISION=${VISION:-$BUCKET/models/llava-1.5-$SIZE-init}   # HF LLaVA folder: CLIP-L/336 + Vicuna-1.5, projector fresh
RUN=${RUN:-llava-1.5-$SIZE}
STAGE1=$BUCKET/runs/$RUN/pretrain
STAGE2=$BUCKET/runs/$RUN/finetune
REPO_DIR='~/llava-jax'

tpu() { gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

create() {
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ${SPOT:+--spot}
}

setup() {
  # Copy this checkout (without venv/outputs) to every worker and build the pinned venv there.
  local tarball
  tarball=$(mktemp --suffix=.tgz)
  git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$tarball" HEAD
  tpu scp "$tarball" "$TPU_NAME:~/llava-jax.tgz" --worker=all
  on_all "mkdir -p $REPO_DIR && tar -xzf ~/llava-jax.tgz -C $REPO_DIR && cd $REPO_DIR && \
    python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && \
    .venv/bin/pip install -q --no-deps -e ."
}

train() {  # $1 = stage, then extra --config.KEY=VALUE flags; identical on every worker
  local stage=$1 workdir=$2; shift 2
  on_all "cd $REPO_DIR && .venv/bin/llava-jax train \
    --config configs/llava_v1_5.py:stage=$stage,size=$SIZE --workdir $workdir $*"
}

pretrain() {
  # Stage 1: projector only, lr 1e-3, global batch 256, `plain` template, one epoch.
  train pretrain "$STAGE1" \
    --config.init="$VISION" \
    --config.data.json="$DATA/pretrain/blip_laion_cc_sbu_558k.json" \
    --config.data.image_folder="$DATA/pretrain/images"
}

finetune() {
  # Stage 2: init = the stage-1 WORKDIR (its latest checkpoint and its model/ tokenizer files);
  # projector + language model, lr 2e-5, global batch 128, `vicuna_v1`, one epoch.
  train finetune "$STAGE2" \
    --config.init="$STAGE1" \
    --config.data.json="$DATA/finetune/llava_v1_5_mix665k.json" \
    --config.data.image_folder="$DATA/finetune"
  echo "export for transformers: llava-jax convert jax-to-hf $STAGE2 OUT_DIR" >&2
}

delete() { tpu delete "$TPU_NAME" --quiet; }

case "${1:-all}" in
  create) create ;;
  setup) setup ;;
  pretrain) pretrain ;;
  finetune) finetune ;;
  delete) delete ;;
  all) create; setup; pretrain; finetune ;;
  *) echo "usage: $0 [create|setup|pretrain|finetune|all|delete]" >&2; exit 2 ;;
esac
