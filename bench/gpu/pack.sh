#!/usr/bin/env bash
# make bench-gpu-pack: what bench/gpu/device.sh needs on the GPU machine, cut to fit its 64 MiB per call.
# Needs PyPI and the project's venv (for the models' tokenizer). Writes .gpubench/ (ignored by git):
#   wheels/    protobuf, grpcio, grpcio-health-checking, grpcio-reflection for that machine's Python 3.12
#   tokenizer/ SmolLM2's tokenizer and chat template (the Qwen3-shaped models are random; any real one does)
#   part-aa .. onnxruntime-gpu (CUDA 13 build, as that machine's PyTorch) without what serving never loads
#              (the C API library, the TensorRT provider: no TensorRT there), as one tar.xz cut in parts
#   SHA256SUMS of the parts, checked there before unpacking
set -euo pipefail
PY=${PY:-.venv/bin/python}
PART_MB=${PART_MB:-50}
ORT_VERSION=$($PY -c "import importlib.metadata as m; print(m.version('onnxruntime-gpu'))")
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rm -rf .gpubench && mkdir -p .gpubench/wheels
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WORK" "onnxruntime-gpu==$ORT_VERSION" "protobuf==$(version protobuf)" "grpcio==$(version grpcio)" \
    "grpcio-health-checking==$(version grpcio-health-checking)" "grpcio-reflection==$(version grpcio-reflection)"
mv "$WORK"/grpcio*.whl "$WORK"/protobuf*.whl .gpubench/wheels/
mkdir "$WORK/ort" && (cd "$WORK/ort" && unzip -q ../onnxruntime_gpu-*.whl)
rm -f "$WORK"/ort/onnxruntime/capi/libonnxruntime.so.* "$WORK"/ort/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
echo "compressing onnxruntime-gpu $ORT_VERSION (xz -9e, a few minutes) ..."
tar --create --directory "$WORK/ort" . | xz -9e --threads=0 >"$WORK/ort.tar.xz"
split --bytes="${PART_MB}M" "$WORK/ort.tar.xz" .gpubench/part-
(cd .gpubench && sha256sum part-* >SHA256SUMS)
$PY - <<'PYTHON'
from transformers import AutoTokenizer

from rm_contract.backbones import resolve_backbone

backbone = resolve_backbone("smollm2")
AutoTokenizer.from_pretrained(backbone.path, **backbone.from_pretrained_kwargs()).save_pretrained(".gpubench/tokenizer")
PYTHON
du -sh .gpubench/* | sed 's/^/  /'
echo "parts: $(ls .gpubench/part-* | wc -l); the device calls are in docs/benchmarks.md (GPU)"
