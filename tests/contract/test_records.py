"""The one parser of the data formats: detection, K-way expansion, and errors that name file, line and field."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from rm_contract.recipe import Message, Sample
from rm_contract.records import DataError, PreferencePair, load_groups, parse_record
from tests.conftest import write_jsonl


def test_prompt_chosen_rejected_becomes_one_pair():
    group = parse_record({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "f:1")
    assert group.kind == "pair"
    assert group.samples == (Sample.from_text("Q?", "good"), Sample.from_text("Q?", "bad"))
    assert group.pairs == (PreferencePair(0, 1, 0.0),)


def test_query_is_accepted_as_prompt_and_margin_is_read():
    group = parse_record({"query": "Q?", "chosen": "a", "rejected": "b", "margin": 1.5}, "f:1")
    assert group.samples[0].prompt[0].content == "Q?"
    assert group.pairs[0].margin == 1.5


def test_conversations_with_implicit_prompt_split_before_the_final_assistant_messages():
    user = {"role": "user", "content": "Hi"}
    record = {
        "chosen": [user, {"role": "assistant", "content": "Hello!"}],
        "rejected": [user, {"role": "assistant", "content": "Go away."}],
    }
    group = parse_record(record, "f:1")
    assert [s.prompt for s in group.samples] == [(Message("user", "Hi"),)] * 2
    assert [s.response for s in group.samples] == [
        (Message("assistant", "Hello!"),),
        (Message("assistant", "Go away."),),
    ]


def test_conversations_with_explicit_prompt_messages():
    record = {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    group = parse_record(record, "f:1")
    assert [m.role for m in group.samples[0].prompt] == ["system", "user"]
    assert group.samples[1].response == (Message("assistant", "No."),)


def test_k_way_ranking_expands_to_all_pairs_best_first():
    record = {"prompt": "Q", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1]}
    group = parse_record(record, "f:1")
    assert len(group.samples) == 4
    assert len(group.pairs) == 6  # C(4, 2)
    assert {(p.chosen, p.rejected) for p in group.pairs} == {(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "Q", "chosen": "a"}, ":3: missing field 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, ":3: missing field 'prompt' (or 'query')"),
        ({"prompt": "Q", "chosen": 5, "rejected": "b"}, ":3: field 'chosen' must be a string"),
        (
            {"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "x"},
            ":3: field 'margin' must be a finite number",
        ),
        (
            {"chosen": [{"role": "robot", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
            "field 'chosen[0].role' is 'robot'",
        ),
        (
            {"chosen": [{"content": "x"}], "rejected": []},
            "field 'chosen[0]' must be an object with 'role' and 'content'",
        ),
        ({"prompt": "Q", "responses": ["a", "b"]}, ":3: no preference to learn from; missing field 'ranking'"),
        ({"prompt": "Q", "response": "a"}, ":3: no preference to learn from; expected 'chosen' and 'rejected'"),
        ({"prompt": ["x"], "chosen": "a", "rejected": "b"}, ":3: field 'chosen' is text, so field 'prompt' must be"),
        ({"prompt": "Q"}, ":3: no field to score"),
        ({"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 0]}, "field 'ranking' must list every index"),
        ({"prompt": "Q", "responses": ["a"], "ranking": [0]}, "a 'ranking' needs at least 2 responses"),
        ({"prompt": "Q", "responses": []}, ":3: field 'responses' must be a non-empty list"),
        (
            {"prompt": "Q", "chosen": "a", "rejected": "b", "responses": ["a", "b"], "ranking": [0, 1]},
            ":3: both 'chosen'/'rejected' and 'responses'/'ranking'",
        ),
        ([1, 2], ":3: expected a JSON object"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, record])
    with pytest.raises(DataError) as error:
        load_groups(path)
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid JSON"):
        load_groups(path)


def test_empty_and_missing_files_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_groups(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_groups(tmp_path / "missing.jsonl")


def test_saved_datasets_directory_is_read(tmp_path):
    rows = {"prompt": ["Q1", "Q2"], "chosen": ["a", "c"], "rejected": ["b", "d"]}
    Dataset.from_dict(rows).save_to_disk(tmp_path / "ds")
    groups = load_groups(tmp_path / "ds")
    assert [g.samples[0].response[0].content for g in groups] == ["a", "c"]


def test_dataset_rows_are_named_in_errors(tmp_path):
    Dataset.from_dict({"prompt": ["Q1", "Q2"], "chosen": ["a", "c"], "rejected": ["b", None]}).save_to_disk(
        tmp_path / "ds"
    )
    with pytest.raises(DataError, match=r"ds:row 2: missing field 'rejected'"):
        load_groups(tmp_path / "ds")


def test_dataset_dict_asks_for_a_split(tmp_path):
    split = Dataset.from_dict({"prompt": ["Q"], "chosen": ["a"], "rejected": ["b"]})
    DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"splits \['test', 'train'\]"):
        load_groups(tmp_path / "dd")
    assert len(load_groups(tmp_path / "dd" / "train")) == 1


def test_records_to_score_only_are_read_when_no_preference_is_needed(tmp_path):
    rows = [
        {"prompt": "Q", "response": "a"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"prompt": "Q", "responses": ["a", "b", "c"]},
        {"prompt": "Q", "responses": ["only one"]},
    ]
    groups = load_groups(write_jsonl(tmp_path / "score.jsonl", rows), preferences=False)
    assert [(g.kind, len(g.samples), g.pairs) for g in groups] == [
        ("response", 1, ()),
        ("response", 1, ()),
        ("ranking", 3, ()),
        ("ranking", 1, ()),
    ]
    assert groups[1].samples[0] == Sample.from_text("Hi", "Hello!")


def test_message_responses_split_by_the_wire_rule_even_when_conversations_diverge_early():
    """The server splits a Conversation before its trailing assistant messages; data must split alike, or a
    pair/concat recipe would train on other ids than it serves."""
    user, later = {"role": "user", "content": "Hi"}, {"role": "user", "content": "And now?"}
    chosen = [user, {"role": "assistant", "content": "Hello!"}, later, {"role": "assistant", "content": "Fine."}]
    rejected = [user, {"role": "assistant", "content": "Go."}, later, {"role": "assistant", "content": "No."}]
    group = parse_record({"chosen": chosen, "rejected": rejected}, "f:1")
    as_served = [Sample.from_messages([Message(m["role"], m["content"]) for m in c]) for c in (chosen, rejected)]
    assert list(group.samples) == as_served
    assert group.samples[0].response == (Message("assistant", "Fine."),)
