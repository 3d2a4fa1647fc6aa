"""The tokenizer processes themselves (server/src/rm_server/tokenizer_processes.py), in this process:
encodings equal to the in-process encoder's, a chunk that kills its workers, a worker dying while it
loads, and closing."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from rm_contract.bundle import load_bundle
from rm_contract.recipe import Sample, TextInput
from rm_server.runtime.tokenizer_processes import TokenizerClosed, TokenizerCrashed, TokenizerProcesses


class Poison:
    """Unpickled by a worker as `os._exit(3)`: a chunk that kills whichever worker receives it."""

    def __reduce__(self):
        return os._exit, (3,)


class DiesOnceLoading:
    """Stands for the recipe; the first worker to unpickle it dies, later ones get the real recipe."""

    def __init__(self, recipe, flag: Path):
        self.recipe, self.flag = recipe, flag

    def __reduce__(self):
        return _die_once, (self.recipe, str(self.flag))


def _die_once(recipe, flag: str):
    if not os.path.exists(flag):
        Path(flag).touch()
        os._exit(4)
    return recipe


def workers() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name == "rm-tokenizer"]


@pytest.fixture
def bundle(encoder_bundle):
    return load_bundle(encoder_bundle)


def test_encodings_equal_the_in_process_encoders(bundle):
    samples = [Sample.from_text(f"question {i}", "an answer " * i) for i in range(20)]
    pool = TokenizerProcesses(bundle, 2)
    try:
        got = pool.encode([*samples, TextInput("a rendered text", None)])
    finally:
        pool.close()
    encoder = bundle.sample_encoder()
    assert got[:-1] == [encoder.encode(s) for s in samples]
    assert got[-1] == encoder.encode_text("a rendered text")


def test_a_chunk_that_kills_its_workers_fails_alone_and_the_pool_goes_on(bundle, caplog):
    """A worker dying with a chunk is replaced and the chunk sent to another; when that one dies too, the
    chunk is what kills them: TokenizerCrashed (answered INTERNAL, not retried). The pool still serves."""
    sample = Sample.from_text("Q", "A short answer.")
    pool = TokenizerProcesses(bundle, 1)
    try:
        with caplog.at_level(logging.ERROR, "rm_server"), pytest.raises(TokenizerCrashed):
            pool.encode([Poison()])
        assert pool.encode([sample]) == [bundle.sample_encoder().encode(sample)]
    finally:
        pool.close()
    assert caplog.text.count("a tokenizer process died (exit code 3); starting a new one") == 2


def test_a_worker_dying_while_it_loads_is_replaced_not_taken_for_a_broken_bundle(bundle, tmp_path, monkeypatch):
    """A worker killed while it loads (out of memory) is replaced, and the version loads: the death is not
    taken for a broken bundle, which would reject the version until its files change."""
    recipe = bundle.recipe
    monkeypatch.setattr(type(bundle), "recipe", property(lambda _: DiesOnceLoading(recipe, tmp_path / "died")))
    sample = Sample.from_text("Q", "A short answer.")
    pool = TokenizerProcesses(bundle, 2)
    try:
        monkeypatch.undo()
        assert (tmp_path / "died").exists()
        assert pool.encode([sample]) == [bundle.sample_encoder().encode(sample)]
        assert pool.encode([sample]) == [bundle.sample_encoder().encode(sample)]
    finally:
        pool.close()


def test_closing_kills_the_workers_and_later_calls_are_refused(bundle):
    """Even a wedged worker (stopped here) is killed: unloading and shutdown do not wait for it."""
    pool = TokenizerProcesses(bundle, 2)
    assert len(workers()) == 2
    os.kill(workers()[0].pid, signal.SIGSTOP)
    pool.close()
    with pytest.raises(TokenizerClosed):
        pool.encode([Sample.from_text("Q", "A.")])
    deadline = time.monotonic() + 10
    while workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers() == []
