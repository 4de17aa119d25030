#!/usr/bin/env bash
# Training under Slurm (one task per GPU):
#   bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG [tools/train.py options]
# GPUS (default 8), GPUS_PER_NODE (8), CPUS_PER_TASK (5), SRUN_ARGS and
# PYTHON (default python) tune the job; PORT sets the rendezvous port.
#
# Preemption (docs/training.md, "Preemption and time limits"): on SIGTERM or
# SIGUSR1 every rank finishes its iteration, the ranks save it and exit with
# status 75. SIGNAL_AHEAD=SECONDS asks Slurm for SIGUSR1 that long before the
# time limit (srun --signal=USR1@SECONDS); REQUEUE=1 requeues the job
# (scontrol requeue, inside an sbatch allocation) when it exits with 75.
# Pass --resume: a first start without a checkpoint trains from the start.
# srun's status alone does not say "preempted": --kill-on-bad-exit lets the
# first rank to exit with 75 get the others killed, and srun then reports
# their signal. So the ranks also create a marker file (MMPFC_PREEMPTED_FILE,
# in the submit folder, which the nodes share) when they stop on the signal.
set -x

PARTITION=$1
JOB_NAME=$2
CONFIG=$3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREEMPTED=75
MMPFC_PREEMPTED_FILE="$PWD/.mmpfc-preempted.${SLURM_JOB_ID:-x}.$$"
export MMPFC_PREEMPTED_FILE
rm -f "$MMPFC_PREEMPTED_FILE"
if [ -n "${SIGNAL_AHEAD:-}" ]; then
    SRUN_ARGS="--signal=USR1@${SIGNAL_AHEAD} ${SRUN_ARGS}"
fi

PYTHONPATH="$ROOT":$PYTHONPATH \
srun -p "${PARTITION}" \
    --job-name="${JOB_NAME}" \
    --gres=gpu:"${GPUS_PER_NODE}" \
    --ntasks="${GPUS}" \
    --ntasks-per-node="${GPUS_PER_NODE}" \
    --cpus-per-task="${CPUS_PER_TASK}" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    "$PYTHON" -u "$ROOT/tools/train.py" "${CONFIG}" --launcher slurm "${@:4}"
status=$?
if [ -f "$MMPFC_PREEMPTED_FILE" ]; then
    rm -f "$MMPFC_PREEMPTED_FILE"
    status=$PREEMPTED
fi
if [ "$status" -eq "$PREEMPTED" ]; then
    echo "slurm_train.sh: preempted; the last iteration is saved: resume" \
        "with --resume" >&2
    if [ "${REQUEUE:-0}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        scontrol requeue "$SLURM_JOB_ID"
    fi
fi
exit "$status"
