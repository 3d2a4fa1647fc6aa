"""The reward model: a Hugging Face sequence-classification model with one output and an explicit pooling rule.

Encoders (BERT, MiniLM) keep their own head, which reads the first ([CLS]) token. Decoders (Llama,
SmolLM2, Qwen) trained here are scored at the last attended token, found from the attention mask rather
than from `pad_token_id` (pad == eos would otherwise pick the wrong token). Decoder checkpoints trained
elsewhere with transformers' head (TRL, most public reward models) keep transformers' rule: the last token
that is not `pad_token_id`. Either padding side gives the same reward: position ids follow the mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from rm_contract.backbones import Backbone, load_pretrained, resolve_backbone
from rm_contract.padding import position_ids
from rm_contract.recipe import InputRecipe, SampleEncoder

Pooling = Literal["cls", "last_attended", "last_non_pad"]
METADATA_FILE = "reward_model.json"
SUPPORTED_MODEL_TYPES = (
    *("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt2", "olmo2"),
    *("bert", "roberta", "deberta-v2", "modernbert", "distilbert", "electra"),
)
"""Model types proven end to end by tests/training/test_architectures.py. Other types with a transformers
sequence-classification head load too; rm-export's parity checks then decide."""


@dataclass
class RewardNormalization:
    """Mean and std of the reward over a reference set; the server can return (r - mean) / std."""

    mean: float = 0.0
    std: float = 1.0
    size: int = 0
    description: str = ""


@dataclass
class RewardModelMetadata:
    """What a checkpoint needs beyond the Hugging Face files to score exactly as in training."""

    recipe: InputRecipe
    pooling: Pooling
    source: str
    normalization: RewardNormalization = field(default_factory=RewardNormalization)
    segment_sep_id: int | None = None
    """Encoders fine-tuned on `tokenizer(prompt, response)` segments: the separator after which segment 1
    starts (the graph derives the segment ids from the ids). None: segment 0 everywhere, as rm-train trains."""
    output_kind: str = "sequence"
    """ "sequence" (one reward per sample) or "steps" (a process reward model, rm_training.step_model)."""

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe.to_dict(),
            "pooling": self.pooling,
            "source": self.source,
            "normalization": vars(self.normalization),
            "segment_sep_id": self.segment_sep_id,
            "output_kind": self.output_kind,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RewardModelMetadata:
        return cls(
            recipe=InputRecipe.from_dict(data["recipe"]),
            pooling=data["pooling"],
            source=data.get("source", ""),
            normalization=RewardNormalization(**data.get("normalization", {})),
            segment_sep_id=data.get("segment_sep_id"),
            output_kind=data.get("output_kind", "sequence"),
        )


class RewardModel(nn.Module):
    """Maps padded ids and their attention mask to one reward per row."""

    output_kind = "sequence"

    def __init__(self, model: PreTrainedModel, pooling: Pooling, segment_sep_id: int | None = None):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.segment_sep_id = segment_sep_id
        self.pad_token_id = model.config.pad_token_id
        if pooling == "last_non_pad" and self.pad_token_id is None:
            raise ValueError("last_non_pad pooling needs config.pad_token_id")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: (B, T) -> rewards (B,)
        if self.pooling == "cls":
            segments = {}
            if self.segment_sep_id is not None:
                segments["token_type_ids"] = segment_ids(input_ids, attention_mask, self.segment_sep_id)
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **segments).logits[:, 0].float()
        hidden = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask.long()),
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
        keep = attention_mask.long()
        if self.pooling == "last_non_pad":  # transformers' rule: a trailing pad (== eos) token is skipped
            keep = keep * (input_ids != self.pad_token_id).long()
        T = input_ids.shape[1]
        last = (keep * torch.arange(T, device=input_ids.device)).argmax(-1)  # (B,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.model.score(pooled.to(self.model.score.weight.dtype))[:, 0].float()  # fp16 models too

    def read_scored(self, scored: torch.Tensor) -> torch.Tensor:
        """The packed form's last step: the hidden states at the score positions (N, H) -> rewards (N,)."""
        model = self.model
        if self.pooling != "cls":
            return model.score(scored.to(model.score.weight.dtype))[:, 0].float()
        pooled = model.base_model.pooler(scored[:, None])  # BERT's pooler reads token 0 of each "row"
        return model.classifier(model.dropout(pooled))[:, 0].float()


PACKABLE_ENCODERS = ("bert",)
"""Encoder types whose packed graph is proven (their [CLS] head is the pooler + classifier read at one token,
position ids are plain 0, 1, ...). Every supported decoder type packs."""


def packing_unsupported(model: RewardModel) -> str | None:
    """Why this model exports in the padded form rather than the packed one; None when it packs."""
    model_type = model.model.config.model_type
    if model.pooling == "cls" and model_type not in PACKABLE_ENCODERS:
        return f"model type {model_type!r}: packed encoders are {', '.join(PACKABLE_ENCODERS)}"
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not in the proven architecture list"
    return None


class PackedRewardModel(nn.Module):
    """The packed form of a reward model (rm_contract.packing): several samples per row, each attending only
    to itself, positions restarting per sample, one reward per sample read at its scoring position.

    The attention mask is built in the graph from the group and branch ids, as the additive 4-D mask
    transformers' eager attention takes as given. Models with sliding-window layers get the window applied
    by position (a dict of masks by layer type where the model mixes full and sliding layers).
    """

    def __init__(self, reward_model: RewardModel):
        super().__init__()
        self.reward_model = reward_model
        config = reward_model.model.config
        self.decoder = reward_model.pooling != "cls"
        self.window = getattr(config, "sliding_window", None) if self.decoder else None
        layer_types = set(getattr(config, "layer_types", None) or [])
        self.by_layer_type = "sliding_attention" in layer_types
        if not self.by_layer_type and not getattr(config, "use_sliding_window", True):
            self.window = None  # qwen2-style flag: configured window, unused

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        group_ids: torch.Tensor,
        branch_ids: torch.Tensor,
        score_positions: torch.Tensor,
    ) -> torch.Tensor:
        # (R, T) ids, positions, groups, branches; (N,) flat positions -> (N,) rewards
        model = self.reward_model.model
        rows, width = input_ids.shape
        visible = (group_ids[:, :, None] == group_ids[:, None, :]) & (
            (branch_ids[:, None, :] == 0) | (branch_ids[:, None, :] == branch_ids[:, :, None])
        )
        if self.decoder:
            visible = visible & torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril()
        dtype = next(model.parameters()).dtype
        mask = self._additive(visible, dtype)
        if self.window:
            windowed = self._additive(
                visible & (position_ids[:, :, None] - position_ids[:, None, :] < self.window), dtype
            )
            mask = {"full_attention": mask, "sliding_attention": windowed} if self.by_layer_type else windowed
        extra = {}
        if self.reward_model.segment_sep_id is not None:
            extra["token_type_ids"] = packed_segment_ids(input_ids, position_ids, self.reward_model.segment_sep_id)
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **extra
        ).last_hidden_state
        return self.reward_model.read_scored(hidden.reshape(rows * width, -1)[score_positions])  # (N, H) -> (N,)

    @staticmethod
    def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(R, T, T) bool -> (R, 1, T, T) additive mask: 0 where visible, the dtype's minimum elsewhere."""
        return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)[:, None]


def packed_segment_ids(input_ids: torch.Tensor, position_ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """`segment_ids` per packed sample: separators counted from the sample's first token (row index minus
    its position), not from the row's."""
    is_sep = (input_ids == sep_id).long()
    before = is_sep.cumsum(-1) - is_sep  # separators before each token, counted from the row's start
    starts = torch.arange(input_ids.shape[1], device=input_ids.device) - position_ids
    return ((before - before.gather(1, starts)) > 0).long()


def segment_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, sep_id: int) -> torch.Tensor:
    """BERT's pair convention from the ids alone: 0 up to and including the first separator, 1 after it."""
    is_sep = (input_ids == sep_id).long()  # (B, T)
    return ((is_sep.cumsum(-1) - is_sep) > 0).long() * attention_mask.long()


def pair_segment_separator(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, recipe: InputRecipe
) -> int | None:
    """The separator id when the checkpoint reads segment ids on the pair template (BERT, ELECTRA, ...):
    the tokenizer gives the response segment 1 and the model has an embedding for it. None otherwise."""
    if recipe.template != "pair" or (getattr(model.config, "type_vocab_size", 0) or 0) < 2:
        return None
    if 1 not in tokenizer("a", "b").get("token_type_ids", []):
        return None
    return tokenizer.sep_token_id


ENCODER_MODEL_TYPES = ("bert", "roberta", "deberta-v2", "modernbert", "distilbert", "electra")


def token_classifier_attention(model: PreTrainedModel) -> Pooling:
    """A token classifier's attention, by architecture (its head's name does not tell: GPT-2's is
    `classifier` too), as a pooling value: "cls" (bidirectional) for encoders, "last_attended" (causal) for
    decoders. CheckpointError for a type in neither list."""
    model_type = model.config.model_type
    if model_type in ENCODER_MODEL_TYPES:
        return "cls"
    if model_type in SUPPORTED_MODEL_TYPES:
        return "last_attended"
    raise CheckpointError(
        f"model type {model_type!r}: process reward models are {', '.join(SUPPORTED_MODEL_TYPES)} (is its "
        "attention causal? a wrong guess would score every step wrongly)"
    )


def pooling_of(model: PreTrainedModel) -> Pooling:
    """Decoder heads in transformers are named `score` and read the last token; encoder heads read [CLS]."""
    return "last_attended" if isinstance(getattr(model, "score", None), nn.Linear) else "cls"


def default_recipe(
    tokenizer: PreTrainedTokenizerBase, pooling: Pooling, max_length: int, template: str | None = None
) -> InputRecipe:
    """Unless `template` says otherwise: decoders with a chat template score the rendered conversation;
    other decoders join prompt and response with EOS at the end (as TRL does); encoders use their pair
    template."""
    decoder = pooling != "cls"
    if template is None:
        template = "chat" if decoder and tokenizer.chat_template else ("concat" if decoder else "pair")
    chat = template == "chat"
    special = {name: str(value) for name, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
    return InputRecipe(
        template=template,
        max_length=max_length,
        append_eos=not chat and decoder and tokenizer.eos_token is not None,
        eos_token=tokenizer.eos_token,
        chat_template=tokenizer.chat_template if chat else None,
        special_tokens=special if chat else None,
        date=date.today().isoformat() if chat else None,  # what strftime_now renders wherever the recipe is used
    )


def load_backbone_model(backbone: Backbone) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence-classification model with one output on top of a pretrained backbone (new random head)."""
    kwargs = backbone.from_pretrained_kwargs()
    tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs)
    model = load_pretrained(AutoModelForSequenceClassification, backbone, num_labels=1)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def new_reward_model(
    name_or_path: str, max_length: int
) -> tuple[RewardModel, PreTrainedTokenizerBase, RewardModelMetadata]:
    """A fresh reward model on a backbone (bundled name or local checkpoint), ready to train."""
    model, tokenizer = load_backbone_model(resolve_backbone(name_or_path))
    pooling = pooling_of(model)
    metadata = RewardModelMetadata(default_recipe(tokenizer, pooling, max_length), pooling, source=name_or_path)
    return RewardModel(model, pooling), tokenizer, metadata


class CheckpointError(ValueError):
    """The directory is not a checkpoint this project can score or export."""


def load_reward_model(
    directory: str | Path, template: str | None = None, max_length: int | None = None, step_token: str | None = None
) -> tuple[RewardModel, PreTrainedTokenizerBase, RewardModelMetadata]:
    """A reward model from a checkpoint directory (safetensors only; nothing is unpickled).

    Checkpoints from `rm-train` carry their recipe and pooling rule. Others (TRL's RewardTrainer, public
    reward models) get transformers' pooling rule and a recipe inferred from the tokenizer, which
    `template` and `max_length` may override. Token-classification checkpoints are process reward models
    (rm_training.step_model; `step_token` for one trained elsewhere).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face checkpoint: config.json is missing")
    from rm_training.step_model import is_step_checkpoint, load_step_model  # it builds on this module

    if is_step_checkpoint(directory):
        if template:
            raise CheckpointError(f"{directory} is a process reward model: its template is TRL's (--template unused)")
        return load_step_model(directory, step_token, max_length)
    if step_token:
        raise CheckpointError(f"{directory} is not a token-classification checkpoint: --step-token is for those")
    metadata_path = directory / METADATA_FILE
    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise CheckpointError(f"{directory}/config.json is not a JSON object") from None
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise CheckpointError(
            f"{directory}: model type {model_type!r} has no sequence-classification head in transformers, so it "
            f"cannot be a reward model here; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    model, tokenizer = load_checkpoint(directory, AutoModelForSequenceClassification, "sequence-classification")
    if model.config.num_labels != 1:
        raise CheckpointError(
            f"{directory} has {model.config.num_labels} output labels; a reward model has exactly one "
            "(a sequence-classification head with num_labels=1)"
        )
    if metadata_path.is_file():
        if template or max_length:
            raise CheckpointError(f"{directory} was trained by rm-train: its input recipe is fixed by training")
        metadata = RewardModelMetadata.from_dict(json.loads(metadata_path.read_text()))
        return RewardModel(model, metadata.pooling, metadata.segment_sep_id), tokenizer, metadata
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    pooling: Pooling = "last_non_pad" if pooling_of(model) == "last_attended" else "cls"
    limit = max_length or min(
        v for v in (tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None), 2048) if v
    )
    recipe = default_recipe(tokenizer, pooling, limit, template)
    separator = pair_segment_separator(tokenizer, model, recipe)
    metadata = RewardModelMetadata(recipe, pooling, source=str(directory), segment_sep_id=separator)
    return RewardModel(model, pooling, separator), tokenizer, metadata


def load_checkpoint(directory: Path, auto_class, head: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (through `auto_class`, safetensors only: nothing is unpickled) and tokenizer of a checkpoint;
    CheckpointError naming the `head` it was loaded as when transformers cannot."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = auto_class.from_pretrained(directory, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{directory} cannot be loaded as a {head} checkpoint: {e}") from e
    return model, tokenizer


def save_reward_model(
    directory: str | Path, model: RewardModel, tokenizer: PreTrainedTokenizerBase, metadata: RewardModelMetadata
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / METADATA_FILE).write_text(json.dumps(metadata.to_dict(), indent=2) + "\n")


def sample_encoder(tokenizer: PreTrainedTokenizerBase, recipe: InputRecipe) -> SampleEncoder:
    """The recipe's encoder over the fast tokenizer's backend (the same tokenizer.json the server loads)."""
    return SampleEncoder(tokenizer.backend_tokenizer, recipe)
