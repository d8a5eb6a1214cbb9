#!/usr/bin/env bash
# The prepared GPU benchmark (benchmarks/gpu/bench.py: features frames/s, training tokens/s and MFU, training
# memory) as one command, about 3 to 8 minutes on one H100/H200. On a machine without a package registry it first
# installs what it lacks from benchmarks/gpu/wheels/ (made by benchmarks/gpu/prepare.sh), each wheel --no-deps in
# dependency order, so that nothing already installed is replaced. Writes gpu_benchmark.json and gpu_benchmark.md
# to $OUT when set (the device tool's output folder), else to results/gpu_benchmark/.
#   bash benchmarks/gpu/run.sh          the GPU run, on benchmarks/gpu/clips/
#   bash benchmarks/gpu/run.sh --tiny   the same paths on the CPU in seconds (tests/test_gpu_benchmark.py)
# PYTHON names the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
HERE=benchmarks/gpu
ARGS=(--out "${OUT:-results/gpu_benchmark}")
if [[ "${1:-}" == "--tiny" ]]; then
    ARGS+=(--tiny)
else
    ARGS+=(--clips "$HERE/clips")
    # distributions in dependency order, each with the file name its wheel starts with
    missing=$("$PY" -I - <<'PY'  # -I: not the checkout's own egg-info
from importlib.metadata import PackageNotFoundError, version

for name in ("wcwidth", "ftfy", "regex", "open_clip_torch", "decord", "hjson", "py-cpuinfo", "msgpack", "ninja",
             "einops", "annotated-types", "typing-inspection", "pydantic-core", "pydantic", "deepspeed",
             "video-llm-pipeline"):
    try:
        version(name)
    except PackageNotFoundError:
        print(name.replace("-", "_"))
PY
)
    for name in $missing; do
        echo "installing $name from $HERE/wheels"
        "$PY" -m pip install -q --no-index --no-deps "$HERE"/wheels/"$name"-[0-9]*.whl
    done
fi
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions} exec "$PY" "$HERE/bench.py" "${ARGS[@]}"
