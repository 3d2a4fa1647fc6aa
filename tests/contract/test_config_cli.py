"""Command lines from config dataclasses: help without source files, one declaration of the serving knobs."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from rm_contract.config_cli import ConfigError, option, parse_config
from rm_server.core.settings import ModelSettings
from rm_server.main import ServeArgs
from rm_server.runtime.batcher import BatcherConfig

NO_SOURCE = """
import dataclasses
from rm_contract.config_cli import option

@dataclasses.dataclass
class Config:
    data: str = option(help="Where the data is.")
    max_batch_size: int = option(64, "Rows per batch.")
    strict: bool = option(False, "Refuse over-long samples.")
"""


def test_help_text_needs_no_source_files(capsys):
    """Installs may ship bytecode only: `--help` must not read the source (inspect.getsource fails there)."""
    namespace = {"__name__": "bytecode_only"}
    exec(compile(NO_SOURCE, "<bytecode only>", "exec", dont_inherit=True), namespace)
    config_class = namespace["Config"]
    with pytest.raises((OSError, TypeError)):
        inspect.getsource(config_class)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(config_class, ["--help"], prog="demo")
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Where the data is." in help_text
    assert "Rows per batch. (default: 64)" in help_text
    assert "Refuse over-long samples." in help_text
    parsed = parse_config(config_class, ["--data", "d.jsonl", "--no-strict"], prog="demo")
    assert (parsed.data, parsed.max_batch_size, parsed.strict) == ("d.jsonl", 64, False)


def test_environment_defaults_are_read_and_checked():
    environ = {"RM_MAX_QUEUE": "12", "RM_SERVED_MODEL_NAME": " rm  /ckpt/rm "}
    config = parse_config(ServeArgs, [], prog="rm-serve", env_prefix="RM", environ=environ)
    assert (config.max_queue, config.served_model_name) == (12, ("rm", "/ckpt/rm"))
    flags = ["--served-model-name", "a", "b", "--max-queue", "3"]
    assert parse_config(ServeArgs, flags, prog="rm-serve").served_model_name == ("a", "b")
    with pytest.raises(ConfigError, match="RM_VERIFY='maybe' is not a boolean"):
        parse_config(ServeArgs, [], prog="rm-serve", env_prefix="RM", environ={"RM_VERIFY": "maybe"})


def test_serving_flags_are_declared_once_and_become_plain_runtime_values():
    """Every rm-serve flag has its help in ServeArgs alone; the runtime configs carry no command-line help and
    inherit nothing from it, and the flags' defaults give the runtime's defaults."""
    undocumented = [f.name for f in dataclasses.fields(ServeArgs) if not f.metadata.get("help")]
    assert undocumented == ["log_level"]
    for runtime_config in (ModelSettings, BatcherConfig):
        assert not any(f.metadata.get("help") for f in dataclasses.fields(runtime_config))
        assert ServeArgs not in runtime_config.__mro__ and runtime_config not in ServeArgs.__mro__
    assert parse_config(ServeArgs, ["--bundle", "b"], prog="rm-serve").model_settings() == ModelSettings()
    parsed = parse_config(ServeArgs, ["--bundle", "b", "--max-queue", "7", "--providers", "cuda, cpu"], prog="rm-serve")
    assert parsed.model_settings().batching.max_queue == 7
    assert parsed.model_settings().providers == ("cuda", "cpu")


def test_knob_limits_are_refused_with_the_flag_named():
    with pytest.raises(ConfigError, match="--max-queue must be at least 1"):
        ServeArgs(bundle="b", max_queue=0).validate()
    with pytest.raises(ConfigError, match="--providers must name at least one execution provider"):
        ServeArgs(bundle="b", providers=" , ").validate()
    with pytest.raises(ConfigError, match="--max-batch-tokens must not be negative"):
        ServeArgs(bundle="b", max_batch_tokens=-1).validate()
    with pytest.raises(ValueError, match="below the model's max length 512"):
        BatcherConfig(max_batch_tokens=256).token_budget(max_length=512, on_gpu=False)
    assert BatcherConfig().token_budget(max_length=512, on_gpu=False) == 1024
    assert BatcherConfig().token_budget(max_length=512, on_gpu=True) == 16384


@dataclasses.dataclass(frozen=True)
class Choosy:
    template: str | None = option(None, "Input recipe (default: the checkpoint's).", choices=("pair", "chat"))
    verify_only: str | None = option(None, "Check a bundle.", metavar="BUNDLE")
    opset: int = option(17, "ONNX opset.")


def test_choices_metavar_and_unset_defaults(capsys):
    """A flag limited to some values refuses others with exit code 2; a value can be named in usage; a
    default of None (not given) adds no "(default: None)" to help that already says what happens then."""
    assert parse_config(Choosy, ["--template", "chat"], prog="demo") == Choosy(template="chat")
    assert parse_config(Choosy, [], prog="demo") == Choosy()
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Choosy, ["--template", "chatml"], prog="demo")
    assert exit_info.value.code == 2 and "invalid choice: 'chatml'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Choosy, ["--help"], prog="demo")
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--template {pair,chat} Input recipe (default: the checkpoint's)." in help_text
    assert "--verify-only BUNDLE Check a bundle." in help_text and "ONNX opset. (default: 17)" in help_text
    assert "(default: None)" not in help_text
