"""Command lines with subcommands from config dataclasses (`parse_subcommands`), and rm-client's, built so."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from rm_client.cli import COMMANDS, CompareArgs, HealthArgs, ScoreArgs, parse_args
from rm_contract.config_cli import option, parse_subcommands


@dataclass(kw_only=True)
class Shared:
    """Options of every command."""

    target: str = option(help="Where the service is.")
    retries: int = option(3, "Attempts per call.")
    verbose: bool = option(False, "Say more.")


@dataclass(kw_only=True)
class Fetch(Shared):
    """fetch one record

    More about fetching, shown by `demo fetch --help`."""

    key: str = option(help="Which record.")
    output: Path | None = option(None, "Where it goes.")


@dataclass(kw_only=True)
class Ping(Shared):
    """check the service answers"""


DEMO = {"fetch": Fetch, "ping": Ping}


def parse(*argv: str, **kw):
    return parse_subcommands(DEMO, list(argv), prog="demo", **kw)


def test_each_command_parses_its_own_and_the_shared_fields():
    command, parsed = parse("fetch", "--target", "t:1", "--key", "k", "--output", "o.json", "--verbose")
    assert command == "fetch" and parsed == Fetch(target="t:1", key="k", output=Path("o.json"), verbose=True)
    assert parse("ping", "--target", "t:1", "--retries", "5") == ("ping", Ping(target="t:1", retries=5))


def test_help_lists_the_commands_by_their_docstrings_and_each_commands_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--help")
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "fetch fetch one record" in help_text and "ping check the service answers" in help_text
    with pytest.raises(SystemExit):
        parse("fetch", "--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "More about fetching" in help_text
    assert "Attempts per call. (default: 3)" in help_text and "Which record." in help_text


@pytest.mark.parametrize(
    "argv, message",
    [
        ((), "the following arguments are required: command"),
        (("fetch", "--target", "t"), "the following arguments are required: --key"),
        (("ping", "--target", "t", "--key", "k"), "unrecognized arguments: --key k"),
        (("pong",), "invalid choice: 'pong'"),
        (("ping", "--target", "t", "--retries", "many"), "invalid int value: 'many'"),
    ],
)
def test_bad_usage_exits_2_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_environment_defaults_apply_to_every_command():
    environ = {"DEMO_RETRIES": "7", "DEMO_TARGET": "env:1"}
    assert parse("ping", env_prefix="DEMO", environ=environ) == ("ping", Ping(target="env:1", retries=7))


def test_a_field_named_like_the_command_is_refused():
    @dataclass
    class Clash:
        """clash"""

        command: str = option("x", "Hides the command's name.")

    with pytest.raises(TypeError, match="command"):
        parse_subcommands({"clash": Clash}, ["clash"], prog="demo")


def test_rm_client_flags_and_defaults():
    assert sorted(COMMANDS) == ["compare", "health", "info", "score"]
    command, score = parse_args(["score", "--target", "h:1", "--input", "in.jsonl", "--output", "out.jsonl"])
    assert command == "score" and isinstance(score, ScoreArgs)
    assert (score.input, score.output, score.normalize) == (Path("in.jsonl"), Path("out.jsonl"), False)
    assert (score.timeout, score.tls, score.ca, score.auth_token_file) == (120.0, False, None, None)
    _, compare = parse_args(["compare", "--target", "h:1", "--prompt", "p", "--a", "x", "--b", "y", "--tls"])
    assert isinstance(compare, CompareArgs)
    assert (compare.prompt, compare.a, compare.b, compare.tls) == ("p", "x", "y", True)
    _, health = parse_args(["health", "--target", "h:1", "--timeout", "2", "--ca", "ca.pem"])
    assert isinstance(health, HealthArgs) and health.timeout == 2.0
    assert health.security(environ={}).tls  # a CA implies TLS
