"""Command lines from config dataclasses: help without source files, one declaration of the serving knobs."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from rm_contract.config_cli import ConfigError, parse_config
from rm_server.batcher import BatchingOptions
from rm_server.main import ServerConfig
from rm_server.models import ModelSettings

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
    config = parse_config(ServerConfig, [], prog="rm-serve", env_prefix="RM", environ={"RM_MAX_QUEUE": "12"})
    assert config.max_queue == 12
    with pytest.raises(ConfigError, match="RM_VERIFY='maybe' is not a boolean"):
        parse_config(ServerConfig, [], prog="rm-serve", env_prefix="RM", environ={"RM_VERIFY": "maybe"})


def test_serving_knobs_are_declared_once_and_every_flag_is_documented():
    """rm-serve's flags, the model settings and the batcher options are one declaration: same fields, same
    defaults; every flag has help."""
    knobs = {f.name: f.default for f in dataclasses.fields(BatchingOptions)}
    settings = {f.name: f.default for f in dataclasses.fields(ModelSettings)}
    server = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    assert knobs.items() <= settings.items() <= server.items()
    assert parse_config(ServerConfig, ["--bundle", "b"], prog="rm-serve").model_settings() == ModelSettings()
    undocumented = [f.name for f in dataclasses.fields(ServerConfig) if not f.metadata.get("help")]
    assert undocumented == ["log_level"]


def test_knob_limits_are_refused_with_the_flag_named():
    with pytest.raises(ConfigError, match="--max-queue must be at least 1"):
        ServerConfig(bundle="b", max_queue=0).validate()
    with pytest.raises(ConfigError, match="--providers must name at least one execution provider"):
        ServerConfig(bundle="b", providers=" , ").validate()
    with pytest.raises(ConfigError, match="--max-batch-tokens must not be negative"):
        ServerConfig(bundle="b", max_batch_tokens=-1).validate()
    with pytest.raises(ValueError, match="below the model's max length 512"):
        BatchingOptions(max_batch_tokens=256).token_budget(max_length=512, on_gpu=False)
    assert BatchingOptions().token_budget(max_length=512, on_gpu=False) == 1024
    assert BatchingOptions().token_budget(max_length=512, on_gpu=True) == 16384
