"""Preference and scoring data: the one parser of the data formats, with errors naming file, line and field.

Formats, detected per record (`rm-train`, `rm-eval`, `rm-export` and `rm-client score` all read them here):
- a preference pair: `chosen` / `rejected` as texts with `prompt` (or `query`), TRL style, optional
  `margin`; or as message lists with an explicit `prompt` (messages or text) or with none (conversations
  that carry their prompt);
- a K-way ranking: `{"prompt", "responses": [...], "ranking": [...]}` where `ranking` lists the indices of
  `responses` from best to worst; it becomes all C(K, 2) pairs of that prompt (InstructGPT). Without
  `ranking` the responses are only scored;
- one response, only scored: `{"prompt" | "query": str, "response": str}` or `{"messages": [...]}`;
- a process-reward row (TRL's stepwise format, `load_step_solutions`): `{"prompt": str, "completions":
  [step, ...], "labels": [bool, ...]}`, one label per step (True: the step is correct). A file holds either
  these rows or the records above, never both.
A response given as messages follows the prompt, and the whole conversation is split by the wire's rule
(`Sample.from_messages`: the trailing assistant messages are the response), so a sample read here is
encoded exactly as the server encodes it. Files: JSONL, or a `datasets` Dataset saved with `save_to_disk`
(a directory; needs `pip install datasets`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rm_contract.recipe import ROLES, Message, RecipeError, Sample


class DataError(ValueError):
    """Bad input data; the message names the file, the line (or row) and the field."""


@dataclass(frozen=True)
class PreferencePair:
    chosen: int
    """Index into the group's samples of the preferred response."""
    rejected: int
    margin: float = 0.0


@dataclass(frozen=True)
class PreferenceGroup:
    """One record: the responses it holds (as samples) and the preferences among them (none when the record
    is only to be scored)."""

    kind: Literal["pair", "ranking", "response"]
    samples: tuple[Sample, ...]
    pairs: tuple[PreferencePair, ...] = ()


def load_groups(path: str | Path, preferences: bool = True) -> list[PreferenceGroup]:
    """Read a JSONL file or a saved `datasets` directory. With `preferences` (training, evaluation), every
    record must state a preference."""
    groups = []
    for where, record in read_records(path):
        group = parse_record(record, where)
        if preferences and not group.pairs:
            raise DataError(f"{where}: no preference to learn from; {_NEEDS_PREFERENCE[group.kind]}")
        groups.append(group)
    if not groups:
        raise DataError(f"{Path(path)}: no records")
    return groups


_NEEDS_PREFERENCE = {
    "ranking": "missing field 'ranking' (the indices of 'responses', best first)",
    "response": "expected 'chosen' and 'rejected', or 'responses' with a 'ranking'",
}


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """(`file:line` or `dir:row N`, the record as parsed JSON) for every record of a JSONL file or a saved
    `datasets` directory, not yet checked against any format."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        yield from _dataset_rows(path)
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            yield f"{path}:{line_no}", record


def _dataset_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        from datasets import Dataset, DatasetDict, load_from_disk
    except ImportError:
        raise DataError(f"{path}: reading a saved datasets directory needs `pip install datasets`") from None
    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not JSONL, nor a dataset saved with save_to_disk ({e})") from e
    if isinstance(dataset, DatasetDict):
        raise DataError(f"{path}: a DatasetDict with splits {sorted(dataset)}; pass {path}/<split>")
    assert isinstance(dataset, Dataset)
    for i, record in enumerate(dataset):
        yield f"{path}:row {i + 1}", record


def parse_record(record: object, where: str) -> PreferenceGroup:
    """One record of any supported format; `where` (file and line) starts every error message."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if is_step_record(record):
        raise DataError(
            f"{where}: a process-reward row ({_STEP_FIELDS}) among preference or scoring records; {_ONE_KIND}"
        )
    pair = _present(record, "chosen") or _present(record, "rejected")
    ranking = _present(record, "responses") or _present(record, "ranking")
    if pair and ranking:
        raise DataError(f"{where}: both 'chosen'/'rejected' and 'responses'/'ranking'; a record is one or the other")
    if pair:
        return _pair(record, where)
    if ranking:
        return _ranking(record, where)
    if _present(record, "response"):
        return PreferenceGroup("response", (_sample(record, record["response"], where, "response"),))
    if _present(record, "messages"):
        return PreferenceGroup("response", (_conversation([], record["messages"], where, "messages"),))
    raise DataError(f"{where}: no field to score; expected 'chosen'/'rejected', 'responses', 'response' or 'messages'")


def _present(record: dict, name: str) -> bool:
    """A field is there when it holds a value (dataset rows have every column, None where unset)."""
    return record.get(name) is not None


def _pair(record: dict, where: str) -> PreferenceGroup:
    for name in ("chosen", "rejected"):
        if not _present(record, name):
            raise DataError(f"{where}: missing field '{name}'")
    samples = tuple(_sample(record, record[name], where, name) for name in ("chosen", "rejected"))
    return PreferenceGroup("pair", samples, (PreferencePair(0, 1, _margin(record, where)),))


def _ranking(record: dict, where: str) -> PreferenceGroup:
    responses, ranking = record.get("responses"), record.get("ranking")
    if not isinstance(responses, list) or not responses:
        raise DataError(f"{where}: field 'responses' must be a non-empty list of responses")
    samples = tuple(_sample(record, r, where, f"responses[{i}]") for i, r in enumerate(responses))
    if ranking is None:  # responses to score, no preference among them
        return PreferenceGroup("ranking", samples)
    if len(responses) < 2:
        raise DataError(f"{where}: a 'ranking' needs at least 2 responses in 'responses'")
    valid = isinstance(ranking, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
    if not valid or sorted(ranking) != list(range(len(responses))):
        raise DataError(
            f"{where}: field 'ranking' must list every index of 'responses' (0..{len(responses) - 1}) once, best first"
        )
    pairs = tuple(PreferencePair(better, worse) for better, worse in itertools.combinations(ranking, 2))
    return PreferenceGroup("ranking", samples, pairs)


def _sample(record: dict, value: object, where: str, field: str) -> Sample:
    """A text response with the record's text prompt, or messages after the record's prompt (or none)."""
    if isinstance(value, str):
        return Sample.from_text(_prompt_text(record, where, field), value)
    if isinstance(value, list):
        prompt = record.get("prompt", record.get("query"))
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif prompt is not None and not isinstance(prompt, list):
            raise DataError(f"{where}: field 'prompt' must be a string or a list of messages")
        return _conversation(prompt or [], value, where, field)
    raise DataError(f"{where}: field '{field}' must be a string or a list of messages, got {type(value).__name__}")


def _prompt_text(record: dict, where: str, field: str) -> str:
    for name in ("prompt", "query"):
        if _present(record, name):
            value = record[name]
            if not isinstance(value, str):
                raise DataError(f"{where}: field '{field}' is text, so field '{name}' must be text too")
            return value
    raise DataError(f"{where}: missing field 'prompt' (or 'query')")


def _conversation(prompt: list, response: object, where: str, field: str) -> Sample:
    if not isinstance(response, list) or not response:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    messages = [*_messages(prompt, where, "prompt"), *_messages(response, where, field)]
    try:
        return Sample.from_messages(messages)
    except RecipeError as e:
        raise DataError(f"{where}: field '{field}': {e}") from None


def _messages(value: list, where: str, field: str) -> list[Message]:
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: field '{field}[{i}]' must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{field}[{i}].role' is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(
                f"{where}: field '{field}[{i}].content' must be a string, got {type(m['content']).__name__}"
            )
        messages.append(Message(m["role"], m["content"]))
    return messages


def _margin(record: dict, where: str) -> float:
    margin = record.get("margin")
    if margin is None:
        return 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(f"{where}: field 'margin' must be a finite number, got {margin!r}")
    return float(margin)


@dataclass(frozen=True)
class StepSolution:
    """A process-reward row: a solution's steps, each labelled correct (True) or not, as TRL's PRMTrainer reads."""

    prompt: str
    steps: tuple[str, ...]
    labels: tuple[bool, ...]
    where: str = field(default="", compare=False)
    """`file:line` of the record, for messages about it later (a row the input recipe refuses)."""


_STEP_FIELDS = "'prompt', 'completions', 'labels'"
_ONE_KIND = "a file holds one kind of record"


def is_step_record(record: object) -> bool:
    """Process-reward rows are told apart by their fields, whatever else the row holds."""
    return isinstance(record, dict) and (_present(record, "completions") or _present(record, "labels"))


def holds_steps(path: str | Path) -> bool:
    """Whether a file's first record is a process-reward row (its loader then requires every record to be)."""
    with contextlib.closing(read_records(path)) as records:
        for _, record in records:
            return is_step_record(record)
    raise DataError(f"{Path(path)}: no records")


def load_step_solutions(path: str | Path) -> list[StepSolution]:
    """Every record of a JSONL file or a saved `datasets` directory as a labelled solution."""
    solutions = [parse_step_record(record, where) for where, record in read_records(path)]
    if not solutions:
        raise DataError(f"{Path(path)}: no records")
    return solutions


def parse_step_record(record: object, where: str) -> StepSolution:
    if not is_step_record(record):
        raise DataError(
            f"{where}: a preference or scoring record among process-reward rows ({_STEP_FIELDS}); {_ONE_KIND}"
        )
    assert isinstance(record, dict)
    for name in ("chosen", "rejected", "responses", "response", "messages"):
        if _present(record, name):
            raise DataError(
                f"{where}: field '{name}' in a process-reward row ({_STEP_FIELDS}); a record is one kind or the other"
            )
    for name in ("prompt", "completions", "labels"):
        if not _present(record, name):
            raise DataError(f"{where}: missing field '{name}' (a process-reward row has {_STEP_FIELDS})")
    prompt, steps, labels = record["prompt"], record["completions"], record["labels"]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__}")
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise DataError(f"{where}: field 'completions' must be a list of steps (strings)")
    if not steps:
        raise DataError(f"{where}: field 'completions' is empty; a solution needs at least one step")
    if not isinstance(labels, list):
        raise DataError(f"{where}: field 'labels' must be a list of true/false, one per step")
    for i, label in enumerate(labels):
        if not isinstance(label, bool):  # 0/1 too: TRL's rows hold booleans, and a typo should not pass as one
            raise DataError(f"{where}: field 'labels[{i}]' is {label!r}; a step's label is true or false")
    if len(labels) != len(steps):
        raise DataError(
            f"{where}: {len(labels)} labels for {len(steps)} steps in 'completions'; give one label per step"
        )
    return StepSolution(prompt, tuple(steps), tuple(labels), where)
