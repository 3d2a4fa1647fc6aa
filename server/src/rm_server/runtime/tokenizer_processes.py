"""Tokenization in worker processes, a few per loaded model version.

tokenizers parses a tokenizer.json holding Python's GIL (about 60 ms per MiB), and jinja2 renders chat
templates holding it too: in the serving process, a new version's 40 MB tokenizer paused every call for
seconds. Each version's workers parse the tokenizer, render and tokenize in their own processes; the
serving process sends samples and gets token ids back, a chunk at a time.

Each worker has a pipe of its own, so a worker that dies (killed, out of memory) costs only the chunk it
held, which goes to another worker while a replacement starts. Workers fork from a forkserver that has
imported only this module and the recipe code (not grpc, not ONNX Runtime, not the server's threads), do
not import the server's main module, stay out of the server's process group (its signals are its own),
and exit when their pipe closes: when the model version is unloaded, or the server is gone however it
ended.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from tokenizers import Tokenizer

from rm_contract.bundle import TOKENIZER_FILE, Bundle, BundleError
from rm_contract.recipe import EncodedSample, InputRecipe, RecipeError, Sample, SampleEncoder, TextInput

log = logging.getLogger("rm_server")

LOAD_TIMEOUT_S = 300.0
"""A worker's tokenizer load (a 64 MiB tokenizer.json parses in about 4 s)."""
CHUNK_TIMEOUT_S = 60.0
"""One chunk (at most CHUNK_SIZE characters or ids: well under a second) has this long; a worker still busy
after it is wedged, and is replaced."""
CHUNK_SIZE = 200_000
"""Characters (or token ids) per chunk sent to a worker: a cancelled call stops at the next chunk."""


class TokenizerClosed(Exception):
    """The model version was unloaded: its call meets a closed tokenizer (answered like a stopped batcher)."""


class TokenizerCrashed(Exception):
    """Two workers in turn died holding the same chunk: the chunk itself is the likely cause."""


class _DiedLoading(BundleError):
    """A worker died before it had loaded the tokenizer."""


Encodable = Sample | TextInput
Encoded = EncodedSample | list[int] | str
"""A Sample's encoding, a text's ids, or why the recipe refused it."""


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    ready: bool = False
    held: bool = False
    """Taken by a call: only that call's thread touches its pipe, and retires it when it dies."""


class TokenizerProcesses:
    """Worker processes holding one bundle's tokenizer and recipe. The tokenizer's bytes are read and
    checked here once; a replacement worker gets the same bytes, whatever the disk holds by then."""

    def __init__(self, bundle: Bundle, processes: int, verify: bool = True):
        data = bundle.tokenizer_bytes()
        expected = bundle.manifest["files"][TOKENIZER_FILE]
        if verify and hashlib.sha256(data).hexdigest() != expected:  # verified at load, changed since?
            raise BundleError(f"{bundle.directory / TOKENIZER_FILE}: its sha256 no longer matches bundle.json")
        self._path = str(bundle.directory / TOKENIZER_FILE)
        self._args = (data, bundle.recipe, self._path)
        """What each worker starts from: the tokenizer's bytes, the recipe, and the file's name for messages."""
        self.processes = self.threads = processes
        """One serving-process thread per worker sends a call's chunks and checks the ids it gets back."""
        self._lock = threading.Lock()
        self._closed = False
        self._workers: set[_Worker] = set()
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        try:
            for _ in range(processes):  # all start loading at once
                self._add()
            vocab_sizes = []
            for worker in list(self._workers):
                try:
                    vocab_sizes.append(self._wait_ready(worker))
                except _DiedLoading:  # killed, out of memory: not the bundle's fault; its replacement loads
                    self._retire(worker)
            self.vocab_size = vocab_sizes[0] if vocab_sizes else self._wait_ready(next(iter(self._workers)))
        except BaseException:
            self.close()
            raise
        threading.Thread(target=self._watch, name="tokenizer-watch", daemon=True).start()

    def encode(self, items: list[Encodable]) -> list[Encoded]:
        """Encode a chunk in an idle worker. When that worker dies holding it, the chunk goes to another
        (TokenizerCrashed when that one dies too)."""
        for _ in range(2):
            worker = self._take()
            try:
                if not worker.ready:  # a replacement still loading
                    self._wait_ready(worker)
                worker.conn.send(items)
                answer = _receive(worker, CHUNK_TIMEOUT_S)
            except (EOFError, OSError, TimeoutError, BundleError):  # died, wedged, or failed to load
                self._retire(worker, holder=True)
                continue
            self._give_back(worker)
            if isinstance(answer, _Failure):
                raise RuntimeError(f"tokenizer process: {answer.message}")
            return answer
        raise TokenizerCrashed

    def close(self) -> None:
        """Kill the workers (the version is unloaded after its calls drained: a chunk still in hand belongs
        to a call past the grace period, and a wedged worker must not hold up shutdown). Later calls get
        TokenizerClosed. Does not wait."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        for worker in workers:
            worker.process.kill()
        with contextlib.suppress(queue.Empty):
            while True:
                self._end(self._idle.get_nowait())

    def _add(self) -> None:
        context = _context()
        ours, theirs = context.Pipe()
        with _plain_main():
            process = context.Process(target=_serve, args=(theirs, *self._args), name="rm-tokenizer", daemon=True)
            process.start()
        theirs.close()
        worker = _Worker(process, ours)
        self._workers.add(worker)
        self._idle.put(worker)

    def _wait_ready(self, worker: _Worker) -> int:
        try:
            kind, value = _receive(worker, LOAD_TIMEOUT_S)
        except TimeoutError:
            raise BundleError(f"a tokenizer process did not load {self._path} in {LOAD_TIMEOUT_S:.0f} s") from None
        except (EOFError, OSError):
            raise _DiedLoading(f"a tokenizer process died loading {self._path}") from None
        if kind == "error":
            raise BundleError(value)
        worker.ready = True
        return value

    def _take(self) -> _Worker:
        while True:
            with self._lock:
                if self._closed:
                    raise TokenizerClosed
            with contextlib.suppress(queue.Empty):
                worker = self._idle.get(timeout=1.0)
                with self._lock:
                    if worker in self._workers:  # not retired while it waited
                        worker.held = True
                        return worker

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            worker.held = False
            if not self._closed and worker in self._workers:
                self._idle.put(worker)
                return
        self._end(worker)

    def _retire(self, worker: _Worker, holder: bool = False) -> None:
        """Kill a dead or wedged worker and start its replacement. A held worker is retired only by its
        holder: closing its pipe under the thread reading it fails that read with a TypeError."""
        with self._lock:
            if worker not in self._workers or (worker.held and not holder):
                return
            self._workers.discard(worker)
            worker.process.kill()
            worker.process.join(timeout=5)
            worker.conn.close()
            if not self._closed:
                log.error("a tokenizer process died (exit code %s); starting a new one", worker.process.exitcode)
                self._add()

    def _end(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)
        worker.conn.close()  # the worker reads EOF and exits

    def _watch(self) -> None:
        """Replace a worker that dies while idle at once (not when a chunk next meets it); one that dies held
        is its holder's to replace."""
        while True:
            with self._lock:
                if self._closed:
                    return
                sentinels = {worker.process.sentinel: worker for worker in self._workers if not worker.held}
            for sentinel in wait(list(sentinels), timeout=1.0):
                self._retire(sentinels[sentinel])


class InProcessTokenizer:
    """`--tokenizer-processes 0`: the same work in threads of the serving process, with no processes to
    start or feed. The price: a new version's tokenizer.json is parsed holding this process's GIL, and chat
    templates render holding it, pausing every call meanwhile."""

    threads = 2

    def __init__(self, bundle: Bundle):
        self.encoder = bundle.sample_encoder()
        self.vocab_size = self.encoder.vocab_size

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


def chunks(lengths: list[int], max_total: int = CHUNK_SIZE) -> list[range]:
    """Consecutive index ranges whose lengths add up to at most `max_total` (one item at least each)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > max_total:
            out.append(range(start, i))
            start, total = i, 0
        total += n
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


def _receive(worker: _Worker, timeout_s: float):
    """The worker's next message; EOFError when it died first (seen on its process, not only its pipe),
    TimeoutError when it is still busy after `timeout_s`."""
    ready = wait([worker.conn, worker.process.sentinel], timeout=timeout_s)
    if worker.conn in ready:
        return worker.conn.recv()
    if ready:
        raise EOFError
    raise TimeoutError


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["rm_server.runtime.tokenizer_processes"])
    return context


_MAIN_LOCK = threading.Lock()
"""Held while `__main__` is stripped: two versions starting workers at once must not save each other's
stand-ins."""


@contextlib.contextmanager
def _plain_main() -> Iterator[None]:
    """multiprocessing makes each new process import the parent's main module (for rm-serve: the whole
    server, grpc and ONNX Runtime, 96 MB per worker instead of 40) unless the main module names no file
    and no module while the process starts."""
    with _MAIN_LOCK:
        main = sys.modules["__main__"]
        saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
        try:
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


# --- in the worker processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    """An exception other than the recipe's refusals, sent back as text."""

    message: str


def _serve(conn: Connection, tokenizer_json: bytes, recipe: InputRecipe, path: str) -> None:
    os.setpgrp()  # signals sent to the server's process group (Ctrl-C, a group-wide SIGTERM) are the server's
    try:
        encoder = SampleEncoder(Tokenizer.from_buffer(tokenizer_json), recipe)
    except Exception as e:  # noqa: BLE001 - tokenizers and the recipe raise their own types
        conn.send(("error", f"{path}: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", encoder.vocab_size))
    with contextlib.suppress(EOFError, OSError):  # the pipe closed: unloaded, or the server is gone
        while True:
            items = conn.recv()
            try:
                answer = encode_items(encoder, items)
            except Exception as e:  # noqa: BLE001 - answered as a failure of this chunk, the worker goes on
                answer = _Failure(f"{type(e).__name__}: {e}")
            conn.send(answer)
