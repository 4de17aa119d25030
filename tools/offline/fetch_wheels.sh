#!/usr/bin/env bash
# Download the wheels that the offline GPU check needs (run where PyPI is
# reachable; the GPU machine itself is air-gapped):
#
#   bash tools/offline/fetch_wheels.sh            # into wheels/ at the repo root
#   bash tools/offline/fetch_wheels.sh -d DIR     # into DIR
#
# Every package of tools/offline/requirements-gpu-image.txt is fetched on its
# own with --no-deps, as a wheel for CPython 3.12 on manylinux x86-64 (the GPU
# image), whatever Python runs this script. A package with no such wheel on
# the index is built here from its sdist with `pip wheel --no-deps`, which is
# accepted only when the result is pure Python (py3-none-any). The folder is
# made anew on each run (no stale second version of a package, which would
# stop the install), and the run fails when the bundle exceeds 64 MiB: it
# travels with the checkout to the GPU machine, 64 MiB in all.
#
# mmpfc itself is not bundled: tools/check_gpu.sh runs it from the checkout
# (the repo root is put first on PYTHONPATH). PYTHON picks the interpreter
# whose pip downloads (default: python3).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DEST="$ROOT/wheels"
while [ $# -gt 0 ]; do
    case "$1" in
        -d|--dest) DEST=$2; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "usage: bash $0 [-d DIR]" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
LIST="$ROOT/tools/offline/requirements-gpu-image.txt"
LIMIT=$((64 * 1024 * 1024))
TARGET=(--python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64)
PIP=("$PYTHON" -m pip --disable-pip-version-check)

mkdir -p "$(dirname "$DEST")"
NEW=$(mktemp -d "$DEST.new.XXXXXX")
trap 'rm -rf "$NEW"' EXIT

# NAME==VERSION per line, comments and blank lines dropped
mapfile -t PINS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$LIST")
for pin in "${PINS[@]}"; do
    case "$pin" in
        *==*) ;;
        *) echo "fetch_wheels.sh: '$pin' in $LIST is not pinned (NAME==VERSION)" >&2
           exit 1 ;;
    esac
    echo "-- $pin"
    if ! "${PIP[@]}" download -q --no-deps --only-binary=:all: "${TARGET[@]}" \
            -d "$NEW" "$pin"; then
        echo "   no cp312 manylinux wheel: building $pin from its sdist"
        BUILD=$(mktemp -d)
        "${PIP[@]}" wheel -q --no-deps --no-binary="${pin%%==*}" -w "$BUILD" "$pin"
        for whl in "$BUILD"/*.whl; do
            case "$(basename "$whl")" in
                *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$whl" "$NEW/" ;;
                *) echo "fetch_wheels.sh: $(basename "$whl") is not pure Python;" \
                        "it cannot be built here for the GPU image" >&2
                   rm -rf "$BUILD"; exit 1 ;;
            esac
        done
        rm -rf "$BUILD"
    fi
done

# one wheel per pinned package, nothing else
count=$(find "$NEW" -maxdepth 1 -name '*.whl' | wc -l)
if [ "$count" -ne "${#PINS[@]}" ]; then
    echo "fetch_wheels.sh: $count wheels for ${#PINS[@]} pins:" >&2
    ls "$NEW" >&2
    exit 1
fi

rm -rf "$DEST"
mv "$NEW" "$DEST"
trap - EXIT

echo
( cd "$DEST" && ls -l --block-size=K -- *.whl | awk '{print $5, $9}' | sort -k2 )
size=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $count wheels, $size bytes ($((size / 1024)) KiB) in $DEST"
if [ "$size" -gt "$LIMIT" ]; then
    echo "fetch_wheels.sh: the bundle exceeds 64 MiB ($LIMIT bytes)" >&2
    exit 1
fi
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    tree=$(cd "$ROOT" && git ls-files -z | du --files0-from=- -cb 2>/dev/null \
        | tail -1 | cut -f1)
    echo "with the tracked files of the checkout: $((size + tree)) bytes"
    if [ $((size + tree)) -gt "$LIMIT" ]; then
        echo "fetch_wheels.sh: warning: checkout + bundle exceed 64 MiB" >&2
    fi
fi
