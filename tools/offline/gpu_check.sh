#!/usr/bin/env bash
# The GPU check (tools/check_gpu.sh) on an air-gapped GPU machine whose Python
# 3.12 already holds torch, torchvision, numpy, opencv-python-headless,
# tensorboard, onnx and onnxruntime, but not MMEngine, mmcv-lite, mmpretrain
# and their own needs. Those come as wheels, fetched beforehand where PyPI is
# reachable:
#
#   bash tools/offline/fetch_wheels.sh      # with network: fills wheels/ (git-ignored)
#   # copy the checkout with wheels/ to the GPU machine, then from the repo root:
#   bash tools/offline/gpu_check.sh         # on the GPU
#   bash tools/offline/gpu_check.sh --cpu   # rehearsal: check_gpu.sh --cpu
#
# Options: --cpu (passed to check_gpu.sh), --wheels DIR (default: wheels/).
# PYTHON picks the interpreter that holds torch (default: python3).
# With OUT set, the whole output is also written to $OUT/gpu_check.log.
#
# The wheels are installed with `pip install --no-index --no-deps --target`
# into a fresh temporary folder put first on PYTHONPATH: nothing of the
# interpreter is changed, and it works whether python3 is a system Python, a
# conda Python or itself a venv (a `venv --system-site-packages` made from a
# venv would not see that venv's torch). --no-deps because mmengine and
# mmcv-lite declare opencv-python, which the image replaces with
# opencv-python-headless (the same cv2); tools/offline/requirements-gpu-image.txt
# is the whole closure instead. A package marked [if-missing] there is
# installed only when the interpreter lacks it, so the image's own copy
# (matplotlib, pytest, ...) is used where there is one. mmpfc itself is not
# installed: check_gpu.sh runs it from this checkout (the repo root first on
# PYTHONPATH), and nothing reads mmpfc's package metadata.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)

if [ -n "${OUT:-}" ] && [ -z "${MMPFC_GPU_CHECK_TEED:-}" ]; then
    mkdir -p "$OUT"
    set +e
    MMPFC_GPU_CHECK_TEED=1 bash "$0" "$@" 2>&1 | tee "$OUT/gpu_check.log"
    status=${PIPESTATUS[0]}
    exit "$status"
fi

CHECK_ARGS=()
WHEELS="$ROOT/wheels"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CHECK_ARGS=(--cpu); shift ;;
        --wheels) WHEELS=$(cd "$2" && pwd); shift 2 ;;
        *) echo "usage: bash $0 [--cpu] [--wheels DIR]" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
LIST="$ROOT/tools/offline/requirements-gpu-image.txt"
cd "$ROOT"

echo "== gpu_check.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), python: $(command -v "$PYTHON" || echo "$PYTHON")"
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "gpu_check.sh: '$PYTHON' cannot import torch; set PYTHON to the" \
        "interpreter that holds it" >&2
    exit 1
fi
"$PYTHON" - <<'EOF'
import sys
import torch
print(f'Python {sys.version.split()[0]}, torch {torch.__version__}, '
      f'CUDA available: {torch.cuda.is_available()}')
if sys.version_info[:2] != (3, 12):
    print('gpu_check.sh: warning: the bundle is made for CPython 3.12; its '
          'compiled wheels (matplotlib, pyyaml, ...) install only there')
EOF
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_check.sh: no wheels in $WHEELS: run" \
        "'bash tools/offline/fetch_wheels.sh' where PyPI is reachable and" \
        "bring the folder along (it is git-ignored)" >&2
    exit 1
fi

SITE=$(mktemp -d "${TMPDIR:-/tmp}/mmpfc-site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT

echo "== install the bundle ($WHEELS) into a temporary folder"
start=$SECONDS
# the wheels to install, one a line: every [always] pin, and each
# [if-missing] pin that this interpreter has no distribution of
selected=$("$PYTHON" - "$LIST" "$WHEELS" <<'EOF'
import glob
import os.path as osp
import re
import sys
from importlib import metadata

list_file, wheel_dir = sys.argv[1:]


def norm(name):
    return re.sub(r'[-_.]+', '-', name).lower()


wheels = {}
for path in glob.glob(osp.join(wheel_dir, '*.whl')):
    name, version = osp.basename(path).split('-')[:2]
    wheels.setdefault(norm(name), []).append((version, path))

errors, used = [], []
for line in open(list_file):
    pin, _, comment = line.partition('#')
    pin = pin.strip()
    if not pin:
        continue
    name, version = pin.split('==')
    found = wheels.get(norm(name), [])
    if [v for v, _ in found] != [version]:
        errors.append(f'{pin}: wheels there: {[v for v, _ in found] or "none"}')
        continue
    if '[if-missing]' in comment:
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is not None:
            used.append(f'{name} {have}')
            continue
    print(found[0][1])
if errors:
    sys.exit('gpu_check.sh: the wheels do not match '
             'tools/offline/requirements-gpu-image.txt (run '
             'tools/offline/fetch_wheels.sh again):\n  ' + '\n  '.join(errors))
print('from the interpreter: ' + (', '.join(used) or 'none'),
      file=sys.stderr)
EOF
)
SELECTED=()
[ -z "$selected" ] || mapfile -t SELECTED <<<"$selected"
echo "installing ${#SELECTED[@]} wheels:" \
    "$(for w in "${SELECTED[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
if [ ${#SELECTED[@]} -gt 0 ]; then
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-cache-dir \
        --no-index --no-deps --no-compile --target "$SITE" "${SELECTED[@]}"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
echo "installed in $((SECONDS - start)) s"

echo "== imports and declared requirements"
PYTHONPATH="$ROOT:$PYTHONPATH" "$PYTHON" - "$ROOT" "$SITE" <<'EOF'
import os.path as osp
import sys
from importlib import metadata

root, site = sys.argv[1:]
import pkg_resources  # noqa: F401  (mmengine 0.10.7 needs it)
import mmcv
import mmengine
import mmpretrain
import mmpfc
for mod in (mmengine, mmcv, mmpretrain):
    print(f'{mod.__name__} {mod.__version__} from '
          f'{"the bundle" if mod.__file__.startswith(site) else mod.__file__}')
if not osp.realpath(mmpfc.__file__).startswith(osp.realpath(root) + osp.sep):
    sys.exit(f'gpu_check.sh: mmpfc is imported from {mmpfc.__file__}, '
             f'not from this checkout')
print('mmpfc from this checkout')

# Every requirement of what was installed, checked against what this
# interpreter now sees: a dependency the image lacks shows up here, before
# the check runs. opencv-python is satisfied by the image's headless cv2.
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
problems = []
for dist in metadata.distributions(path=[site]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({'extra': ''}):
            continue
        if req.name.lower().startswith('opencv-python'):
            import cv2  # noqa: F401
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f'{dist.metadata["Name"]} needs {req}: missing')
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f'{dist.metadata["Name"]} needs {req}: has {have}')
for problem in problems:
    print('warning:', problem)
print(f'requirements: {len(problems)} problem(s)')
EOF

echo "== tools/check_gpu.sh ${CHECK_ARGS[*]:-}"
PYTHON="$PYTHON" bash "$ROOT/tools/check_gpu.sh" "${CHECK_ARGS[@]}"
echo "== gpu_check.sh: done in $SECONDS s"
