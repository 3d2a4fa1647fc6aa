"""Process reward models: a token classifier read at each step token, P(step correct) per step.

The checkpoint is what TRL's PRMTrainer wrote: `AutoModelForTokenClassification` with two labels (class 1:
the step is correct), the label of each step on its step token; checkpoints with one logit (sigmoid) load
too. rm-train writes the same shape, plus reward_model.json with its recipe (the recipe's `step_token` says
where steps end). Encoders read the whole solution at every step (bidirectional attention), decoders only
what came before (causal), as in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForTokenClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

from rm_contract.backbones import load_pretrained, resolve_backbone
from rm_contract.padding import position_ids
from rm_contract.recipe import InputRecipe
from rm_training.model import (
    METADATA_FILE,
    CheckpointError,
    Pooling,
    RewardModelMetadata,
    load_checkpoint,
    token_classifier_attention,
)

TRL_STEP_TOKEN = "\n"
"""TRL PRMTrainer's default separator (decoders); encoders drop whitespace and use their [SEP]."""


class StepRewardModel(nn.Module):
    """Maps padded ids and their attention mask to P(correct) at every token (B, T); a step's score is the
    value at its step token. `pooling` says only whether attention is causal ("last_attended": decoders) or
    bidirectional ("cls": encoders); nothing is pooled."""

    output_kind = "steps"

    def __init__(self, model: PreTrainedModel, pooling: Pooling):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.segment_sep_id = None
        self.pad_token_id = model.config.pad_token_id

    @property
    def head(self) -> nn.Linear:
        """transformers names a decoder's token head `score`, an encoder's `classifier`."""
        return getattr(self.model, "score", None) or self.model.classifier

    def step_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., labels) -> (...): class 1's softmax probability (TRL's two labels), or sigmoid of one logit."""
        logits = logits.float()
        return logits.softmax(-1)[..., 1] if logits.shape[-1] == 2 else logits[..., 0].sigmoid()

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, labels), positions following the mask so either padding side gives the same."""
        extra = {"position_ids": position_ids(attention_mask.long())} if self.pooling != "cls" else {}
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
        return self.head(hidden.to(self.head.weight.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.step_probabilities(self.logits(input_ids, attention_mask))

    def read_scored(self, scored: torch.Tensor) -> torch.Tensor:
        """The packed form's last step (rm_training.model.PackedRewardModel): hidden states at the step
        tokens (N, H) -> P(correct) (N,)."""
        return self.step_probabilities(self.head(scored.to(self.head.weight.dtype)))


def step_recipe(
    tokenizer: PreTrainedTokenizerBase, decoder: bool, max_length: int, step_token: str | None
) -> InputRecipe:
    """TRL PRMTrainer's input (`tokenize_row`): the tokenizer's BOS where it has one, the prompt, then each
    step tokenized on its own followed by the step token; no eos. The step token defaults to TRL's "\\n" for
    decoders and, for encoders (whose tokenizers drop whitespace), their [SEP]."""
    token = step_token or (TRL_STEP_TOKEN if decoder else tokenizer.sep_token)
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
    return InputRecipe(
        template="steps",
        max_length=max_length,
        special_tokens={"bos_token": bos} if bos else None,
        step_token=token,
    )


def new_step_model(
    name_or_path: str, max_length: int, step_token: str | None = None
) -> tuple[StepRewardModel, PreTrainedTokenizerBase, RewardModelMetadata]:
    """A fresh process reward model on a backbone (bundled name or local checkpoint): two labels, as TRL."""
    backbone = resolve_backbone(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(backbone.path, **backbone.from_pretrained_kwargs())
    model = load_pretrained(AutoModelForTokenClassification, backbone, num_labels=2)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    pooling = token_classifier_attention(model)
    recipe = step_recipe(tokenizer, pooling != "cls", max_length, step_token)
    metadata = RewardModelMetadata(recipe, pooling, source=name_or_path, output_kind="steps")
    return StepRewardModel(model, pooling), tokenizer, metadata


def is_step_checkpoint(directory: Path) -> bool:
    """A token-classification checkpoint (TRL's PRMTrainer output, or rm-train's process reward model)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return any(str(a).endswith("ForTokenClassification") for a in config.get("architectures") or [])


def load_step_model(
    directory: Path, step_token: str | None = None, max_length: int | None = None
) -> tuple[StepRewardModel, PreTrainedTokenizerBase, RewardModelMetadata]:
    """A process reward model from a token-classification checkpoint; `step_token` and `max_length` for one
    trained elsewhere (TRL's default separator "\\n" for decoders, [SEP] for encoders)."""
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type not in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES:
        raise CheckpointError(
            f"{directory}: model type {model_type!r} has no token-classification head in transformers"
        )
    model, tokenizer = load_checkpoint(directory, AutoModelForTokenClassification, "token-classification")
    if model.config.num_labels not in (1, 2):
        raise CheckpointError(
            f"{directory} has {model.config.num_labels} labels; a process reward model has 2 (TRL: class 1 is a "
            "correct step) or 1 (a sigmoid logit)"
        )
    metadata_path = directory / METADATA_FILE
    if metadata_path.is_file():
        if step_token or max_length:
            raise CheckpointError(f"{directory} was trained by rm-train: its input recipe is fixed by training")
        metadata = RewardModelMetadata.from_dict(json.loads(metadata_path.read_text()))
        return StepRewardModel(model, metadata.pooling), tokenizer, metadata
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    pooling = token_classifier_attention(model)
    limit = max_length or min(
        v for v in (tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None), 2048) if v
    )
    recipe = step_recipe(tokenizer, pooling != "cls", limit, step_token)
    metadata = RewardModelMetadata(recipe, pooling, source=str(directory), output_kind="steps")
    return StepRewardModel(model, pooling), tokenizer, metadata
