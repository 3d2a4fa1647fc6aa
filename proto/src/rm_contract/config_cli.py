"""Command lines built from config dataclasses: one flag per field, its help the field's `option` text.

The help lives in each field's metadata (as in transformers' and TRL's argument dataclasses), not in
source comments, so `--help` works on installs that ship only bytecode. With an environment prefix
(containers), every flag also reads `PREFIX_FIELD_NAME` as its default.

A command with subcommands (`prog COMMAND --flags`) is one dataclass per subcommand (`parse_subcommands`);
the options they share are the fields of a base dataclass they inherit.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An option value that parses but makes no sense (reported with exit code 2)."""


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field with its command-line help (no default: the flag is required). `choices`: the only
    values the flag accepts (argparse refuses others with exit code 2); `metavar`: the value's name in usage
    and help. A default of None means "not given": its help says what happens then, and no "(default: None)"
    is added."""
    metadata: dict[str, Any] = {"help": " ".join(help.split())}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if metavar is not None:
        metadata["metavar"] = metavar
    return dataclasses.field(default=default, metadata=metadata)


def parse_config(
    cls: type[T],
    argv: list[str] | None,
    prog: str,
    description: str | None = None,
    env_prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Parse `argv` into an instance of the dataclass `cls`; argparse exits with code 2 on bad flags."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_fields(parser, cls, env_prefix, os.environ if environ is None else environ)
    return cls(**_values(parser.parse_args(argv)))


def parse_subcommands(
    commands: Mapping[str, type],
    argv: list[str] | None,
    prog: str,
    description: str | None = None,
    env_prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str, Any]:
    """Parse `prog COMMAND --flags` into `(COMMAND, an instance of commands[COMMAND])`; argparse exits with
    code 2 on a missing or unknown command and on bad flags.

    Each command's help in `prog --help` is the first line of its dataclass's docstring (`prog COMMAND
    --help` shows the whole docstring). Options every command takes are fields of a base dataclass the
    command dataclasses inherit; declare them `@dataclass(kw_only=True)` so that a command's required field
    may follow the base's fields with defaults."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest=COMMAND, required=True)
    environ = os.environ if environ is None else environ
    for name, cls in commands.items():
        if COMMAND in {f.name for f in dataclasses.fields(cls)}:
            raise TypeError(f"{cls.__name__}: a field named {COMMAND!r} would hide the command's name")
        doc = inspect.cleandoc(cls.__doc__ or "")
        subparser = subparsers.add_parser(
            name,
            help=doc.split("\n", 1)[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_fields(subparser, cls, env_prefix, environ)
    values = _values(parser.parse_args(argv))
    name = values.pop(COMMAND)
    return name, commands[name](**values)


COMMAND = "command"
"""Where argparse keeps the subcommand's name (no command dataclass may have a field of that name)."""


def _add_fields(parser: argparse.ArgumentParser, cls: type, env_prefix: str | None, environ: Mapping[str, str]) -> None:
    """One flag per field of the dataclass `cls` (its own and those it inherits, in declaration order)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _without_none(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default
        env_name = f"{env_prefix}_{f.name.upper()}" if env_prefix else None
        if env_name:
            help_text += f" [env {env_name}]"
            if env_name in environ:
                default = _from_env(env_name, environ[env_name], kind)
        value = {key: f.metadata[key] for key in ("choices", "metavar") if key in f.metadata}
        if typing.get_origin(kind) is tuple:  # a list of words: `--flag A B C`, or the variable's "A B C"
            parser.add_argument(flag, nargs="+", type=str, default=tuple(default), help=help_text, **value)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif default is dataclasses.MISSING:
            parser.add_argument(flag, type=kind, required=True, help=help_text, **value)
        elif default is None:
            parser.add_argument(flag, type=kind, default=None, help=help_text, **value)
        else:
            parser.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})", **value)


def _values(namespace: argparse.Namespace) -> dict[str, Any]:
    """argparse's values as the fields take them: a word list as a tuple (frozen configs stay hashable)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(namespace).items()}


def _without_none(hint):
    """`X | None` -> X (None stays reachable as the default); other hints unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return hint


def _from_env(name: str, value: str, kind: type):
    if typing.get_origin(kind) is tuple:
        return tuple(value.split())
    if kind is bool:
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ConfigError(f"environment variable {name}={value!r} is not a boolean")
        return value.lower() in ("1", "true", "yes")
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not a valid {kind.__name__}") from None
