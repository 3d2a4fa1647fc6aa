"""Shared fixtures: real tokenizers from the bundled weights, tiny random checkpoints, learnable toy data."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
)

from rm_contract.backbones import resolve_backbone
from rm_contract.bundle import load_bundle
from rm_contract.padding import pad_batch
from rm_contract.recipe import Sample
from rm_server.runtime.engine import open_engine
from rm_training.train import TrainConfig, train

GOOD = ["great", "wonderful", "lovely", "excellent", "fantastic", "delightful", "superb", "pleasant"]
BAD = ["awful", "terrible", "horrible", "dreadful", "bad", "disgusting", "miserable", "poor"]
THINGS = ["food", "service", "room", "movie", "book", "trip", "phone", "coffee", "hotel", "concert"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sentiment_pairs(n: int, seed: int) -> list[dict]:
    """A learnable toy task: the response with a positive word is chosen."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = rng.choice(THINGS)
        rows.append(
            {
                "prompt": f"How was the {thing}?",
                "chosen": f"The {thing} was {rng.choice(GOOD)}.",
                "rejected": f"The {thing} was {rng.choice(BAD)}.",
            }
        )
    return rows


@pytest.fixture(scope="session")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_backbone("minilm").path)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    backbone = resolve_backbone("smollm2")
    return AutoTokenizer.from_pretrained(backbone.path, **backbone.from_pretrained_kwargs())


@pytest.fixture(scope="session")
def tiny_encoder_checkpoint(tmp_path_factory, minilm_tokenizer) -> Path:
    """A 2-layer random BERT with MiniLM's real tokenizer, saved as a local checkpoint directory."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)  # the same random weights whichever test asks first
    BertForSequenceClassification(tiny_bert_config(minilm_tokenizer.vocab_size)).save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_decoder_checkpoint(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template (pad == eos)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = tiny_llama_config(len(smollm2_tokenizer), smollm2_tokenizer.pad_token_id, smollm2_tokenizer.eos_token_id)
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def tiny_bert_config(vocab_size: int, num_labels: int = 1) -> BertConfig:
    """2 layers of width 32: a real BERT's shapes and behaviour at test speed."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=num_labels,
    )


def save_tiny_token_classifier(path: Path, kind: str, tokenizer, seed: int = 0) -> Path:
    """A random 2-label token classifier (TRL's PRMTrainer shape) with a real tokenizer, saved as a checkpoint:
    a Llama for `kind` "decoder" (SmolLM2's tokenizer), a BERT for "encoder" (MiniLM's)."""
    torch.manual_seed(seed)
    if kind == "decoder":
        config = tiny_llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        config.num_labels = 2
        LlamaForTokenClassification(config).save_pretrained(path)
    else:
        BertForTokenClassification(tiny_bert_config(tokenizer.vocab_size, num_labels=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_llama_config(vocab_size: int, pad_token_id: int, eos_token_id: int) -> LlamaConfig:
    """2 layers of width 32: shapes and behaviour of a real Llama at test speed."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
    )


@pytest.fixture
def toy_data(tmp_path) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(96, seed=0))
    test = write_jsonl(tmp_path / "test.jsonl", sentiment_pairs(48, seed=1))
    return train, test


@pytest.fixture(scope="session")
def trained_encoder(tmp_path_factory, tiny_encoder_checkpoint) -> tuple[Path, Path]:
    """A tiny encoder reward model trained on the toy task (so accuracy means something), and its eval data."""
    tmp = tmp_path_factory.mktemp("trained-encoder")
    test_file = write_jsonl(tmp / "test.jsonl", sentiment_pairs(48, seed=1))
    return train_tiny_encoder(tiny_encoder_checkpoint, sentiment_pairs(96, seed=0), test_file, tmp, 8), test_file


def train_tiny_encoder(checkpoint: Path, train_rows: list[dict], test_file: Path, tmp: Path, batch_size: int) -> Path:
    """Train the tiny random encoder on `train_rows` (6 epochs at 2e-3): a real reward model in seconds."""
    train_file = write_jsonl(tmp / "train.jsonl", train_rows)
    output = tmp / "rm"
    cfg = TrainConfig(
        data=str(train_file),
        eval_data=str(test_file),
        output=str(output),
        model=str(checkpoint),
        epochs=6,
        lr=2e-3,
        batch_size=batch_size,
    )
    train(cfg)
    return output


@pytest.fixture(scope="session")
def encoder_bundle(trained_encoder, tmp_path_factory) -> Path:
    checkpoint, test_file = trained_encoder
    out = tmp_path_factory.mktemp("bundles") / "encoder"
    result = rm_export("--model", str(checkpoint), "--output", str(out), "--dtype", "fp32,int8", "--name", "toy")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def decoder_bundle(tiny_decoder_checkpoint, tmp_path_factory) -> Path:
    """The tiny random Llama with SmolLM2's chat template, exported as rm-export does for checkpoints trained
    elsewhere (recipe `chat`, pooled on the last token)."""
    out = tmp_path_factory.mktemp("bundles") / "decoder"
    args = ("--dtype", "fp32", "--max-length", "128", "--name", "chat")
    result = rm_export("--model", str(tiny_decoder_checkpoint), "--output", str(out), *args)
    assert result.returncode == 0, result.stderr
    return out


def served_sha256(bundle: Path, variant: str = "fp32") -> str:
    """What every answer names a bundle by (docs/integrations.md, "Which model scored"), derived here."""
    return hashlib.sha256((bundle / "bundle.json").read_bytes() + b"\n" + variant.encode()).hexdigest()[:12]


def rm_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "rm-export"), *args], capture_output=True, text=True, timeout=600
    )


PROMPTS = [f"How was the {thing}?" for thing in THINGS]
WORDS = GOOD + ["ok", "fine", "not great", "rather bad", "awful", "a mixed bag"]


def random_texts(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Responses of very different lengths, so batches mix lengths and need padding."""
    return [
        (rng.choice(PROMPTS), " ".join(f"It was {rng.choice(WORDS)}." for _ in range(rng.randint(1, 30))))
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def reference(encoder_bundle):
    """Each sample scored alone by ONNX Runtime in this process, from the same bundle."""
    bundle = load_bundle(encoder_bundle)
    engine, encoder = open_engine(bundle, "fp32"), bundle.sample_encoder()

    def score_alone(prompt: str, response: str) -> float:
        ids = encoder.encode(Sample.from_text(prompt, response)).ids
        return float(engine.score(*pad_batch([ids], 0))[0])

    return score_alone
