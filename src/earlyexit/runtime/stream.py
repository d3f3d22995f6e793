"""Streaming: emitted tokens become text chunks as they come (`TextAssembler`, shared with
`generate` so both give the same text), and `Stream`, the iterator `EarlyExit.stream`
returns, whose consumer runs the decode."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from earlyexit.runtime.results import Generation, StreamChunk

# the decode behind a stream: (listener, cancel, may_drive) -> its Generation
Execute = Callable[[Callable[[int, int], None], threading.Event, Callable[[], bool]], Generation]


class Cancelled(Exception):
    """Raised by a stream's token listener once its consumer has gone: ends the decode."""


class TextAssembler:
    """Turns emitted tokens into text, incrementally: a character split over tokens is held
    until complete (decoding a window from the last settled token, as text-generation-
    inference does), and text that may begin a stop string is held until it does or not.
    `generate` and `stream` both assemble through this, so their texts are the same."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.longest = max((len(s) for s in stop), default=0)
        self.tokens: list[int] = []
        self.text = ""  # settled text (cut before a stop string once one is seen)
        self.stopped = False  # a stop string was seen
        self._prefix = self._read = 0  # token offsets of the decode window
        self._sent = 0  # characters of `text` handed out

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, token: int, layer: int = 0) -> None:
        self.tokens.append(token)
        if self.stopped:
            return
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # nothing new yet, or a character still incomplete
        start = max(0, len(self.text) - self.longest + 1)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def release(self, final: bool = False) -> str:
        """Text settled since the last call (all of it when `final`)."""
        end = len(self.text)
        if not final and not self.stopped:
            for stop in self.stop:  # hold back a suffix that may begin a stop string
                for size in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:size]):
                        end = min(end, len(self.text) - size)
                        break
        end = max(end, self._sent)
        delta, self._sent = self.text[self._sent : end], end
        return delta


class Stream(Iterator[StreamChunk]):
    """The chunks of one streamed generation (from `EarlyExit.stream`).

    A worker thread, started at the first `next()`, submits the decode to the scheduler (a
    batch row, or a call for methods that decode alone) and puts each emitted token on a
    queue. The worker never runs the scheduler's loop itself: the consumer does, inside
    `next()` while the queue is empty (or a server's loop does), so the model computes in
    the consumer's thread, the one that loaded it in a script (a second computing thread
    makes every decode ~3.5x slower: runtime/scheduler.py). So a stream decodes while it
    is read, and a method that decodes alone (a scheduler call) yields its tokens when
    that call ends unless a server's loop runs it. Iterating takes the queued tokens,
    assembles their text and yields them as `StreamChunk`s; the last chunk carries the
    `Generation`. An exception in the decode is raised here, in the consumer.

    Stopping early: `close()` (or leaving a `with` block, or the stream being garbage
    collected) sets a cancel flag: the scheduler frees the row at its next iteration (a
    decode under the lock ends at the next token, its listener raising), and the thread
    ends. `close()` waits for that (one decoding step; a worker still waiting for its turn
    gives up at once; once cancelled, the worker may run the loop to free its row); a
    stream merely dropped does not wait.
    """

    def __init__(
        self,
        execute: Execute,
        drive_until: Callable[[Callable[[], bool]], None],
        assembler: TextAssembler,
    ) -> None:
        """`execute(listener, cancel, may_drive)`: the decode, which returns the Generation
        (EarlyExit._execute); `drive_until(done)`: the scheduler's; `assembler`: the
        request's (its stop strings)."""
        self._execute, self._drive_until = execute, drive_until
        self._queue: queue.Queue[tuple] = queue.Queue()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._assembler = assembler
        self._pending: tuple | None = None
        self._done = False
        self.generation: Generation | None = None  # set once the last chunk is out

    def __iter__(self) -> Stream:
        return self

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        execute, out, cancel = self._execute, self._queue, self._cancel

        def listener(token: int, layer: int) -> None:
            if cancel.is_set():
                raise Cancelled
            out.put(("token", token, layer))

        def work() -> None:  # holds no reference to the Stream: dropping it cancels
            try:
                # the consumer runs the loop (`__next__`); this thread only once cancelled
                out.put(("done", execute(listener, cancel, cancel.is_set)))
            except Cancelled:
                out.put(("cancelled",))
            except BaseException as err:  # re-raised in the consumer
                out.put(("error", err))

        self._thread = threading.Thread(target=work, name="earlyexit-stream", daemon=True)
        self._thread.start()

    def __next__(self) -> StreamChunk:
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._start()
        if self._pending is None:  # the decode runs here while the queue is empty
            self._drive_until(lambda: not self._queue.empty())
        item = self._pending or self._queue.get()
        self._pending = None
        tokens: list[int] = []
        layers: list[int] = []
        while item[0] == "token":
            self._assembler.push(item[1], item[2])
            tokens.append(item[1])
            layers.append(item[2])
            try:  # take every token already queued into this chunk
                item = self._queue.get_nowait()
            except queue.Empty:
                return StreamChunk(self._assembler.release(), tokens, layers)
        if tokens:  # the decode's end came with them: it is the next chunk
            self._pending = item
            return StreamChunk(self._assembler.release(), tokens, layers)
        self._finish()
        if item[0] == "error":
            raise item[1]
        if item[0] == "cancelled":
            raise StopIteration
        # the worker assembled the same tokens through the same code: the same text
        self.generation = item[1]
        return StreamChunk(self._assembler.release(final=True), [], [], item[1])

    def _finish(self) -> None:
        self._done = True
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        """Stop the decode at its next token and wait for the worker thread to end."""
        self._cancel.set()
        self._finish()

    def __del__(self) -> None:
        cancel = getattr(self, "_cancel", None)
        if cancel is not None:
            cancel.set()  # no wait: the worker ends at its next token
