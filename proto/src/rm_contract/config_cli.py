"""Command lines built from config dataclasses: one flag per field, its help the field's `option` text.

The help lives in each field's metadata (as in transformers' and TRL's argument dataclasses), not in
source comments, so `--help` works on installs that ship only bytecode. With an environment prefix
(containers), every flag also reads `PREFIX_FIELD_NAME` as its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An option value that parses but makes no sense (reported with exit code 2)."""


def option(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A config field with its command-line help (no default: the flag is required)."""
    return dataclasses.field(default=default, metadata={"help": " ".join(help.split())})


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
    hints = typing.get_type_hints(cls)
    environ = os.environ if environ is None else environ
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
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif default is dataclasses.MISSING:
            parser.add_argument(flag, type=kind, required=True, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})")
    return cls(**vars(parser.parse_args(argv)))


def _without_none(hint):
    """`X | None` -> X (None stays reachable as the default); other hints unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return hint


def _from_env(name: str, value: str, kind: type):
    if kind is bool:
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ConfigError(f"environment variable {name}={value!r} is not a boolean")
        return value.lower() in ("1", "true", "yes")
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not a valid {kind.__name__}") from None
