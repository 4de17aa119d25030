#!/usr/bin/env bash
# Distributed training with torchrun, on GPUs (NCCL) or, without CUDA, on the
# CPU (gloo):
#   bash tools/dist_train.sh CONFIG NPROC [tools/train.py options]
# Several machines: run it on each with NNODES, NODE_RANK, MASTER_ADDR and
# PORT set, e.g. NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash ... CONFIG 8
# PYTHON picks the interpreter (default: the repo's .venv, else python).
set -e

CONFIG=$1
NPROC=$2
if [ -z "$CONFIG" ] || [ -z "$NPROC" ]; then
    echo "usage: bash $0 CONFIG NPROC_PER_NODE [train.py options]" >&2
    exit 2
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}

# torchrun sets 1 thread per process anyway, with a 4-line notice; say it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$PYTHON" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON=python
    fi
fi

PYTHONPATH="$ROOT":$PYTHONPATH \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" \
    --master_port="$PORT" \
    "$ROOT/tools/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
