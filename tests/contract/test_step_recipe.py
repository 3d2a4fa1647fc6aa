"""Process reward models in the contract: how steps become ids and where each step's score is read."""

from __future__ import annotations

import pytest

from rm_contract.packing import ScoringRule, StepIds, pack_batch
from rm_contract.recipe import RecipeError, Sample
from rm_training.model import default_recipe, sample_encoder
from rm_training.step_model import step_recipe


@pytest.fixture(scope="module")
def decoder_steps(smollm2_tokenizer):
    return sample_encoder(smollm2_tokenizer, step_recipe(smollm2_tokenizer, True, 64, None))


@pytest.fixture(scope="module")
def encoder_steps(minilm_tokenizer):
    return sample_encoder(minilm_tokenizer, step_recipe(minilm_tokenizer, False, 64, None))


def test_each_step_is_read_at_its_step_token(decoder_steps, encoder_steps, smollm2_tokenizer, minilm_tokenizer):
    for encoder, tokenizer, token in (
        (decoder_steps, smollm2_tokenizer, "\n"),
        (encoder_steps, minilm_tokenizer, "[SEP]"),
    ):
        steps = ["2 + 3 = 5", "5 * 4 = 20", "The answer is 20."]
        encoded = encoder.encode(Sample.from_steps("Compute (2 + 3) * 4.", steps))
        assert len(encoded.steps) == 3
        assert [tokenizer.decode([encoded.ids[k]]) for k in encoded.steps] == [token] * 3
        # each step's text sits between the previous step token and its own
        texts = [tokenizer.decode(encoded.ids[a + 1 : b]).strip() for a, b in zip(encoded.steps, encoded.steps[1:])]
        assert [t.lower() for t in texts] == [s.lower() for s in steps[1:]]
        # the same solution sent as text holding the step tokens encodes to the same ids
        as_text = encoder.encode(Sample.from_text("Compute (2 + 3) * 4.", "".join(s + token for s in steps)))
        assert (as_text.ids, as_text.steps) == (encoded.ids, encoded.steps)


def test_only_the_prompt_is_cut_and_steps_that_do_not_fit_are_refused(decoder_steps):
    encoded = decoder_steps.encode(Sample.from_steps("a long prompt " * 40, ["x = 1", "y = 2"]))
    assert encoded.truncated and len(encoded.ids) == 64 and encoded.steps[-1] == 63
    with pytest.raises(RecipeError, match="the steps take .* tokens; at most 63 fit"):  # 64 less the BOS
        decoder_steps.encode(Sample.from_steps("p", [" ".join(["word"] * 80)]))


def test_the_ids_are_those_trls_prm_trainer_trains_on(smollm2_tokenizer, minilm_tokenizer):
    """TRL's PRMTrainer.tokenize_row (trl/experimental/prm/prm_trainer.py, TRL <= 1.13): BOS where the tokenizer
    has one, the prompt and each step tokenized alone (no special tokens), each step followed by the
    separator's ids; written here from that code."""
    prompt, steps = "Compute (2 + 3) * 4.", ["2 + 3 = 5 ", "5 * 4 = 20", "The answer is 20."]
    for tokenizer, decoder, separator in ((smollm2_tokenizer, True, "\n"), (minilm_tokenizer, False, "[SEP]")):
        trl = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            trl = [tokenizer.bos_token_id] + trl
        for step in steps:
            trl += tokenizer(step, add_special_tokens=False)["input_ids"] + tokenizer.encode(
                separator, add_special_tokens=False
            )
        encoded = sample_encoder(tokenizer, step_recipe(tokenizer, decoder, 64, None)).encode(
            Sample.from_steps(prompt, steps)
        )
        assert encoded.ids == trl
        assert [encoded.ids[k] for k in encoded.steps] == [trl[k] for k in encoded.steps]
        assert len(encoded.steps) == 3 and encoded.steps[-1] == len(trl) - 1


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        (Sample.from_steps("p", ["a\nb"]), "step 0 holds the step token"),
        (Sample.from_steps("p", []), "no steps"),
        (Sample.from_text("p", ""), "the response is empty"),
    ],
)
def test_solutions_whose_steps_cannot_be_read_are_refused(decoder_steps, sample, reason):
    with pytest.raises(RecipeError, match=reason):
        decoder_steps.encode(sample)


def test_text_after_the_last_step_token_is_a_last_step(decoder_steps):
    """A policy's text rarely ends with the step token: its last line is a step too."""
    as_text = decoder_steps.encode(Sample.from_text("p", "a = 1\nb = 2"))
    assert as_text == decoder_steps.encode(Sample.from_steps("p", ["a = 1", "b = 2"]))
    assert decoder_steps.encode(Sample.from_text("p", "a = 1\nb = 2\n")) == as_text


def test_a_sequence_recipe_refuses_steps(smollm2_tokenizer):
    encoder = sample_encoder(smollm2_tokenizer, default_recipe(smollm2_tokenizer, "last_attended", 64, "concat"))
    with pytest.raises(RecipeError, match="needs a process reward model"):
        encoder.encode(Sample.from_steps("p", ["a"]))


def test_a_step_token_that_is_not_one_token_is_refused(minilm_tokenizer):
    with pytest.raises(RecipeError, match="is not one token of this tokenizer"):
        sample_encoder(minilm_tokenizer, step_recipe(minilm_tokenizer, False, 64, "\n"))  # BERT drops whitespace


def test_packed_steps_are_read_where_they_are_even_inside_a_shared_prefix(decoder_steps):
    """Two solutions sharing their first step compute it once: its score is read in the shared prefix."""
    prompt = "Compute (5 + 6) * 3, one step per line, and then state the answer plainly."
    solutions = [(prompt, ["5 + 6 = 11", "11 * 3 = 33"]), (prompt, ["5 + 6 = 11", "11 * 3 = 34"]), ("Other.", ["12"])]
    encoded = [decoder_steps.encode(Sample.from_steps(p, s)) for p, s in solutions]
    samples = [StepIds(e.ids, e.steps) for e in encoded]
    for share in (False, True):
        batch = pack_batch(samples, ScoringRule("last_attended", 0), width=200, share_prefixes=share)
        assert batch.counts.tolist() == [2, 2, 1]
        read = list(zip(batch.input_ids.flat[batch.score_positions], batch.position_ids.flat[batch.score_positions]))
        expected = [(s[k], k) for s in samples for k in s.steps]
        assert read == expected
    shared = pack_batch(samples, ScoringRule("last_attended", 0), width=200, share_prefixes=True)
    assert shared.score_positions[0] == shared.score_positions[2]  # the shared first step, computed once
