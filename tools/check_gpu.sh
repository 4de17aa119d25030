#!/usr/bin/env bash
# GPU check, in under 8 minutes on one GPU (docs/benchmark.md, "GPU check"):
#   (a) the tests marked `cuda` (tests/test_models/test_gpu.py): the fused head, the
#       sparse SGD/Adam updates and fp16 loss scaling on the GPU against the
#       same computation on the CPU, NCCL on one rank, a head step without
#       host-device synchronization, the CUDA memory peak per interval;
#   (b) 60 iterations of IResNet-50 Partial FC 0.1 at 3M identities (AMP,
#       128 per GPU) printing the reference's speed line and the memory
#       table, then the fit check's prediction for the same config on this
#       GPU beside the measured speed and memory (tools/fit_check.py
#       --run-log); nothing is written outside a temporary folder;
#   (c) the same for model parallel (every center used, r50_mp_3m.py);
#   (d) on a GPU only: (b) with bf16 centers and int8 momentum
#       (center_dtype / center_state_dtype), to compare speed and memory.
#
#   bash tools/check_gpu.sh          # on a machine with CUDA
#   bash tools/check_gpu.sh --cpu    # the same logic on the CPU, scaled down
#
# --cpu hides the GPUs (CUDA_VISIBLE_DEVICES=), runs the tests with the
# device set to cpu (MMPFC_TEST_DEVICE=cpu; the tests that need CUDA skip),
# trains IResNet-18 with 1,000 identities for 4 iterations of batch 2 and
# runs the fit check without its step-time estimate, so that the script is
# exercised by the test suite (tests/test_tools/test_check_gpu.py). PYTHON
# picks the interpreter (default: the repo's .venv, else python).
set -euo pipefail

MODE=gpu
case "${1:-}" in
    --cpu) MODE=cpu ;;
    '') ;;
    *) echo "usage: bash $0 [--cpu]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON=python
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$ROOT"

CONFIG=configs/pfc/r50_pfc0.1_3m.py
if [ "$MODE" = cpu ]; then
    export CUDA_VISIBLE_DEVICES=
    export MMPFC_TEST_DEVICE=cpu
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    GPU_NAME=V100  # the fit check's memory budget only
    FIT_OPTIONS=(--no-timing)
    TRAIN_OPTIONS=(
        train_cfg.max_iters=4
        default_hooks.logger.interval=2
        model.backbone.depth=18
        model.head.num_classes=1000
        train_dataloader.dataset.num_classes=1000
        train_dataloader.dataset.num_samples=64
        train_dataloader.batch_size=2
        train_dataloader.num_workers=0
        train_dataloader.persistent_workers=False
        train_dataloader.pin_memory=False
        env_cfg.cudnn_benchmark=False
    )
else
    export MMPFC_TEST_DEVICE=cuda
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "check_gpu.sh: torch.cuda.is_available() is False; use --cpu" >&2
        exit 1
    fi
    GPU_NAME=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')
    FIT_OPTIONS=()
    TRAIN_OPTIONS=(
        train_cfg.max_iters=60
        default_hooks.logger.interval=20
        train_dataloader.num_workers=8
    )
fi

echo "== (a) tests marked cuda, device $MMPFC_TEST_DEVICE"
# -n 0: one process (the tests share the GPU and count its memory peaks)
"$PYTHON" -m pytest -m cuda tests/test_models/test_gpu.py -rs -p no:cacheprovider -n 0

# train NAME CONFIG [more --cfg-options]: a short run, its console output
# kept in $TMP/NAME.out; then the fit check's prediction beside it. The fit
# check failing (say, a GPU its table lacks) does not fail the GPU check.
train() {
    local name=$1 config=$2
    shift 2
    # MemoryTableHook prints after the first logger interval and at the end;
    # no checkpoint: the checkpoint hook is removed.
    "$PYTHON" tools/train.py "$config" --amp --work-dir "$TMP/$name" \
        --cfg-options "${TRAIN_OPTIONS[@]}" default_hooks.checkpoint=None \
        "$@" 2>&1 | tee "$TMP/$name.out"
    echo "== fit check of $config on one $GPU_NAME beside the run"
    "$PYTHON" tools/fit_check.py "$config" --gpus 1 --gpu "$GPU_NAME" \
        "${FIT_OPTIONS[@]}" --run-log "$TMP/$name.out" \
        --cfg-options "${TRAIN_OPTIONS[@]}" "$@" \
        || echo "check_gpu.sh: the fit check of $config failed (status $?)"
}

echo "== (b) $CONFIG --amp, ${TRAIN_OPTIONS[0]}"
train pfc "$CONFIG"
echo "== (c) configs/pfc/r50_mp_3m.py --amp, ${TRAIN_OPTIONS[0]}"
train mp configs/pfc/r50_mp_3m.py
if [ "$MODE" = gpu ]; then
    echo "== (d) $CONFIG with model.head.center_dtype=bfloat16," \
        "optim_wrapper.center_state_dtype=int8"
    train compact "$CONFIG" model.head.center_dtype=bfloat16 \
        optim_wrapper.center_state_dtype=int8
fi
echo "== check_gpu.sh ($MODE): done"
