"""JSONL records of the training data formats -> samples to score, and the rewards written back onto them.

Per record, detected by its fields:
- one response: `{"prompt" | "query": str, "response": str}` or `{"messages": [...]}` -> adds `reward`;
- a preference pair: `chosen` / `rejected` as texts (with `prompt` or `query`) or as message lists (with an
  explicit `prompt`, or sharing it implicitly) -> adds `reward_chosen`, `reward_rejected`;
- a ranking: `{"prompt", "responses": [...]}` (`ranking` optional) -> adds `rewards`, one per response.
Every other field of the record is kept as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rm_client.pb import reward_pb2 as pb
from rm_client.samples import conversation_sample


class RecordError(ValueError):
    """A record that cannot be scored; the message names the file, line and field."""


@dataclass
class ScorableRecord:
    record: dict
    samples: list[pb.Sample]
    attach: Callable[[dict, list[float]], None]
    """Writes this record's rewards (in the order of `samples`) onto the record."""
    is_pair: bool = False


def jsonl(path: str | Path, error: type[ValueError] = RecordError) -> Iterator[tuple[str, object]]:
    """(`file:line`, parsed record) for every non-blank line; `error` names the line of invalid JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not a file (JSONL expected)")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{number}: not valid JSON ({e.msg})") from None


def read_records(path: str | Path) -> list[ScorableRecord]:
    out = [parse_record(record, where) for where, record in jsonl(path)]
    if not out:
        raise RecordError(f"{path}: no records")
    return out


def parse_record(record: object, where: str) -> ScorableRecord:
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object")
    if "chosen" in record or "rejected" in record:
        chosen, rejected = (_response_sample(record, side, where) for side in ("chosen", "rejected"))
        return ScorableRecord(record, [chosen, rejected], _attach("reward_chosen", "reward_rejected"), is_pair=True)
    if "responses" in record:
        responses = record["responses"]
        if not isinstance(responses, list) or not responses:
            raise RecordError(f"{where}: 'responses' must be a non-empty list")
        samples = [_text_or_messages(record, r, where, f"responses[{i}]") for i, r in enumerate(responses)]
        return ScorableRecord(record, samples, lambda rec, rewards: rec.__setitem__("rewards", rewards))
    if "response" in record:
        return ScorableRecord(record, [_response_sample(record, "response", where)], _attach("reward"))
    if "messages" in record:
        return ScorableRecord(record, [_messages_sample(record["messages"], where, "messages")], _attach("reward"))
    raise RecordError(
        f"{where}: no field to score; expected 'response', 'messages', 'chosen'/'rejected' or 'responses'"
    )


def _attach(*keys: str) -> Callable[[dict, list[float]], None]:
    def attach(record: dict, rewards: list[float]) -> None:
        record.update(zip(keys, rewards))

    return attach


def _response_sample(record: dict, field: str, where: str) -> pb.Sample:
    if field not in record:
        raise RecordError(f"{where}: missing '{field}'")
    return _text_or_messages(record, record[field], where, field)


def _text_or_messages(record: dict, value: object, where: str, field: str) -> pb.Sample:
    """A text response with the record's text prompt, or messages with an explicit prompt or none (implicit)."""
    prompt = record.get("prompt", record.get("query"))
    if isinstance(value, str):
        if not isinstance(prompt, str):
            raise RecordError(f"{where}: '{field}' is text, so 'prompt' (or 'query') must be text")
        if not value:
            raise RecordError(f"{where}: '{field}' is empty")
        return pb.Sample(text=pb.TextPair(prompt=prompt, response=value))
    if isinstance(value, list):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        return _messages_sample([*(prompt or []), *value], where, field)
    raise RecordError(f"{where}: '{field}' must be a string or a list of messages")


def _messages_sample(messages: object, where: str, field: str) -> pb.Sample:
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: '{field}' must be a non-empty list of messages")
    try:
        return conversation_sample(messages)
    except ValueError as e:
        raise RecordError(f"{where}: '{field}': {e}") from None
