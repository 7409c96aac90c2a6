"""The apply pass as a pipeline: read ▸ embed ▸ write overlap, through bounded hand-offs.

Run one after another, the model waits while a chunk is read back from the plan's spill and
while LanceDB commits it. :func:`run_pipeline` runs the three steps of each chunk on three
threads, each on a different chunk, so that while the model embeds chunk *k*, chunk *k + 1* is
read (and, for a chunk table, cut and its stored chunks looked up) and chunk *k - 1* is
committed::

    reader thread     prepare(k+1) ─┐
    calling thread                  └▶ embed(k) ─┐            (the model; Ctrl-C lands here)
    writer thread                                └▶ write(k-1), write(k), ...  (commits, in order)

- **Bounded.** Each hand-off holds at most ``depth`` chunks (:data:`PIPELINE_DEPTH`, 1): the
  reader has at most ``depth`` chunks ready for the model (and reads one more), and the model
  is never more than ``depth + 1`` chunks ahead of the last chunk committed, because a chunk
  handed to the writer counts until its commit is done. With depth 1 at most two chunks of
  vectors are in memory (one being committed, one being embedded): back-pressure, not a
  growing queue.
- **In order.** One writer thread commits the chunks in the order they were read; the drift
  guard's canary is checked by the first model call, before the first chunk reaches the writer,
  and recorded by the writer with the first commit, as before.
- **Stops at the first error.** An error in any step (or Ctrl-C / SIGTERM, which land in the
  calling thread, the one that embeds or waits) stops the other two: the commit in progress
  finishes (a commit is atomic: the process should not leave in the middle of one), nothing
  after it is committed, chunks already handed on are dropped, the model is not called again,
  and the first error is raised in the calling thread. A re-run converges as after any crash.
- **The model, one call at a time.** The writer thread calls the model once: the drift guard
  embeds its canary texts when it records them with the first commit. A model is one device
  (and a tokenizer is not safe to share between threads), so that call waits for the one in
  progress (:func:`one_model_call_at_a_time`).

Torch releases the GIL in its forward passes and LanceDB's writes run in Rust without it, so
threads are enough: no process, no copy of the vectors.
"""

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import BatchDone, Embedder, EncodeResult, embed_reporting
from qwen3_pipeline.engine.canary import DriftGuard

logger = logging.getLogger("qwen3_pipeline")

PIPELINE_DEPTH = 1
"""Chunks each hand-off holds: 1 overlaps reading, embedding and writing with at most two chunks
of vectors in memory; 0 runs the three steps of each chunk one after another (no thread)."""

_Item = TypeVar("_Item")
_Read = TypeVar("_Read")
_Prepared = TypeVar("_Prepared")
_Embedded = TypeVar("_Embedded")


class _Stopped(Exception):
    """The other side of a hand-off stopped without an error of its own: end quietly."""


class _Handoff(Generic[_Item]):
    """A bounded hand-off between two threads that stops both sides at the first error.

    An item counts against ``capacity`` from :meth:`put` until the consumer calls
    :meth:`done` (right after :meth:`get`, or after the item was processed): so a writer that
    marks a chunk done after its commit bounds what is in flight, commit included.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._cond = threading.Condition()
        self._items: deque[_Item] = deque()
        self._open = 0  # put and not yet done
        self._finished = False  # the producer put its last item
        self._stopped = False  # either side gave up: nothing more moves
        self.producer_error: BaseException | None = None
        self.consumer_error: BaseException | None = None

    def put(self, item: _Item) -> None:
        """Hand ``item`` on, waiting while ``capacity`` items are open.

        Raises:
            BaseException: The consumer's error, when it failed.
            _Stopped: The consumer stopped without one.
        """
        with self._cond:
            while self._open >= self._capacity and not self._stopped:
                self._cond.wait()
            self.check()
            self._items.append(item)
            self._open += 1
            self._cond.notify_all()

    def get(self) -> _Item | None:
        """The next item, waiting for it; None when there are no more (or the producer stopped).

        Raises:
            BaseException: The producer's error, when it failed.
        """
        with self._cond:
            while not self._items and not self._finished and not self._stopped:
                self._cond.wait()
            if self.producer_error is not None:
                raise self.producer_error
            if self._stopped or not self._items:
                return None
            return self._items.popleft()

    def done(self) -> None:
        """The consumer is done with an item it got: it no longer counts against capacity."""
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def finish(self) -> None:
        """The producer put its last item; the consumer gets the rest, then None."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def stop(self, *, producer_error: BaseException | None = None) -> None:
        """Stop both sides now: items not taken yet are dropped.

        Args:
            producer_error: Raised by the consumer's :meth:`get` (the producer failed).
        """
        with self._cond:
            self.producer_error = self.producer_error or producer_error
            self._stopped = True
            self._items.clear()
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The consumer failed: the producer's :meth:`put` and :meth:`check` raise ``error``."""
        with self._cond:
            self.consumer_error = self.consumer_error or error
            self._stopped = True
            self._items.clear()
            self._cond.notify_all()

    def check(self) -> None:
        """For the producer: raise the consumer's error, or :class:`_Stopped` if it stopped."""
        if self.consumer_error is not None:
            raise self.consumer_error
        if self._stopped:
            raise _Stopped


def run_pipeline(
    items: Iterable[_Read],
    *,
    prepare: Callable[[_Read], _Prepared],
    embed: Callable[[_Prepared], _Embedded],
    write: Callable[[_Embedded], None],
    depth: int = PIPELINE_DEPTH,
) -> None:
    """Run ``write(embed(prepare(item)))`` for each item, the three steps overlapping.

    ``prepare`` runs on a reader thread, ``embed`` on the calling thread, ``write`` on a
    writer thread, each on a different item; the writes happen one at a time, in the order of
    ``items``. ``items`` is iterated on the reader thread (and closed there, if it is a
    generator).

    Args:
        items: The chunks, in commit order.
        prepare: What can be done before the model, reading only.
        embed: The model call.
        write: The commit (and everything counted after it).
        depth: Items each hand-off holds (the model runs at most ``depth + 1`` items ahead of
            the last finished write); 0 runs the steps one after another on this thread.

    Raises:
        ConfigError: ``depth`` is negative.
        BaseException: The first error of any step, or the interrupt that stopped the run;
            nothing is written after it.

    Example:
        >>> written = []
        >>> run_pipeline(range(4), prepare=str, embed=str.upper, write=written.append)
        >>> written
        ['0', '1', '2', '3']
    """
    if depth < 0:
        raise ConfigError(f"the pipeline depth must be >= 0, got {depth}")
    if depth == 0:
        for item in items:
            write(embed(prepare(item)))
        return
    ready: _Handoff[_Prepared] = _Handoff(depth)
    to_write: _Handoff[_Embedded] = _Handoff(depth)
    reader = threading.Thread(
        target=_read_ahead, args=(items, prepare, ready), name="qwen3-apply-reader"
    )
    writer = threading.Thread(target=_write_all, args=(to_write, write), name="qwen3-apply-writer")
    reader.start()
    writer.start()
    try:
        while (prepared := ready.get()) is not None:
            ready.done()
            # A failed writer stops the model too: check before every call, not only when the
            # next chunk is handed over.
            to_write.check()
            to_write.put(embed(prepared))
        to_write.finish()
        writer.join()
        to_write.check()
    except BaseException as error:
        ready.stop()
        to_write.stop()
        other = to_write.consumer_error
        if other is not None and other is not error:
            logger.error("the apply's writer had failed too: %r", other)
        raise
    finally:
        # Whatever ended the run, the commit in progress ends before the error (or the
        # interrupt) goes on: atomic as it is, the process should not exit in its middle.
        writer.join()
        reader.join()


def _read_ahead(
    items: Iterable[_Read], prepare: Callable[[_Read], _Prepared], ready: _Handoff[_Prepared]
) -> None:
    iterator: Iterator[_Read] = iter(items)
    try:
        for item in iterator:
            ready.put(prepare(item))
        ready.finish()
    except _Stopped:
        pass
    except BaseException as error:
        ready.stop(producer_error=error)
    finally:
        # A generator (the spill reader) closes its file on this thread, now.
        close = getattr(iterator, "close", None)
        if callable(close):
            close()


def _write_all(to_write: _Handoff[_Embedded], write: Callable[[_Embedded], None]) -> None:
    try:
        while (item := to_write.get()) is not None:
            write(item)
            to_write.done()
    except BaseException as error:
        to_write.fail(error)


class _OneCallAtATime:
    """An embedder whose calls wait for each other (the model is one device)."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._lock = threading.RLock()

    @property
    def spec(self) -> EmbeddingSpec:
        """The wrapped embedder's spec."""
        return self.embedder.spec

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        """Embed ``texts`` once no other call is running."""
        with self._lock:
            return embed_reporting(self.embedder, list(texts), on_batch)

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        """Embed ``queries`` once no other call is running."""
        with self._lock:
            return self.embedder.embed_queries(queries)


@contextmanager
def one_model_call_at_a_time(guard: DriftGuard | None) -> Iterator[None]:
    """While the block runs, the model calls of ``guard`` (it wraps the model) wait for each other.

    The pipeline's writer thread calls the model through the guard (recording the canaries
    with the first commit) while the calling thread may be embedding the next chunk.

    Args:
        guard: The refresh's drift guard (None: nothing but the calling thread calls the model).
    """
    if guard is None:
        yield
        return
    model = guard.embedder
    guard.embedder = _OneCallAtATime(model)
    try:
        yield
    finally:
        guard.embedder = model
