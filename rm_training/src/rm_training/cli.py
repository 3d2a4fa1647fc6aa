"""Command lines built from config dataclasses: one flag per field, its help the field's docstring."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An option value that parses but makes no sense (reported with exit code 2)."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source, as tyro does)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def parse_config(cls: type[T], argv: list[str] | None, prog: str, description: str | None = None) -> T:
    """Parse `argv` into an instance of the dataclass `cls`; argparse exits with code 2 on bad flags."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = docs.get(f.name, "")
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=f.default, help=help_text)
        elif f.default is dataclasses.MISSING:
            parser.add_argument(flag, type=kind, required=True, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=f"{help_text} (default: {f.default})")
    return cls(**vars(parser.parse_args(argv)))
