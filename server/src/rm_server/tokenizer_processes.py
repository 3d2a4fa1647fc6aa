"""Tokenization in worker processes, one pool per loaded model version.

tokenizers parses a tokenizer.json holding Python's GIL (about 60 ms per MiB), and jinja2 renders chat
templates holding it too: in the serving process, a new version's 40 MB tokenizer paused every call for
seconds. Each version's workers parse the tokenizer, render and tokenize in their own processes; the
serving process sends samples and gets token ids back, a chunk at a time.

Workers fork from a forkserver that has imported only the recipe code: not grpc, not ONNX Runtime, and not
from the serving process's threads.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from rm_contract.bundle import TOKENIZER_FILE, Bundle, BundleError, sha256_of
from rm_contract.recipe import EncodedSample, RecipeError, Sample, SampleEncoder

log = logging.getLogger("rm_server")

LOAD_TIMEOUT_S = 300.0
"""A worker's tokenizer load (a 64 MiB tokenizer.json parses in about 4 s)."""
CHUNK_TIMEOUT_S = 600.0
"""One chunk (at most CHUNK_CHARS characters: well under a second) has this long; it guards a wedged worker."""
CHUNK_CHARS = 200_000
"""Characters per chunk sent to a worker: a cancelled call stops at the next chunk."""


@dataclass(frozen=True)
class TextInput:
    """A model input already rendered as one text (a chat-templated string, as veRL sends to vLLM):
    tokenized as it is (`SampleEncoder.encode_text`), then truncated like token ids."""

    text: str
    add_special_tokens: bool | None = None


Encodable = Sample | TextInput
Encoded = EncodedSample | list[int] | str
"""A Sample's encoding, a text's ids, or why the recipe refused it."""


class TokenizerProcesses:
    """A pool of worker processes holding one bundle's tokenizer and recipe."""

    def __init__(self, bundle: Bundle, processes: int, verify: bool = True):
        self._args = (bundle, verify)
        self.processes = self.threads = processes
        """One serving-process thread per worker sends a call's chunks and checks the ids it gets back."""
        self._lock = threading.Lock()
        self._pool = self._start()
        try:  # each worker loads as it starts; the first answer says whether the tokenizer loads at all
            self.vocab_size = self._pool.submit(_vocab_size).result(timeout=LOAD_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.processes, _context(), initializer=_load, initargs=self._args)
        for _ in range(self.processes):  # start every worker now, not at the first request
            pool.submit(int)
        return pool

    def encode(self, items: list[Encodable]) -> list[Encoded]:
        """Encode a chunk in one worker. Workers found dead (killed, out of memory) are replaced and the
        chunk goes to the new ones; a death while the chunk was in hand raises BrokenProcessPool (the chunk
        itself may be what killed them)."""
        for _ in range(2):
            pool = self._pool
            try:
                future = pool.submit(_encode, items)
            except BrokenProcessPool:  # broken before this chunk came: not its fault
                self._replace(pool)
                continue
            return future.result(timeout=CHUNK_TIMEOUT_S)
        raise BrokenProcessPool("the new tokenizer processes died too")

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                log.error("a tokenizer process died; starting new ones")
                self._pool = self._start()
                broken.shutdown(wait=False)

    def close(self) -> None:
        """Stop the workers (a chunk in hand is finished first, well under a second)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class InProcessTokenizer:
    """`--tokenizer-processes 0`: the same work in threads of the serving process, with no processes to
    start or feed. The price: a new version's tokenizer.json is parsed holding this process's GIL, and chat
    templates render holding it, pausing every call meanwhile."""

    threads = 2

    def __init__(self, bundle: Bundle):
        self.encoder = bundle.sample_encoder()
        self.vocab_size = self.encoder.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, items: list[Encodable]) -> list[Encoded]:
        return encode_items(self.encoder, items)

    def close(self) -> None:
        pass


RequestTokenizer = TokenizerProcesses | InProcessTokenizer


def encode_items(encoder: SampleEncoder, items: list[Encodable]) -> list[Encoded]:
    out: list[Encoded] = []
    for item in items:
        try:
            if isinstance(item, TextInput):
                out.append(encoder.encode_text(item.text, item.add_special_tokens))
            else:
                out.append(encoder.encode(item))
        except RecipeError as e:
            out.append(str(e))
    return out


def chunks(lengths: list[int], max_chars: int = CHUNK_CHARS) -> list[range]:
    """Consecutive index ranges whose lengths add up to at most `max_chars` (one item at least each)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > max_chars:
            out.append(range(start, i))
            start, total = i, 0
        total += n
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["rm_server.tokenizer_processes"])
    return context


# --- in the worker processes -------------------------------------------------------------------------------

_encoder: SampleEncoder | None = None
_load_error: str | None = None


def _load(bundle: Bundle, verify: bool) -> None:
    """Worker start: build the encoder, or keep why it cannot be built (raised at the first call, as a
    BundleError the serving process can report)."""
    global _encoder, _load_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; workers end with it
    path = bundle.directory / TOKENIZER_FILE
    try:
        if verify and sha256_of(path) != bundle.manifest["files"][TOKENIZER_FILE]:  # checked, then changed?
            raise BundleError(f"{path}: its sha256 no longer matches bundle.json")
        _encoder = bundle.sample_encoder()
    except BundleError as e:
        _load_error = str(e)
    except Exception as e:  # noqa: BLE001 - tokenizers and the recipe raise their own types
        _load_error = f"{path}: {type(e).__name__}: {e}"


def _vocab_size() -> int:
    if _encoder is None:
        raise BundleError(_load_error or "the tokenizer did not load")
    return _encoder.tokenizer.get_vocab_size(with_added_tokens=True)


def _encode(items: list[Encodable]) -> list[Encoded]:
    if _encoder is None:
        raise BundleError(_load_error or "the tokenizer did not load")
    return encode_items(_encoder, items)
