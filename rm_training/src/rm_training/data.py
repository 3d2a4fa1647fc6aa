"""Preference data: read any supported format into preference groups, with errors naming file, line and field.

Formats, detected per record:
- pairs of texts: `{"prompt" | "query": str, "chosen": str, "rejected": str, "margin"?: float}` (TRL style);
- conversations: `chosen` / `rejected` as lists of `{"role", "content"}` messages, with an explicit
  `prompt` (messages or text) or an implicit one (the messages both share);
- K-way rankings: `{"prompt", "responses": [...], "ranking": [...]}` where `ranking` lists the indices of
  `responses` from best to worst; it becomes all C(K, 2) pairs of that prompt (InstructGPT).
Files: JSONL, or a Hugging Face `datasets` Dataset saved with `save_to_disk` (a directory).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rm_server.recipe import ROLES, Message, Sample


class DataError(ValueError):
    """Bad input data; the message names the file, the line (or row) and the field."""


@dataclass(frozen=True)
class PreferencePair:
    chosen: int
    """Index into the group's responses of the preferred response."""
    rejected: int
    margin: float = 0.0


@dataclass(frozen=True)
class PreferenceGroup:
    """All responses to one prompt and the preferences among them; one pair for pairwise data."""

    prompt: tuple[Message, ...]
    responses: tuple[tuple[Message, ...], ...]
    pairs: tuple[PreferencePair, ...]

    def samples(self) -> list[Sample]:
        return [Sample(self.prompt, response) for response in self.responses]


def load_groups(path: str | Path) -> list[PreferenceGroup]:
    """Read a JSONL file or a saved `datasets` directory into preference groups."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    groups = [parse_record(record, f"{path}:{where}") for where, record in _records(path)]
    if not groups:
        raise DataError(f"{path}: no records")
    return groups


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    if path.is_dir():
        from datasets import Dataset, DatasetDict, load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from e
        if isinstance(dataset, DatasetDict):
            raise DataError(f"{path}: a DatasetDict with splits {sorted(dataset)}; pass {path}/<split>")
        assert isinstance(dataset, Dataset)
        for i, record in enumerate(dataset):
            yield f"row {i + 1}", record
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:line {line_no}: invalid JSON ({e.msg})") from None
            yield f"line {line_no}", record


def parse_record(record: object, where: str) -> PreferenceGroup:
    """One record of any supported format as a preference group."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "responses" in record or "ranking" in record:
        return _parse_ranking(record, where)
    for name in ("chosen", "rejected"):
        if name not in record:
            raise DataError(f"{where}: missing field '{name}'")
    margin = _margin(record, where)
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, list) or isinstance(rejected, list):
        return _parse_conversations(record, where, margin)
    prompt = _prompt_text(record, where)
    return PreferenceGroup(
        prompt=(Message("user", prompt),),
        responses=(
            (Message("assistant", _text(chosen, where, "chosen")),),
            (Message("assistant", _text(rejected, where, "rejected")),),
        ),
        pairs=(PreferencePair(0, 1, margin),),
    )


def _parse_conversations(record: dict, where: str, margin: float) -> PreferenceGroup:
    chosen = _messages(record["chosen"], where, "chosen")
    rejected = _messages(record["rejected"], where, "rejected")
    if "prompt" in record:
        prompt_value = record["prompt"]
        prompt = (
            _messages(prompt_value, where, "prompt")
            if isinstance(prompt_value, list)
            else (Message("user", _text(prompt_value, where, "prompt")),)
        )
    else:  # implicit prompt: the messages both conversations start with
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    return PreferenceGroup(prompt=prompt, responses=(chosen, rejected), pairs=(PreferencePair(0, 1, margin),))


def _parse_ranking(record: dict, where: str) -> PreferenceGroup:
    for name in ("responses", "ranking"):
        if name not in record:
            raise DataError(f"{where}: missing field '{name}'")
    prompt_text = _prompt_text(record, where)
    responses, ranking = record["responses"], record["ranking"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{where}: field 'responses' must be a list of at least 2 responses")
    valid = isinstance(ranking, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
    if not valid or sorted(ranking) != list(range(len(responses))):
        raise DataError(
            f"{where}: field 'ranking' must list every index of 'responses' (0..{len(responses) - 1}) once, best first"
        )
    parsed = tuple(
        _messages(r, where, f"responses[{i}]")
        if isinstance(r, list)
        else (Message("assistant", _text(r, where, f"responses[{i}]")),)
        for i, r in enumerate(responses)
    )
    pairs = tuple(PreferencePair(better, worse) for better, worse in itertools.combinations(ranking, 2))
    return PreferenceGroup(prompt=(Message("user", prompt_text),), responses=parsed, pairs=pairs)


def _prompt_text(record: dict, where: str) -> str:
    if "prompt" in record:
        return _text(record["prompt"], where, "prompt")
    if "query" in record:
        return _text(record["query"], where, "query")
    raise DataError(f"{where}: missing field 'prompt' (or 'query')")


def _text(value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _margin(record: dict, where: str) -> float:
    margin = record.get("margin", 0.0)
    if margin is None:
        return 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(f"{where}: field 'margin' must be a finite number, got {margin!r}")
    return float(margin)


def _messages(value: object, where: str, field: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: field '{field}[{i}]' must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{field}[{i}].role' is {m['role']!r}; expected one of {', '.join(ROLES)}")
        messages.append(Message(m["role"], _text(m["content"], where, f"{field}[{i}].content")))
    return tuple(messages)


def count_pairs(groups: list[PreferenceGroup]) -> int:
    return sum(len(g.pairs) for g in groups)
