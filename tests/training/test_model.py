"""Last-attended-token pooling: the same reward alone, right-padded and left-padded, also when pad == eos."""

from __future__ import annotations

import datetime

import pytest
import torch

from rm_contract.backbones import resolve_backbone
from rm_contract.recipe import InputRecipe
from rm_training.batching import pad
from rm_training.model import RewardModel, default_recipe, load_backbone_model, pooling_of


@pytest.fixture(scope="module")
def tiny_decoder(tiny_decoder_checkpoint):
    model, tokenizer = load_backbone_model(resolve_backbone(str(tiny_decoder_checkpoint)))
    return RewardModel(model.eval(), pooling_of(model)), tokenizer


def test_decoder_checkpoints_use_last_attended_pooling(tiny_decoder, tiny_encoder_checkpoint):
    model, tokenizer = tiny_decoder
    assert model.pooling == "last_attended"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2: pad == eos, the hard case
    encoder, _ = load_backbone_model(resolve_backbone(str(tiny_encoder_checkpoint)))
    assert pooling_of(encoder) == "cls"


@pytest.mark.parametrize("padding_side", ["right", "left"])
@torch.no_grad()
def test_reward_does_not_depend_on_padding_even_when_text_ends_with_eos(tiny_decoder, padding_side):
    model, tokenizer = tiny_decoder
    eos = tokenizer.eos_token_id
    sequences = [
        tuple(tokenizer("The food was great.")["input_ids"]) + (eos,),  # ends with eos == pad
        tuple(tokenizer("Awful.")["input_ids"]) + (eos,),
        tuple(tokenizer("A much longer response that needs no padding at all in this batch.")["input_ids"]),
    ]
    alone = torch.cat([model(*pad([s], tokenizer.pad_token_id)) for s in sequences])
    batched = model(*pad(sequences, tokenizer.pad_token_id, padding_side))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@torch.no_grad()
def test_reward_is_read_at_the_final_token_not_before_a_trailing_eos(tiny_decoder):
    model, tokenizer = tiny_decoder
    ids = tuple(tokenizer("The food was great.")["input_ids"]) + (tokenizer.eos_token_id,)
    input_ids, mask = pad([ids], tokenizer.pad_token_id)
    hidden = model.model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    by_hand = model.model.score(hidden[:, -1])[:, 0]  # the eos itself is the last attended token
    torch.testing.assert_close(model(input_ids, mask), by_hand)
    pad_rule = model.model.score(hidden[:, -2])[:, 0]  # transformers' pad-based rule lands here instead
    assert not torch.allclose(by_hand, pad_rule)


@torch.no_grad()
def test_encoder_reward_does_not_depend_on_right_padding(tiny_encoder_checkpoint, minilm_tokenizer):
    encoder, _ = load_backbone_model(resolve_backbone(str(tiny_encoder_checkpoint)))
    model = RewardModel(encoder.eval(), "cls")
    sequences = [tuple(minilm_tokenizer(t)["input_ids"]) for t in ["short", "a somewhat longer text to score here"]]
    alone = torch.cat([model(*pad([s], 0)) for s in sequences])
    torch.testing.assert_close(model(*pad(sequences, 0)), alone, atol=1e-5, rtol=0)


def test_new_chat_recipes_record_the_day_they_are_made(smollm2_tokenizer):
    recipe = default_recipe(smollm2_tokenizer, "last_non_pad", 128)
    assert recipe.template == "chat" and recipe.date == datetime.date.today().isoformat()
    assert InputRecipe.from_dict(recipe.to_dict()) == recipe  # kept in the checkpoint and the bundle
