"""Golden ids of the input recipe: for every data form and the recipes rm-train writes, the ids training
computes equal the ids the server computes from what rm-client sends, and both equal the ids stored in
golden_ids.json. A recipe change that would silently shift the rewards of existing bundles fails here.

Regenerate (only for a deliberate, versioned recipe change): RM_UPDATE_GOLDEN=1 pytest tests/contract
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from rm_client.samples import sample_to_pb
from rm_contract.pb import reward_pb2 as pb
from rm_contract.recipe import InputRecipe, SampleEncoder
from rm_contract.records import parse_record
from rm_server.transport.grpc.convert import sample_from_pb
from rm_training.batching import tokenize_groups
from rm_training.model import default_recipe, sample_encoder

GOLDEN = Path(__file__).with_name("golden_ids.json")


def message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


HI, HELLO, NO = message("user", "Hi"), message("assistant", "Hello there!"), message("assistant", "No.")
LONG = " ".join(f"word{i}" for i in range(120))
FORMS = {
    "text_pair": {"prompt": "How was the trip?", "chosen": "Lovely, thanks!", "rejected": "Awful."},
    "query_with_margin": {"query": "Rate the café.", "chosen": "Très bien ☕", "rejected": "meh", "margin": 2.0},
    "conversations_implicit_prompt": {"chosen": [HI, HELLO], "rejected": [HI, NO]},
    "conversations_explicit_prompt": {
        "prompt": [message("system", "Be brief."), HI],
        "chosen": [HELLO],
        "rejected": [NO],
    },
    "text_prompt_message_responses": {"prompt": "Hi", "chosen": [HELLO], "rejected": [NO]},
    "multi_turn_diverging_early": {
        "chosen": [HI, HELLO, message("user", "And now?"), message("assistant", "Fine.")],
        "rejected": [HI, NO, message("user", "And now?"), message("assistant", "Go.")],
    },
    "ranking_texts": {"prompt": "Name a colour.", "responses": ["Blue.", "Green.", "A colour."], "ranking": [0, 1, 2]},
    "ranking_messages": {"prompt": [HI], "responses": [[HELLO], [NO]], "ranking": [1, 0]},
    "response_only": {"prompt": "How was the trip?", "response": "Lovely."},
    "messages_only": {"messages": [message("system", "Be kind."), HI, HELLO]},
    "empty_response": {"prompt": "Say nothing.", "chosen": "", "rejected": "Something."},
    "long_prompt_truncated": {"prompt": LONG, "chosen": "Short answer.", "rejected": "Another short one."},
    "long_response_truncated": {"prompt": "Talk.", "chosen": LONG, "rejected": "Ok."},
}


@pytest.fixture(scope="module")
def recipes(minilm_tokenizer, smollm2_tokenizer):
    """name -> (Hugging Face tokenizer, recipe) as rm-train builds them, at a roomy and a truncating length."""
    return {
        "minilm_pair_64": (minilm_tokenizer, default_recipe(minilm_tokenizer, "cls", 64)),
        "minilm_pair_24": (minilm_tokenizer, default_recipe(minilm_tokenizer, "cls", 24)),
        "smollm2_chat_96": (smollm2_tokenizer, default_recipe(smollm2_tokenizer, "last_attended", 96)),
        "smollm2_chat_40": (smollm2_tokenizer, default_recipe(smollm2_tokenizer, "last_attended", 40)),
        "smollm2_concat_48": (smollm2_tokenizer, default_recipe(smollm2_tokenizer, "last_attended", 48, "concat")),
    }


def training_ids(tokenizer, recipe: InputRecipe) -> dict[str, list[list[int]]]:
    """What rm-train scores: the records parsed and tokenized by training's own path."""
    groups = [parse_record(record, f"golden:{form}") for form, record in FORMS.items()]
    tokenized = tokenize_groups(groups, sample_encoder(tokenizer, recipe))
    return {form: [list(ids) for ids in t.ids] for form, t in zip(FORMS, tokenized)}


def served_ids(tokenizer, recipe: InputRecipe, tmp_path: Path) -> dict[str, list[list[int]]]:
    """What rm-serve scores: rm-client's wire samples, through bytes, read back by the server and encoded with
    the bundle's tokenizer.json and the recipe as bundle.json stores it."""
    tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    encoder = SampleEncoder(
        Tokenizer.from_file(str(tmp_path / "tokenizer.json")),
        InputRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))),
    )
    out = {}
    for form, record in FORMS.items():
        wire = [pb.Sample.FromString(sample_to_pb(s).SerializeToString()) for s in parse_record(record, form).samples]
        out[form] = [encoder.encode(sample_from_pb(i, s)).ids for i, s in enumerate(wire)]
    return out


def test_served_ids_equal_training_ids_and_the_golden_ids(recipes, tmp_path):
    computed = {}
    for name, (tokenizer, recipe) in recipes.items():
        trained, served = training_ids(tokenizer, recipe), served_ids(tokenizer, recipe, tmp_path)
        for form in FORMS:
            assert served[form] == trained[form], f"{name}/{form}: the server would score other ids than training"
        computed[name] = trained
    if os.environ.get("RM_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(computed, indent=1, ensure_ascii=False) + "\n")
        pytest.skip(f"rewrote {GOLDEN.name}")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(computed)
    for name in computed:
        for form in FORMS:
            assert computed[name][form] == golden[name][form], f"{name}/{form}: ids differ from the golden ids"


def test_the_golden_forms_exercise_truncation_and_every_template(recipes):
    """The golden set means something only if it covers truncated samples and the three templates."""
    assert {recipe.template for _, recipe in recipes.values()} == {"pair", "chat", "concat"}
    for name in ("minilm_pair_24", "smollm2_chat_40"):
        tokenizer, recipe = recipes[name]
        encoder = sample_encoder(tokenizer, recipe)
        truncated = {
            form for form, r in FORMS.items() if any(encoder.encode(s).truncated for s in parse_record(r, form).samples)
        }
        assert {"long_prompt_truncated", "long_response_truncated"} <= truncated
