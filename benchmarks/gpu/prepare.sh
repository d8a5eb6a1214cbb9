#!/usr/bin/env bash
# Prepare what benchmarks/gpu/run.sh needs on a GPU machine without a package registry (Python 3.12, torch,
# transformers, peft, accelerate, h5py, timm already there), on a machine with one:
#   benchmarks/gpu/wheels/  the wheels it lacks: open_clip_torch with ftfy, wcwidth and regex; decord; deepspeed (a
#                           pure-Python wheel built from its source archive) with hjson, py-cpuinfo, msgpack,
#                           ninja, einops and pydantic; this package (video-llm-pipeline, --no-deps). flash-attn publishes no
#                           wheel (a source archive that needs nvcc and GitHub): not prepared.
#   benchmarks/gpu/clips/   the demo's real clips cut to mp4 (benchmarks/features.py clips()), the features input.
# Prints the folders' sizes: with the working tree they travel within the device tool's 64 MiB.
#   bash benchmarks/gpu/prepare.sh [PYTHON_VERSION, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
VERSION=${1:-3.12}
WHEELS=benchmarks/gpu/wheels
CLIPS=benchmarks/gpu/clips
rm -rf "$WHEELS" "$CLIPS"
mkdir -p "$WHEELS" "$CLIPS"
TARGET=(--only-binary=:all: --python-version "$VERSION" --implementation cp --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_28_x86_64)
"$PY" -m pip download --no-deps -q -d "$WHEELS" "${TARGET[@]}" open_clip_torch==3.3.0 ftfy wcwidth regex \
    decord==0.6.0 hjson py-cpuinfo msgpack ninja einops pydantic pydantic-core annotated-types typing-inspection
"$PY" -m pip wheel --no-deps --no-build-isolation -q -w "$WHEELS" deepspeed==0.19.8
# this package, built from a copy so that setuptools' build/ folder stays out of the checkout
SOURCE=$(mktemp -d)
trap 'rm -rf "$SOURCE"' EXIT
cp -r pyproject.toml pipeline "$SOURCE"
"$PY" -m pip wheel --no-deps --no-build-isolation -q -w "$WHEELS" "$SOURCE"
"$PY" - "$CLIPS" <<'PY'
import sys
from pathlib import Path

sys.path[:0] = ["benchmarks", "."]
from features import clips  # noqa: E402

clips(Path(sys.argv[1]), 16, "demo")
PY
du -sh "$WHEELS" "$CLIPS"
ls -l "$WHEELS"
