"""Write a reward model's ONNX graph and its variants: fp32 (optimized), fp16 and int8.

The pooling rule is part of the graph, so the server only pads ids and reads one reward per row. Large
models keep their weights outside the graph (protobuf cannot hold more than 2 GB): each variant then has
one weights file beside it, `<variant file>.data`, which the bundle lists and hashes like every file.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from rm_contract.packing import PACKED_INPUTS, PADDED_INPUTS, ScoringRule, pack_batch
from rm_contract.padding import pad_batch
from rm_training.model import PackedRewardModel, RewardModel


def export_graph(model: RewardModel, path: Path, opset: int = 17, external: bool = False, packed: bool = True) -> None:
    """Trace the reward model with dynamic axes, in the model's dtype: packed (rm_contract.packing: several
    samples per row, one reward per sample), or padded ((ids, mask) -> one reward per row) for the
    architectures whose packed form is not proven (`packing_unsupported`).

    The fp16 variant is traced from the model cast to fp16, not converted from the fp32 graph: transformers
    keeps RMSNorm/LayerNorm statistics, softmax and rotary angles in fp32 under fp16 weights, and the trace
    records exactly those casts, where a graph converter turns every op to fp16 (a trained Llama-type reward
    model missed the fp16 parity limit that way: 4.7e-2). Ids stay int64 and the reward float32.

    Traced with eager attention: the SDPA path adds Where/IsNaN guards to the graph that cost 3% (fp32)
    to 8% (int8) of CPU throughput on the demo MiniLM, for the same numbers.

    Traced without its weights, which `attach_weights` then adds one tensor at a time (to
    `weights_file(path)` with `external`, else into the graph): PyTorch's exporter would hold a folded
    (transposed) copy of every Linear weight and the serialized model beside the model itself, three times
    the weights (the peak of a large export). Its shape inference is given no weights either (see
    `_shape_inference_without_weights`).
    """
    model.model.set_attn_implementation("eager")
    if packed:
        module: torch.nn.Module = PackedRewardModel(model)
        example = pack_batch([[5, 6, 7, 8], [5, 6, 7], [9]], ScoringRule(model.pooling, 0)).inputs()
        names, output_axes = list(PACKED_INPUTS), {0: "samples"}
        axes = {name: {0: "rows", 1: "width"} for name in PACKED_INPUTS} | {"score_positions": {0: "samples"}}
        args = tuple(torch.from_numpy(example[name]) for name in names)
    else:
        module, names, output_axes = model, list(PADDED_INPUTS), {0: "batch"}
        axes = {name: {0: "batch", 1: "sequence"} for name in PADDED_INPUTS}
        args = (torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    with warnings.catch_warnings(), torch.no_grad(), _shape_inference_without_weights():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=names,
            output_names=["reward"],
            dynamic_axes={**axes, "reward": output_axes},
            opset_version=opset,
            dynamo=False,
            export_params=False,  # weights become graph inputs named as in the state dict
            do_constant_folding=False,  # folding would copy weights; attach_weights folds the transposes
        )
    graph = onnx.load(str(path))
    attach_weights(graph, module.state_dict(), path, external)
    onnx.save_model(graph, str(path))


def attach_weights(model: onnx.ModelProto, state: dict[str, torch.Tensor], path: Path, external: bool) -> None:
    """Turn every graph input named after a state-dict entry into an initializer, added one tensor at a time:
    written to `weights_file(path)` with `external`, else held in the graph (a small model: one file). A
    weight read only through a 2-D transpose (every Linear) is stored transposed under the transpose's
    output, and that Transpose node removed."""
    graph = model.graph
    consumers = _consumers(graph)
    folded, inputs = set(), []
    with open(path.parent / weights_file(path), "wb") if external else nullcontext() as data:
        for value in graph.input:
            if value.name not in state:
                inputs.append(value)
                continue
            tensor, name = state[value.name].detach(), value.name
            users = consumers.get(name, [])
            if tensor.dim() == 2 and len(users) == 1 and users[0].op_type == "Transpose":
                perm = next((list(a.ints) for a in users[0].attribute if a.name == "perm"), [1, 0])
                if perm == [1, 0]:
                    tensor, name = tensor.t(), users[0].output[0]
                    folded.add(id(users[0]))
            array = tensor.contiguous().numpy()
            initializer = onnx.TensorProto(
                name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape
            )
            if external:
                location = {"location": weights_file(path), "offset": str(data.tell()), "length": str(array.nbytes)}
                initializer.external_data.extend(
                    onnx.StringStringEntryProto(key=k, value=v) for k, v in location.items()
                )
                initializer.data_location = onnx.TensorProto.EXTERNAL
                data.write(memoryview(array).cast("B"))
            else:
                initializer.raw_data = array.tobytes()
            graph.initializer.append(initializer)
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = [n for n in graph.node if id(n) not in folded]
    del graph.node[:]
    graph.node.extend(nodes)


def weights_file(path: Path) -> str:
    """The one external weights file of the variant at `path` (next to it, named after it)."""
    return path.name + ".data"


def save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Save one variant; with `external` (decided by rm-export for every variant), its weights go to
    `weights_file(path)`."""
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=weights_file(path) if external else None,
    )


def external_data_files(path: Path) -> set[str]:
    """The files an ONNX model reads its weights from (relative to its directory); empty when self-contained."""
    model = onnx.load(str(path), load_external_data=False)
    tensors = [*model.graph.initializer, *_attribute_tensors(model.graph)]
    return {
        entry.value
        for t in tensors
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }


def _attribute_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Tensors held in node attributes (Constant values), subgraphs included."""
    tensors = []
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                tensors.append(attribute.t)
            for subgraph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
                tensors += [*subgraph.initializer, *_attribute_tensors(subgraph)]
    return tensors


def optimize(raw: Path, out: Path, external: bool) -> str:
    """Apply onnxruntime's provider-independent (basic) rewrites once, at export, and save the graph.

    The server applies the hardware-specific levels at load. onnxruntime.transformers' BERT fusions are not
    applied: on the demo MiniLM they make CPU serving 11% slower (measured: 141.7 vs 159.8 samples/s).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights_file(out))
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    return "onnxruntime basic level (saved); extended levels applied by the server at load"


def save_fp16(raw: Path, out: Path, external: bool) -> None:
    """Save the graph traced in fp16, its softmaxes in fp32 as PyTorch computed them, and otherwise unoptimized.

    Not optimized here: optimizing with the CPU provider, the only one sure to be present, inserts fp32 casts
    around every op the CPU lacks an fp16 kernel for (MatMul among them), which a GPU would then run in fp32.
    The server optimizes for its own provider at load.
    """
    model = onnx.load(str(raw))
    softmax_in_fp32(model.graph)
    save(model, out, external)


def softmax_in_fp32(graph: onnx.GraphProto) -> None:
    """Cast the input of every `softmax(x, dtype=float32)` to fp32.

    transformers computes attention probabilities that way under fp16 weights, but PyTorch's TorchScript
    exporter emits Softmax(x) -> Cast(float): the softmax itself then runs in fp16. Recognized by the
    signature the exporter leaves: a Softmax whose every consumer is a Cast to float.
    """
    consumers = _consumers(graph)
    nodes = []
    for node in graph.node:
        after = consumers.get(node.output[0], []) if node.op_type == "Softmax" else []
        if after and all(c.op_type == "Cast" and _cast_to(c) == onnx.TensorProto.FLOAT for c in after):
            cast = onnx.helper.make_node(
                "Cast", [node.input[0]], [node.input[0] + "/fp32"], to=onnx.TensorProto.FLOAT, name=node.name + "/fp32"
            )
            node.input[0] = cast.output[0]
            nodes.append(cast)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> the nodes that read it."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


class _IdsReader(CalibrationDataReader):
    """Calibration batches of one unpadded sample each, in the graph's form (`rule` given: packed)."""

    def __init__(self, sequences: list[list[int]], rule: ScoringRule | None):
        self._sequences = iter(sequences)
        self._rule = rule

    def get_next(self) -> dict | None:
        ids = next(self._sequences, None)
        if ids is None:
            return None
        if self._rule is not None:
            return pack_batch([ids], self._rule).inputs()
        return dict(zip(PADDED_INPUTS, pad_batch([ids], 0)))


DECODER_FP32_PRODUCTS = ("/o_proj/", "/down_proj/", "/attention/dense/", "/dense_4h_to_h/", "/c_proj/")
"""Name fragments of the products a decoder's int8 graph keeps in fp32: the attention and MLP output
projections (Llama/Qwen/Mistral/Gemma/Phi-3/OLMo, GPT-NeoX, GPT-2 names), in pre-norm decoders the only
weight products whose input is not a normalization's output (OLMo2 normalizes after them instead; its int8
is judged by the accuracy check like any other). Decoders carry massive activations on a few tokens (Sun et al. 2024,
arXiv:2402.17762): SmolLM2-135M's reward model has down_proj inputs of 3,000 where their mean is 0.14, so one
static scale per tensor rounds everything else to zero. Measured on it (171 eval pairs, fp32 84.8%): every
product int8 66.7%; down_proj kept 83.6%; down_proj and o_proj kept 84.8%, 1.4-1.7x fp32's tokens/s (all int8:
1.7-2.5x). SmoothQuant (scales folded into the norms, alpha 0.5 / 0.8) got 72.5% / 74.3% with every product
int8: the outliers sit on tokens, not only on channels. Normalized inputs have no such tokens."""


def int8_fp32_products(pooling: str) -> tuple[str, ...]:
    """What `make_int8` keeps in fp32 for a model of this pooling rule: decoders' output projections;
    encoders (cls pooling) quantize every weight product."""
    return () if pooling == "cls" else DECODER_FP32_PRODUCTS


def variant_packs(dtype: str, pooling: str) -> bool:
    """Whether a variant's rows may hold several samples. Not a decoder's int8: a sample that starts
    elsewhere than offset 0 of its row gets its fp32 sums (softmax, attention times values) grouped
    differently in the vector lanes, and those last-bit differences (3e-6 in fp32) move int8 roundings that,
    over a decoder's layers with outlier-sized scales, changed a reward by up to 0.74 (SmolLM2-135M).
    Alone in its row at offset 0 it is exact, so that variant is served one sample per row."""
    return not (dtype == "int8" and pooling != "cls")


def make_int8(
    raw_path: Path,
    out: Path,
    calibration: list[list[int]],
    external: bool,
    rule: ScoringRule | None = None,
    keep_fp32: tuple[str, ...] = (),
) -> None:
    """Static int8 quantization of the matrix products, calibrated on real samples (for CPU serving).

    Static, not dynamic: dynamic quantization picks activation scales per batch (padding included), so a
    sample's reward would depend on its batch. Only products with a weight matrix are quantized: quantizing
    the attention mask's addition would clip the mask and let padding leak into attention, and the
    activation-by-activation products of attention are a few percent of the work but their extra
    quantize/dequantize nodes cost more than they save (measured: 245 -> 264 samples/s on the demo MiniLM).
    A packed graph (`rule` given: the bundle's scoring rule) is calibrated on packed single-sample batches.
    Products whose node name holds a `keep_fp32` fragment stay in fp32 (see DECODER_FP32_PRODUCTS).
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(
            str(raw_path),
            str(prepared),
            skip_symbolic_shape=True,
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            external_data_location=weights_file(prepared),
        )
        graph = onnx.load(str(prepared), load_external_data=False).graph
        weights = {i.name for i in graph.initializer}
        weight_products = [
            n.name
            for n in graph.node
            if n.op_type in ("MatMul", "Gemm")
            and any(i in weights for i in n.input)
            and not any(fragment in n.name for fragment in keep_fp32)
        ]
        with _quiet_logging():
            quantize_static(
                str(prepared),
                str(out),
                _IdsReader(calibration, rule),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=weight_products,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                use_external_data_format=external,
            )


@contextmanager
def _shape_inference_without_weights():
    """Run torch.onnx's ONNX shape inference pass without the parameter values.

    The pass copies every parameter it is given (a full copy of the weights beside the model: 915 MiB on a
    904 MiB fp32 model, the largest cost of a large export), yet weights only ever feed MatMul/Gather/Mul,
    whose output shapes follow from the weights' types alone, which the traced graph already holds. The
    graphs written with and without the values were byte-identical on Qwen3, and the architecture matrix
    checks parity on every supported model type."""
    infer = torch._C._jit_pass_onnx_graph_shape_type_inference

    def without_weights(graph, params_dict, opset_version):
        return infer(graph, {}, opset_version)

    torch._C._jit_pass_onnx_graph_shape_type_inference = without_weights
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = infer


@contextmanager
def _quiet_logging():
    """onnxruntime's quantizer logs a warning per 1-D weight; they are expected and say nothing useful."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
