#!/usr/bin/env bash
# make bench-gpu-pack: the offline pack of what bench/gpu/device.sh (make bench-gpu) needs on a GPU host that
# reaches no package registry. Needs PyPI and the project's venv (the versions to pack, and the models'
# tokenizer). Writes .gpubench/ (ignored by git), to be copied into the GPU host's checkout whole or in pieces:
#   wheels/    protobuf, grpcio, grpcio-health-checking, grpcio-reflection for CPython 3.12 on x86_64 Linux
#   tokenizer/ SmolLM2's tokenizer and chat template (the Qwen3-shaped models are random; any real one does)
#   part-aa .. onnxruntime-gpu (its CUDA 13 build, which loads the CUDA libraries of a CUDA 13 PyTorch) without
#              what serving never loads (the C API library; the TensorRT provider, which the benchmark does not
#              use), as one tar.xz split into parts of PART_MB MiB
#   SHA256SUMS of the parts, checked on the GPU host before unpacking
# Settings (environment, defaults in brackets):
#   PART_MB  [50] the size of each part: at most what one transfer to the GPU host carries
#   PY       [.venv/bin/python] the project's venv
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
echo "parts: $(ls .gpubench/part-* | wc -l); copy .gpubench/ to the GPU host's checkout, then make bench-gpu STEP=prepare (docs/benchmarks.md)"
