#!/usr/bin/env bash
# One DSA training phase under torchrun, on one node or many.
#
#   launch/torchrun.sh --config configs/tiny/pretrain.yaml [key=value ...]
#
# Environment (the usual conventions; defaults give one node):
#   NPROC_PER_NODE  processes per node (default: GPUs on this node, else 1)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank, 0..NNODES-1 (default 0)
#   MASTER_ADDR     address of node 0 (default 127.0.0.1)
#   MASTER_PORT     port on node 0 (several nodes: default 29500; one node: unset lets
#                   torchrun bind a free port itself, so jobs side by side never collide)
#   PYTHON          interpreter (default: python)
# Backend: nccl on GPU, gloo on CPU (chosen by the trainer).
#
# The config, data and checkpoints are validated once, in one process, before torchrun starts
# any worker: bad input stops with one "error: ..." line and exit status 2.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
if [[ "$NNODES" == 1 && -z "${MASTER_PORT:-}" ]]; then
    # torchrun's own rendezvous on a port it binds at once (a port picked in advance can be
    # taken by another job before the workers bind it).
    RENDEZVOUS=(--standalone)
else
    RENDEZVOUS=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
                --master-port "${MASTER_PORT:-29500}")
fi

# torch 2.x no longer needs CUDA_DEVICE_MAX_CONNECTIONS for TP=1, but TP > 1 does (and
# Megatron's argument validation, run by the check below, asserts it).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

# Validate before any worker starts (RANK unset: this process reports the error), for the
# world size the workers will have (parallel sizes must divide it).
env -u RANK WORLD_SIZE="$((NPROC_PER_NODE * NNODES))" "$PYTHON" "$HERE/train.py" --check "$@" >/dev/null
exec "$PYTHON" -m torch.distributed.run \
    --nproc-per-node "$NPROC_PER_NODE" \
    "${RENDEZVOUS[@]}" \
    "$HERE/train.py" "$@"
