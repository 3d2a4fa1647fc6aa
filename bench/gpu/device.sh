#!/usr/bin/env bash
# make bench-gpu: bench/gpu_bench.py on the lent GPU machine, in consecutive calls of the device tool.
#
# That machine has PyTorch, transformers and a CPU-only onnxruntime, reaches no package registry, and takes
# at most 64 MiB per call; onnxruntime-gpu is about 190 MB even recompressed. `make bench-gpu-pack` (on a
# machine with PyPI) splits it into parts under .gpubench/ (ignored by git). Each call carries one part;
# this script moves it out of the work tree into $STATE, where it stays while the machine is warm (30 s
# between calls). docs/benchmarks.md ("GPU") lists the exact calls:
#   first call  (carry .gpubench/wheels .gpubench/tokenizer .gpubench/SHA256SUMS and the first part):
#               device.sh prepare  -> installs the small wheels, starts building and exporting the models
#                                     in the background (CPU), so that runs while the other parts travel
#   next calls  (carry one part each): device.sh part
#   last call   (carry the last part):  device.sh run  -> checks every part's sha256, unpacks onnxruntime-gpu
#               outside the work tree, runs the benchmark as bundles become ready, results to $OUT
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
    # that it outlives this call (the tool ends a call's other processes); on the upper half of the cores,
    # so that they disturb the measurements of a model that is ready while another still exports
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

from rm_server.engine import PROVIDERS, preload_cuda_libraries

preload_cuda_libraries()
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
session = ort.InferenceSession(model.SerializeToString(), providers=list(dict.fromkeys([PROVIDERS[sys.argv[1]], "CPUExecutionProvider"])))
print("onnxruntime", ort.__version__, ort.get_available_providers(), "-> a session runs on", session.get_providers())
sys.exit(0 if session.get_providers()[0] == PROVIDERS[sys.argv[1]] else 3)
PYTHON
    then :; else  # stop before spending device time: say what the provider library misses
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
echo "parts here: $(ls "$STATE/parts" | tr '\n' ' ')"
