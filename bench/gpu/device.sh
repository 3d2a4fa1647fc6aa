#!/usr/bin/env bash
# make bench-gpu: bench/gpu_bench.py on a CUDA host, with onnxruntime-gpu and the small wheels taken from the
# offline pack that `make bench-gpu-pack` writes to .gpubench/ (built where PyPI is reachable, for a GPU host
# that reaches no package registry; docs/benchmarks.md, "GPU").
#
# The host needs an NVIDIA GPU with its driver, Python 3.12 (the pack's wheels are built for it) with PyTorch
# (a CUDA 13 build: onnxruntime-gpu loads the CUDA and cuDNN libraries of its pip packages), transformers, onnx,
# onnxruntime (a CPU build does: prepare's exports check on the CPU) and the four packages' other dependencies
# except those the pack brings, and this checkout. Nothing is installed into that Python: the wheels and
# onnxruntime-gpu go under $GPUBENCH_STATE, the checkout is used through PYTHONPATH.
#
# The pack may reach the host in pieces, as the transfer allows. Every step first moves the parts that have
# arrived (.gpubench/part-*) out of the checkout into $GPUBENCH_STATE/parts, so that the next piece can be copied
# over .gpubench/ without losing the earlier ones:
#   device.sh prepare  needs .gpubench/wheels, .gpubench/tokenizer and .gpubench/SHA256SUMS: installs the wheels,
#                      starts building and exporting each model in the background (CPU), so that the exports
#                      run while the remaining parts arrive
#   device.sh part     after each further part arrives: collects it and shows the exports' progress
#   device.sh run      once every part is there: checks every part's sha256, unpacks onnxruntime-gpu under
#                      $GPUBENCH_STATE, checks that a session runs on the GPU, then benchmarks each model as its
#                      bundle becomes ready; results to $OUT
# Settings (environment, defaults in brackets):
#   GPUBENCH_STATE     [/tmp/gpubench] the wheels, parts, onnxruntime-gpu, models and logs; kept between steps
#   GPUBENCH_MODELS    [qwen3-0.6b,qwen3-1.7b] the model shapes (tiny: the dry run's)
#   GPUBENCH_PROVIDER  [cuda] cpu for the dry run
#   GPUBENCH_WAIT_S    [480] how long run waits for a model's bundle before it skips that model
#   GPUBENCH_BUDGET_S  [480] no model's benchmark starts later than this after run starts: bounds the run's length
#   GPUBENCH_DRY       set by make bench-gpu-dry-run: the venv's own packages (no wheels installed, and the
#                      unpacked onnxruntime-gpu is not used)
#   PYTHON [python3], OUT [bench/results]
set -euo pipefail
STATE=${GPUBENCH_STATE:-/tmp/gpubench}
PYTHON=${PYTHON:-python3}
MODELS=${GPUBENCH_MODELS:-qwen3-0.6b,qwen3-1.7b}
PROVIDER=${GPUBENCH_PROVIDER:-cuda}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/bench/results}
step=${1:?usage: device.sh prepare|part|run}
cd "$ROOT"
mkdir -p "$STATE/parts"
shopt -s nullglob
for part in .gpubench/part-*; do mv "$part" "$STATE/parts/"; done
if [ -f .gpubench/SHA256SUMS ]; then cp .gpubench/SHA256SUMS "$STATE/"; fi
export PYTHONPATH="$ROOT/proto/src:$ROOT/server/src:$ROOT/client/src:$ROOT/rm_training/src:$STATE/site-base"
export PYTHONUNBUFFERED=1

pin() {  # taskset for one half of the cores (nothing where there are fewer than 8 or no taskset)
    local n
    n=$(nproc)
    if [ "$n" -ge 8 ] && command -v taskset >/dev/null; then
        if [ "$1" = upper ]; then echo "taskset -c $((n / 2))-$((n - 1))"; else echo "taskset -c 0-$((n / 2 - 1))"; fi
    fi
}

case $step in
prepare)
    nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv || true
    if [ -z "${GPUBENCH_DRY:-}" ]; then  # the dry run's Python (not 3.12) has these already
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$STATE/site-base" .gpubench/wheels/*.whl
    fi
    rm -rf "$STATE/tokenizer" && cp -r .gpubench/tokenizer "$STATE/tokenizer"
    # one export per model, side by side (much of an export is single-threaded), each in a new session so
    # that it outlives this step and the shell that ran it; on the upper half of the cores, so that they
    # disturb as little as possible the measurements (on the lower half) of a model that is ready while
    # another still exports
    for model in ${MODELS//,/ }; do
        setsid nohup $(pin upper) $PYTHON bench/gpu_bench.py prepare --work "$STATE/work" \
            --tokenizer "$STATE/tokenizer" --models "$model" >"$STATE/prepare-$model.log" 2>&1 </dev/null &
    done
    sleep 8 && tail -n 2 "$STATE"/prepare-*.log
    ;;
part)
    tail -n 2 "$STATE"/prepare-*.log || true
    ;;
run)
    (cd "$STATE/parts" && sha256sum --check --quiet "$STATE/SHA256SUMS")
    rm -rf "$STATE/site-ort" && mkdir -p "$STATE/site-ort"
    cat "$STATE"/parts/part-* | xz --decompress | tar --extract --directory "$STATE/site-ort"
    # CUDA and cuDNN come from the pip packages PyTorch uses (nvidia/cu13, nvidia/cudnn): onnxruntime looks
    # for them beside itself, and the dynamic loader through LD_LIBRARY_PATH
    nvidia=$($PYTHON -c "import importlib.util as u; s = u.find_spec('nvidia'); print(next(iter(s.submodule_search_locations)) if s else '')")
    if [ -n "$nvidia" ]; then
        ln -sfn "$nvidia" "$STATE/site-ort/nvidia"
        LD_LIBRARY_PATH="$(find "$nvidia" -maxdepth 2 -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
        export LD_LIBRARY_PATH
    fi
    if [ -z "${GPUBENCH_DRY:-}" ]; then export PYTHONPATH="$STATE/site-ort:$PYTHONPATH"; fi
    if $PYTHON - "$PROVIDER" <<'PYTHON'
import sys

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from rm_server.runtime.engine import PROVIDERS, preload_cuda_libraries

preload_cuda_libraries()
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
session = ort.InferenceSession(model.SerializeToString(), providers=list(dict.fromkeys([PROVIDERS[sys.argv[1]], "CPUExecutionProvider"])))
print("onnxruntime", ort.__version__, ort.get_available_providers(), "-> a session runs on", session.get_providers())
sys.exit(0 if session.get_providers()[0] == PROVIDERS[sys.argv[1]] else 3)
PYTHON
    then :; else  # stop before any measurement: say what the provider library misses
        ldd "$STATE"/site-ort/onnxruntime/capi/libonnxruntime_providers_cuda.so | grep -i "not found" || true
        exit 3
    fi
    mkdir -p "$OUT"
    status=0
    $(pin lower) $PYTHON bench/gpu_bench.py run --work "$STATE/work" --results "$OUT" --models "$MODELS" \
        --provider "$PROVIDER" --wait-for-bundles-s "${GPUBENCH_WAIT_S:-480}" \
        --time-budget-s "${GPUBENCH_BUDGET_S:-480}" || status=$?
    cp "$STATE"/prepare-*.log "$OUT/"
    exit $status
    ;;
*)
    echo "unknown step $step: prepare, part or run" >&2
    exit 2
    ;;
esac
echo "parts collected in $STATE/parts: $(ls "$STATE/parts" | tr '\n' ' ')"
