"""The input recipe (truncation policy by hand, pair and chat templates against transformers) and the bundle
manifest's fields."""

from __future__ import annotations

import json
import re

import pytest

from rm_contract import recipe as recipe_module
from rm_contract.bundle import FORMAT_VERSION, MANIFEST, BundleError, load_bundle
from rm_contract.recipe import InputRecipe, RecipeError, Sample, SampleEncoder, truncate_prompt_left


def test_short_samples_are_not_truncated():
    assert truncate_prompt_left([1, 2], [3, 4], budget=4) == ([1, 2], [3, 4], False)


def test_prompt_is_cut_from_the_left_first():
    assert truncate_prompt_left([1, 2, 3, 4], [5, 6], budget=4) == ([3, 4], [5, 6], True)


def test_overlong_response_keeps_its_final_token_and_drops_the_prompt():
    assert truncate_prompt_left([1, 2], [3, 4, 5, 6, 7], budget=3) == ([], [3, 4, 7], True)


def test_pair_template_matches_the_tokenizers_own_pair_encoding(minilm_tokenizer):
    encoder = SampleEncoder(minilm_tokenizer.backend_tokenizer, InputRecipe(template="pair", max_length=64))
    encoded = encoder.encode(Sample.from_text("How was it?", "It was great."))
    assert encoded.ids == minilm_tokenizer("How was it?", "It was great.")["input_ids"]
    assert not encoded.truncated


def test_pair_template_truncation_keeps_special_tokens(minilm_tokenizer):
    encoder = SampleEncoder(minilm_tokenizer.backend_tokenizer, InputRecipe(template="pair", max_length=12))
    encoded = encoder.encode(Sample.from_text("one two three four five six seven", "it was really very great"))
    tokens = minilm_tokenizer.convert_ids_to_tokens(encoded.ids)
    assert encoded.truncated and len(encoded.ids) == 12
    assert tokens == ["[CLS]", "four", "five", "six", "seven", "[SEP]", "it", "was", "really", "very", "great", "[SEP]"]


def test_chat_template_matches_transformers_apply_chat_template(smollm2_tokenizer):
    recipe = InputRecipe(
        template="chat",
        max_length=512,
        chat_template=smollm2_tokenizer.chat_template,
        special_tokens={k: v for k, v in smollm2_tokenizer.special_tokens_map.items() if isinstance(v, str)},
    )
    encoder = SampleEncoder(smollm2_tokenizer.backend_tokenizer, recipe)
    sample = Sample.from_text("How was your weekend?", "Lovely, thanks!")
    expected = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "How was your weekend?"}, {"role": "assistant", "content": "Lovely, thanks!"}],
        tokenize=True,
        return_dict=False,
    )
    assert encoder.encode(sample).ids == list(expected)


def test_chat_truncation_keeps_the_whole_response(smollm2_tokenizer):
    recipe = InputRecipe(template="chat", max_length=24, chat_template=smollm2_tokenizer.chat_template)
    encoder = SampleEncoder(smollm2_tokenizer.backend_tokenizer, recipe)
    encoded = encoder.encode(Sample.from_text("word " * 100, "Lovely, thanks!"))
    assert encoded.truncated and len(encoded.ids) == 24
    assert smollm2_tokenizer.decode(encoded.ids).endswith("<|im_start|>assistant\nLovely, thanks!<|im_end|>\n")


DATED_TEMPLATE = (  # how Llama-3.1/3.2 templates open: the current date in the system header
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ strftime_now('%d %b %Y') }}<|eot_id|>"
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_a_date_rendering_template_renders_the_recipes_date_on_any_day(smollm2_tokenizer, monkeypatch):
    """With the clock, the same sample's ids (and reward) changed at midnight, and training and serving on
    different days scored different ids. The recipe's date is rendered instead, whatever day it is."""
    recipe = InputRecipe(
        template="chat",
        max_length=256,
        chat_template=DATED_TEMPLATE,
        special_tokens={"bos_token": ""},
        date="2026-01-31",
    )
    encoder = SampleEncoder(smollm2_tokenizer.backend_tokenizer, recipe)
    sample = Sample.from_text("How was your weekend?", "Lovely, thanks!")
    today = encoder.encode(sample).ids

    class NextMonth(recipe_module.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 2, 1, 0, 0, 1)

    monkeypatch.setattr(recipe_module, "datetime", NextMonth)  # past midnight, into another month
    assert encoder.encode(sample).ids == today
    assert "Today Date: 31 Jan 2026" in smollm2_tokenizer.decode(today)


def test_a_rendered_conversation_gets_the_ids_of_its_messages_with_or_without_its_bos(smollm2_tokenizer):
    """vLLM-API text inputs (encode_text): veRL renders the conversation with the reward model's template and
    strips a leading BOS (vLLM adds one back); another client keeps it. Either way the text must get the
    ids its messages get: the template's BOS exactly once, nothing added to a template without BOS."""
    messages = [{"role": "user", "content": "How was your weekend?"}, {"role": "assistant", "content": "Lovely!"}]
    sample = Sample.from_text(messages[0]["content"], messages[1]["content"])
    bos = "<|endoftext|>"
    with_bos = InputRecipe(
        template="chat",
        max_length=256,
        chat_template=DATED_TEMPLATE,
        special_tokens={"bos_token": bos},
        date="2026-01-31",
    )
    encoder = SampleEncoder(smollm2_tokenizer.backend_tokenizer, with_bos)
    rendered = recipe_module.render_chat(DATED_TEMPLATE, messages, False, {"bos_token": bos}, "2026-01-31")
    expected = encoder.encode(sample).ids
    bos_id = smollm2_tokenizer.convert_tokens_to_ids(bos)
    assert rendered.startswith(bos) and expected[0] == bos_id and expected[1] != bos_id
    assert encoder.encode_text(rendered) == expected
    assert encoder.encode_text(rendered[len(bos) :]) == expected  # put back once
    assert encoder.encode_text(rendered[len(bos) :], add_special_tokens=False) == expected[1:]  # as told

    no_bos = InputRecipe(template="chat", max_length=256, chat_template=smollm2_tokenizer.chat_template)
    encoder = SampleEncoder(smollm2_tokenizer.backend_tokenizer, no_bos)
    rendered = smollm2_tokenizer.apply_chat_template(messages, tokenize=False)
    assert encoder.encode_text(rendered) == encoder.encode(sample).ids


def test_a_text_for_an_encoder_gets_the_tokenizers_single_text_special_tokens(minilm_tokenizer):
    """What vLLM feeds for a text (add_special_tokens defaults to true): [CLS] text [SEP]."""
    encoder = SampleEncoder(minilm_tokenizer.backend_tokenizer, InputRecipe(template="pair", max_length=64))
    assert encoder.encode_text("It was great.") == minilm_tokenizer("It was great.")["input_ids"]
    assert (
        encoder.encode_text("It was great.", add_special_tokens=False)
        == minilm_tokenizer("It was great.", add_special_tokens=False)["input_ids"]
    )


def test_max_length_without_room_for_a_response_is_an_error(minilm_tokenizer):
    with pytest.raises(RecipeError, match="leaves no room"):
        SampleEncoder(minilm_tokenizer.backend_tokenizer, InputRecipe(template="pair", max_length=3))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"recipe": None}, "'recipe' must be a JSON dict"),
        ({"name": None}, "'name' must be a JSON str"),
        ({"recipe": {"template": "pair", "max_length": 8, "colour": "red"}}, "'recipe' is not an input recipe"),
        ({"variants": {"fp64": {"file": "model.onnx"}}}, "unknown variants ['fp64']"),
        (
            {"variants": {"fp32": {"file": "model.onnx", "weights_file": "model.onnx.data"}}},
            "variant 'fp32': weights_file 'model.onnx.data' is not listed in 'files'",
        ),
        ({"parity": {"reward_scale": 1.0}}, "'parity.reference_ids' is missing"),
        (
            {"variants": {"fp32": {"file": "model.onnx", "reference_rewards": [0.5]}}},
            "variant 'fp32': 'reference_rewards' must hold one number per reference sample",
        ),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_field(tmp_path, change, message):
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": "m",
        "version": 1,
        "pooling": "cls",
        "max_length": 8,
        "recipe": {"template": "pair", "max_length": 8},
        "variants": {"fp32": {"file": "model.onnx", "reference_rewards": [0.5, -1.0]}},
        "parity": {"reward_scale": 1.0, "reference_ids": [[101, 7, 102], [101, 102]]},
        "files": {"model.onnx": "0" * 64, "tokenizer.json": "1" * 64},
    }
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert load_bundle(tmp_path, verify=False).recipe.max_length == 8
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, **change}))
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(tmp_path, verify=False)
    missing = {k: v for k, v in manifest.items() if k != "files"}
    (tmp_path / MANIFEST).write_text(json.dumps(missing))
    with pytest.raises(BundleError, match="'files' is missing"):
        load_bundle(tmp_path)
