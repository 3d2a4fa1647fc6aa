"""Build the demo process-reward data: arithmetic solved step by step, labelled by recomputing it.

    python -m rm_training.demo_prm --output rm_training/data/demo_prm

A problem is two or three operations on small numbers, nested to the left ("Compute ((7 + 5) * 3) - 4."),
solved one operation per step ("7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32") and closed by "The answer is
32.". A share of the solutions (`error_rate`) carry one slip at a random step, of one of three kinds: a
wrong result (off by a little, as a carry slip), a misread operand (the previous result, or the problem's
number, copied wrong, then computed right) or, in the last step, a misreported answer. The steps after a
slip carry on from the wrong value, as a solver would.

Labels are Math-Shepherd's: a step is correct iff it and every step before it are right. Here that is the
same as "the value the step states is the true value of that part of the expression": a wrong running
value never turns right again, since every operation keeps its error (+ and - shift it, * by 2..9 scales
it). So after the first wrong step every label is false, even where that step's own arithmetic holds.
Train and test are split by problem (no test prompt is in train); the same seed gives the same files.
"""

from __future__ import annotations

import itertools
import json
import operator
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from rm_contract.config_cli import ConfigError, option, parse_config

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
SLIPS = ("result", "operand", "answer")


@dataclass(frozen=True)
class DemoConfig:
    output: str = option("rm_training/data/demo_prm", "Directory for train.jsonl and test.jsonl.")
    train: int = option(2000, "Training rows.")
    test: int = option(300, "Held-out rows (problems not in train).")
    error_rate: float = option(0.5, "Share of solutions with one wrong step.")
    seed: int = 0

    def validate(self) -> None:
        if self.train < 1 or self.test < 1:
            raise ConfigError("--train and --test must be at least 1")
        if not 0 <= self.error_rate <= 1:
            raise ConfigError("--error-rate must be between 0 and 1")


@dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]
    operators: tuple[str, ...]
    """operators[k] joins the running value and numbers[k + 1]."""

    @property
    def prompt(self) -> str:
        expression = str(self.numbers[0])
        for k, op in enumerate(self.operators):
            expression = f"{expression} {op} {self.numbers[k + 1]}"
            if k < len(self.operators) - 1:
                expression = f"({expression})"
        return f"Compute {expression}."

    def values(self) -> list[int]:
        """The true running value after each operation."""
        value, values = self.numbers[0], []
        for op, number in zip(self.operators, self.numbers[1:]):
            value = OPERATIONS[op](value, number)
            values.append(value)
        return values


MAX_VALUE = 20
"""Running values stay within 0..MAX_VALUE: few enough arithmetic facts for a small model to learn in minutes."""


def random_problem(rng: random.Random) -> Problem:
    """Two or three operations on numbers 2..9, every running value within 0..MAX_VALUE."""
    numbers, operators = [rng.randint(2, 9)], []
    value = numbers[0]
    for _ in range(rng.choice((2, 3))):
        number = rng.randint(2, 9)
        op = rng.choice([o for o, f in OPERATIONS.items() if 0 <= f(value, number) <= MAX_VALUE])
        numbers.append(number)
        operators.append(op)
        value = OPERATIONS[op](value, number)
    return Problem(tuple(numbers), tuple(operators))


def solve(problem: Problem, rng: random.Random, slip: str | None) -> tuple[list[str], list[bool]]:
    """The steps of a solution with at most one slip of the kind `slip`, and their Math-Shepherd labels."""
    n_ops = len(problem.operators)
    at = n_ops if slip == "answer" else rng.randrange(n_ops)  # the step that slips
    truth = problem.values()
    steps, stated, value = [], [], problem.numbers[0]
    for k, op in enumerate(problem.operators):
        left = value
        if slip == "operand" and k == at:
            left = nudge(value, rng)
        result = OPERATIONS[op](left, problem.numbers[k + 1])
        if slip == "result" and k == at:
            result = nudge(result, rng)
        steps.append(f"{left} {op} {problem.numbers[k + 1]} = {result}")
        stated.append(result)
        value = result
    answer = nudge(value, rng) if slip == "answer" else value
    steps.append(f"The answer is {answer}.")
    right = [s == t for s, t in zip(stated, truth)] + [answer == truth[-1]]
    return steps, list(itertools.accumulate(right, operator.and_))


def nudge(value: int, rng: random.Random) -> int:
    """A nearby wrong value, never negative: off by 1, 2, 3 or 10 either way."""
    return rng.choice([value + d for d in (-10, -3, -2, -1, 1, 2, 3, 10) if value + d >= 0])


def rows(n: int, rng: random.Random, error_rate: float, exclude: set[str]) -> list[dict]:
    """`n` rows of distinct problems outside `exclude`, TRL's stepwise format."""
    out, seen = [], set(exclude)
    while len(out) < n:
        problem = random_problem(rng)
        if problem.prompt in seen:
            continue
        seen.add(problem.prompt)
        slip = rng.choice(SLIPS) if rng.random() < error_rate else None
        steps, labels = solve(problem, rng, slip)
        out.append({"prompt": problem.prompt, "completions": steps, "labels": labels})
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DemoConfig, argv, prog="python -m rm_training.demo_prm", description=__doc__)
    try:
        cfg.validate()
    except ConfigError as e:
        print(f"demo_prm: error: {e}", file=sys.stderr)
        sys.exit(2)
    rng = random.Random(cfg.seed)
    test = rows(cfg.test, rng, cfg.error_rate, set())  # first, so train can leave its problems out
    train = rows(cfg.train, rng, cfg.error_rate, {r["prompt"] for r in test})
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("test", test)):
        write_jsonl(output / f"{name}.jsonl", records)
        labels = [label for r in records for label in r["labels"]]
        print(
            f"wrote {len(records)} solutions, {len(labels)} steps ({1 - sum(labels) / len(labels):.1%} wrong) "
            f"to {output / name}.jsonl"
        )


if __name__ == "__main__":
    main()
