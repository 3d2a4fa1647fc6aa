"""The architecture matrix: a tiny random sequence-classification checkpoint of every supported model type is
exported (rm-export's own parity and batch-invariance checks), served by one rm-serve, and scored through
gRPC batched and alone (equal within 1e-5) and against transformers' own forward on the bundle's ids (for
encoders, with the segment ids of the tokenizer's own pair encoding, as such checkpoints are fine-tuned).

Sliding windows are set below the sample lengths, so local-attention masks are exercised too. Some decoders
have pad == eos (SmolLM2's tokenizer), others a distinct pad token (as Qwen ships). The table of supported
architectures in docs/bundle.md is generated from ARCHITECTURES: RM_UPDATE_DOCS=1 rewrites it.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as SEQUENCE_CLASSIFICATION,
)

from rm_client.samples import text_samples
from rm_contract.bundle import load_bundle
from rm_contract.pb import reward_pb2 as pb
from rm_contract.recipe import Sample
from rm_server.launch import start_server, stop_server
from rm_training import export
from rm_training.model import PACKABLE_ENCODERS, SUPPORTED_MODEL_TYPES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "bundle.md"
DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
)
ENCODER = dict(  # initializer_range well above the default 0.02, so that segment ids move the reward measurably
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    initializer_range=0.2,
)
GQA = dict(num_key_value_heads=2)
ARCHITECTURES = {  # model_type -> tiny config overrides
    "llama": {**DECODER, **GQA},
    "qwen2": {**DECODER, **GQA},
    "qwen3": {**DECODER, **GQA, "head_dim": 8},
    "mistral": {**DECODER, **GQA, "sliding_window": 16},
    "gemma2": {**DECODER, **GQA, "head_dim": 8, "sliding_window": 16},
    "gemma3_text": {**DECODER, **GQA, "head_dim": 8, "sliding_window": 16},
    "phi3": DECODER,
    "gpt_neox": DECODER,
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "olmo2": {**DECODER, **GQA},
    "bert": ENCODER,
    "roberta": ENCODER,
    "deberta-v2": ENCODER,
    "modernbert": {**ENCODER, "local_attention": 16},
    "distilbert": dict(
        dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=512, initializer_range=0.2
    ),
    "electra": {**ENCODER, "embedding_size": 32},
}
ENCODERS = {"bert", "roberta", "deberta-v2", "modernbert", "distilbert", "electra"}
SEGMENTED = {"bert", "roberta", "electra"}  # tokenizer pair segments and a segment-1 embedding (type_vocab_size 2)
DISTINCT_PAD = {"qwen2", "qwen3", "gpt2"}  # pad = <|endoftext|>, eos = <|im_end|>, as Qwen ships
TEXTS = [
    ("How was it?", "Great."),
    ("Tell me more about the trip, please.", "It rained all week, sadly, and the hotel was far from everything."),
    ("Q", "ok"),
    ("Describe your week.", " ".join(f"Day {i} was fine and then it rained a bit more." for i in range(12))),
]
MAX_LENGTH = 96


def tiny_checkpoint(model_type: str, directory: Path, minilm_tokenizer, smollm2_tokenizer) -> Path:
    tokenizer = minilm_tokenizer if model_type in ENCODERS else smollm2_tokenizer
    if model_type in DISTINCT_PAD:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = "<|endoftext|>"
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
        "eos_token_id": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
    }
    if model_type == "modernbert":
        special |= {"cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), num_labels=1, **ARCHITECTURES[model_type], **special
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, minilm_tokenizer, smollm2_tokenizer):
    """Every architecture exported into one model repository (NAME/1/), served by one rm-serve."""
    root = tmp_path_factory.mktemp("architectures")
    checkpoints = {}
    for model_type in ARCHITECTURES:
        name = model_type.replace("_", "-")
        checkpoints[name] = tiny_checkpoint(
            model_type, root / "checkpoints" / name, minilm_tokenizer, smollm2_tokenizer
        )
        bundle = root / "repo" / name / "1"
        export.main(
            ["--model", str(checkpoints[name]), "--output", str(bundle), "--max-length", str(MAX_LENGTH)]
            + ["--dtype", "fp32,fp16"]  # fp16 traced for every architecture, checked by rm-export
        )
    server = start_server(root / "repo", root / "serve.log", bundle_flag="--model-repo")
    yield server, root / "repo", checkpoints
    stop_server(server)


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_served_rewards_equal_alone_and_transformers_forward(matrix, model_type):
    server, repo, checkpoints = matrix
    name = model_type.replace("_", "-")
    samples = text_samples(*zip(*TEXTS))
    stub = server.stub()
    batched = stub.Score(pb.ScoreRequest(samples=samples, model=name), timeout=60)
    alone = [stub.Score(pb.ScoreRequest(samples=[s], model=name), timeout=60).results[0].reward for s in samples]
    served = [r.reward for r in batched.results]
    np.testing.assert_allclose(served, alone, atol=1e-5)
    assert load_bundle(repo / name / "1").input_form == input_form(model_type)

    encoder = load_bundle(repo / name / "1").sample_encoder()
    encoded = [encoder.encode(Sample.from_text(p, r)) for p, r in TEXTS]
    assert encoded[-1].truncated  # the long sample also exercises truncation and the sliding windows
    reference = AutoModelForSequenceClassification.from_pretrained(checkpoints[name]).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[name])
    segments_used = load_bundle(repo / name / "1").manifest["segment_sep_id"] is not None
    assert segments_used == (model_type in SEGMENTED)
    expected, compared = [], []
    for (prompt, response), e, reward in zip(TEXTS, encoded, served):
        inputs = {"input_ids": torch.tensor([e.ids])}
        if model_type in ENCODERS:  # what the checkpoint was trained on: the tokenizer's own pair encoding
            if e.truncated:
                continue  # the tokenizer cannot cut the prompt from the left; covered by batched == alone
            pair = tokenizer(prompt, response, return_tensors="pt")
            assert pair["input_ids"][0].tolist() == e.ids
            inputs = {k: v for k, v in pair.items() if k in ("input_ids", "token_type_ids")}
            if segments_used:  # the segments must matter, or this comparison could not catch them wrong
                with torch.no_grad():
                    unsegmented = reference(input_ids=inputs["input_ids"]).logits[0, 0].item()
                    segmented = reference(**inputs).logits[0, 0].item()
                assert abs(segmented - unsegmented) > 1e-3
        with torch.no_grad():
            expected.append(reference(**inputs).logits[0, 0].item())
        compared.append(reward)
    np.testing.assert_allclose(compared, expected, atol=1e-4)


def input_form(model_type: str) -> str:
    return "padded" if model_type in ENCODERS and model_type not in PACKABLE_ENCODERS else "packed"


def supported_table() -> str:
    """The supported-architectures table of docs/bundle.md: the model types this matrix proves."""
    rows = [
        "| model type | transformers class | kind | graph | pooling | default recipe |",
        "|---|---|---|---|---|---|",
    ]
    for model_type in ARCHITECTURES:
        encoder = model_type in ENCODERS
        rows.append(
            f"| `{model_type}` | `{SEQUENCE_CLASSIFICATION[model_type]}` | {'encoder' if encoder else 'decoder'} | "
            + f"{input_form(model_type)} | "
            + (
                "`cls` (its own head) | `pair` |"
                if encoder
                else "`last_non_pad` (`last_attended` from rm-train) | `chat` (`concat` without a chat template) |"
            )
        )
    return "\n".join(rows)


def test_docs_list_exactly_the_architectures_of_this_matrix():
    assert tuple(ARCHITECTURES) == SUPPORTED_MODEL_TYPES  # what rm-export names as supported is what is proven
    text = DOCS.read_text()
    block = re.compile(r"(<!-- architectures:begin -->\n).*?(<!-- architectures:end -->)", re.S)
    assert block.search(text), "docs/bundle.md lacks the architectures block"
    if os.environ.get("RM_UPDATE_DOCS") == "1":
        DOCS.write_text(block.sub(lambda m: m.group(1) + supported_table() + "\n" + m.group(2), text))
    assert supported_table() in DOCS.read_text()
