"""Reference: Triton's dynamic batcher as NeMo-Aligner uses it (nvidia-pytriton), serving the same bundle.

    .venv-pytriton/bin/python bench/pytriton_server.py --bundle runs/demo/bundle --variant fp32 --port 8000

Runs in its own virtual environment (`make bench` creates `.venv-pytriton`): pytriton pins protobuf and
numpy below the versions rewardserve needs. Same tokenizer and input recipe as rm-serve (rm_contract.recipe,
torch-free, found through PYTHONPATH), same ONNX file and ONNX Runtime; what differs is the batching:
Triton concatenates whole requests in arrival order and the batch is padded to its longest sample.
Protocol: Triton's HTTP/gRPC inference API, model `reward`, BYTES inputs `prompt` and `response` (B, 1),
FP32 output `reward` (B, 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proto" / "src"))  # the contract only
from rm_contract.bundle import VARIANTS  # noqa: E402
from rm_contract.packing import PADDED_INPUTS, ScoringRule, pack_batch  # noqa: E402
from rm_contract.padding import pad_batch  # noqa: E402
from rm_contract.recipe import InputRecipe, Sample, SampleEncoder  # noqa: E402


def build_infer(bundle: Path, variant: str):
    manifest = json.loads((bundle / "bundle.json").read_text())
    encoder = SampleEncoder(
        Tokenizer.from_file(str(bundle / "tokenizer.json")), InputRecipe.from_dict(manifest["recipe"])
    )
    pad_id = manifest.get("pad_token_id") or 0
    model_file = bundle / manifest["variants"][variant]["file"]
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    packed = manifest.get("input_form") == "packed"
    rule = ScoringRule(manifest["pooling"], pad_id)

    @batch
    def infer(prompt: np.ndarray, response: np.ndarray) -> dict[str, np.ndarray]:
        ids = [encoder.encode(Sample.from_text(p[0].decode(), r[0].decode())).ids for p, r in zip(prompt, response)]
        if packed:  # one sample per row, padded to the longest: Triton's batch in the packed graph's form
            inputs = pack_batch(ids, rule, packed=False).inputs()
        else:
            inputs = dict(zip(PADDED_INPUTS, pad_batch(ids, pad_id)))
        (rewards,) = session.run(None, inputs)
        return {"reward": rewards.astype(np.float32).reshape(-1, 1)}

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--variant", default="fp32", choices=VARIANTS)
    parser.add_argument("--port", type=int, required=True, help="HTTP port; gRPC and metrics take the next two")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("PYTRITON_HOME", str(Path("/tmp") / f"pytriton-{os.getuid()}"))
    config = TritonConfig(http_port=args.port, grpc_port=args.port + 1, metrics_port=args.port + 2)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="reward",
            infer_func=build_infer(args.bundle, args.variant),
            inputs=[Tensor(name="prompt", dtype=bytes, shape=(1,)), Tensor(name="response", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="reward", dtype=np.float32, shape=(1,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
