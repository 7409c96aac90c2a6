"""Content-defined chunking of long documents, sized in Qwen tokens.

A long document is cut into chunks of at most ``tokens`` tokens (counted with the model's own
tokenizer, exactly as the encoder counts them), each embedded as its own row. Two properties
matter for a pipeline that keeps vectors in sync with a changing source:

* **Boundaries prefer structure.** `semantic-text-splitter`_ (Rust; Unicode sentence and word
  rules, CommonMark, tree-sitter) cuts the text into small *semantic units*: the largest
  section (paragraph, line, sentence, syntax node...) that fits a small capacity. Chunks are
  made of whole units, and a cut goes to the strongest boundary near it: before a new section
  rather than inside one, after a paragraph rather than a line, a line rather than a sentence;
  inside a sentence only when a single sentence is longer than a chunk.
* **Boundaries are content-defined.** Packing units left to right up to the size limit (what
  LangChain's and most text splitters do) makes every boundary depend on everything before
  it: an edit near the top shifts every later boundary and re-embeds the whole document.
  Here, whether a chunk ends after a unit depends only on the text within a window around
  that boundary (in the spirit of content-defined chunking in deduplicating storage), so an
  edit moves at most the boundaries around it and every other chunk keeps its exact text,
  hash and vector.

The rule. Each boundary between two units gets a score: its structural level (a blank line
before a Markdown heading or comment block, a blank line before an unindented line, a blank
line, a line break before an unindented line, a line break, a sentence end, anything else)
and, to break ties within a level, the xxh3_64 hash of the 16 characters around it (as the
rolling hash of byte-level content-defined chunking does: an edit inside a unit changes no
score). With ``budget = tokens - overlap`` and ``window = 0.35 * budget``::

    cut after unit i  iff  no other boundary within `window` tokens of it scores better
                           (and it is at least `window` tokens from both ends)

so cuts are more than ``window`` tokens apart (chunks hold about 60% of the budget on
average) and each is decided by the ``2 * window`` tokens around it: an edit can move only
the boundaries within ``window`` tokens of it, so it re-embeds one or two chunks, rarely
three. A stretch between two cuts that still exceeds the budget (no good boundary in a long
run) is cut again inside that stretch only, at its best-scoring boundaries. A document that
fits in ``tokens`` is a single chunk. Overlap prefixes each chunk with trailing
whole units (at most ``overlap`` tokens) of the chunk before it.

Everything is pure: no model, no I/O. The engine calls
:func:`~qwen3_pipeline.chunking.rows.chunk_rows` on rendered, sanitised documents and
:func:`~qwen3_pipeline.chunking.diff.diff_chunks` against the stored chunks of changed
documents. The settings are :class:`~qwen3_pipeline.chunking.config.ChunkingConfig`; the
tokenizer comes from :mod:`qwen3_pipeline.chunking.tokenizer`.

.. _semantic-text-splitter: https://github.com/benbrandt/text-splitter

Example:
    >>> chunker = Chunker(ChunkingConfig(tokens=64))
    >>> chunks = chunker.chunk("A short document.")
    >>> [(c.seq, c.start, c.end, c.tokens) for c in chunks]
    [(0, 0, 17, 4)]
"""

import collections
import functools
import importlib
import itertools
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from qwen3_pipeline.chunking.config import ChunkingConfig
from qwen3_pipeline.chunking.tokenizer import backend_tokenizer, packaged_tokenizer
from qwen3_pipeline.core.changes import content_hash, sanitize_text
from qwen3_pipeline.core.errors import ConfigError, InputDataError, Qwen3PipelineError

# A change to how text is cut (these values, the boundary levels, the packing rule) must bump
# ALGORITHM in qwen3_pipeline.chunking.config, so the settings fingerprint changes with it.

# Semantic units are cut by characters (the Rust splitter never calls the tokenizer, which is
# ~100x faster than counting tokens for every candidate); a unit holds at most this many
# characters per token of budget, about a quarter of the budget for English prose and code.
_UNIT_CHARS_PER_TOKEN = 1
# The splitter returns a section as soon as it holds an eighth of that: larger sections stand
# alone (their boundaries are the text's own), only runs of tiny ones (short lines) are
# grouped. A lower bound of 1 would be fully local but makes the library emit one-character
# units, in quadratic time, from any section longer than the capacity (a long sentence).
_UNIT_MIN_DIVISOR = 8
# Runs of this many units' worth of characters without whitespace (or of whitespace only) are
# cut by a fixed stride instead (see Chunker._pieces_many).
_LONG_RUN_UNITS = 4
# Scripts written without spaces (CJK ideographs, kana, hangul) are left to the library, whose
# dictionary word segmentation finds their structure.
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff"
# A unit counted above this share of the budget (CJK, emoji, long digit runs: many tokens per
# character) is cut again by the same splitter counting Qwen tokens.
_UNIT_MAX_SHARE = 0.5
# Documents up to this many characters per token of the limit are first counted whole: most
# fit in one chunk, which then costs one tokenisation and no splitting.
_FAST_PATH_CHARS_PER_TOKEN = 6

# A cut is more than this share of the budget away from any better-scoring boundary, so chunks
# hold at least it. Larger fills chunks better (0.25: 48% of the budget on average, 0.35: 61%,
# 0.4: 65% on pydoc topics and module sources) but leaves more stretches over the budget to
# cut by the fallback, and an edit then moves more chunks.
_WINDOW_SHARE = 0.35
_TOP_LEVEL = 6  # the strongest boundary level (see _boundary_level)
_HEADING = re.compile(r"#+(\s|$)")
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f\u2026][\"')\]\u00bb\u201d\u2019]*$")
_HASH_SCALE = 2.0**-64
# Characters hashed on each side of a boundary: the fewer, the fewer edits touch a boundary's
# score (32 re-embedded a second chunk for 2% of single typo fixes, 8 for none); equal
# contexts tie, and ties go to the earlier boundary.
_CONTEXT = 8


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of a document.

    Spans are Python string indices (code points) into the sanitised document text
    (:func:`qwen3_pipeline.core.changes.sanitize_text`, a no-op on text the sources rendered).

    Attributes:
        seq: Position of the chunk in its document, from 0.
        start: Where the chunk's text starts, overlap included.
        core_start: Where the chunk's own text starts: ``[start, core_start)`` repeats the end
            of the previous chunk (empty without overlap). The ``[core_start, end)`` spans of
            a document's chunks are contiguous and cover it exactly.
        end: Where the chunk ends (exclusive).
        text: ``document[start:end]``, what is embedded.
        hash: :func:`~qwen3_pipeline.core.changes.content_hash` of ``text``.
        tokens: Tokens of ``text`` (Qwen tokenizer, no special tokens), at most the limit.
    """

    seq: int
    start: int
    core_start: int
    end: int
    text: str
    hash: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Unit:
    """One semantic unit (a paragraph, line, sentence or syntax node that fits the capacity).

    Attributes:
        start: Start of the unit in the sanitised document (code points).
        end: End of the unit (exclusive).
        tokens: Tokens of the unit's text on its own.
    """

    start: int
    end: int
    tokens: int


class Chunker:
    r"""Cuts documents into content-defined chunks of at most ``config.tokens`` tokens.

    Deterministic and pure: the same text and settings always give the same chunks. Picklable
    (the splitter is rebuilt on unpickling), and safe to share between threads.

    Args:
        config: The chunking settings.
        tokenizer: The model's tokenizer: a ``tokenizers.Tokenizer`` or a transformers fast
            tokenizer (e.g. ``Qwen3Encoder(spec, load_model=False)._tokenizer``). ``None``
            uses :func:`packaged_tokenizer`, the real Qwen3 tokenizer.

    Raises:
        ConfigError: ``splitter="code"`` and the tree-sitter grammar is not installed, or the
            tokenizer is of an unsupported type.

    Example:
        >>> chunker = Chunker(ChunkingConfig(tokens=32))
        >>> text = "First paragraph, short.\\n\\n" * 12
        >>> chunks = chunker.chunk(text)
        >>> "".join(text[c.core_start:c.end] for c in chunks) == text
        True
        >>> all(c.tokens <= 32 for c in chunks)
        True
    """

    def __init__(self, config: ChunkingConfig, tokenizer: Any = None) -> None:
        self._config = config
        self._tokenizer = backend_tokenizer(
            packaged_tokenizer() if tokenizer is None else tokenizer
        )
        budget = config.budget
        self._window = max(1, int(budget * _WINDOW_SHARE))
        self._unit_chars = max(8, budget * _UNIT_CHARS_PER_TOKEN)
        self._unit_max_tokens = max(2, int(budget * _UNIT_MAX_SHARE))
        run = max(64, _LONG_RUN_UNITS * self._unit_chars)
        self._long_run = re.compile(rf"[^\s{_CJK}]{{{run},}}|\s{{{run},}}")
        # Stride pieces of at most a quarter of the unit token cap in characters: a character
        # is at most 4 tokens (byte-level BPE), so a piece never needs cutting again.
        self._stride = max(1, self._unit_max_tokens // 4)
        self._language = _load_language(config) if config.splitter == "code" else None
        self._splitter = self._make_splitter(
            (max(1, self._unit_chars // _UNIT_MIN_DIVISOR), self._unit_chars)
        )
        self._token_splitter: Any = None  # built on first oversize unit (rare)

    @property
    def config(self) -> ChunkingConfig:
        """The chunking settings."""
        return self._config

    def __getstate__(self) -> dict[str, Any]:
        # The Rust splitters do not pickle; they are rebuilt from the settings.
        return {"config": self._config, "tokenizer": self._tokenizer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        Chunker.__init__(self, state["config"], state["tokenizer"])

    def _make_splitter(
        self, capacity: tuple[int, int], counter: Callable[[str], int] | None = None
    ) -> Any:
        """A splitter of the configured kind, by characters or by ``counter``.

        The capacity is a range with a small lower bound: the library returns a section as
        soon as it reaches the lower bound, i.e. the largest structural section from the cursor
        that fits, and merges only sections below the lower bound (a greedy merge of larger
        ones would make unit boundaries depend on everything before them, the very problem
        content-defined chunking avoids). ``trim=False`` keeps every character, so the units
        tile the document.
        """
        import semantic_text_splitter as sts

        kind = self._config.splitter
        if counter is None:
            if kind == "code":
                return sts.CodeSplitter(self._language, capacity, trim=False)
            cls = sts.MarkdownSplitter if kind == "markdown" else sts.TextSplitter
            return cls(capacity, trim=False)
        if kind == "code":
            return sts.CodeSplitter.from_callback(self._language, counter, capacity, trim=False)
        cls = sts.MarkdownSplitter if kind == "markdown" else sts.TextSplitter
        return cls.from_callback(counter, capacity, trim=False)

    # -- counting -------------------------------------------------------------------------

    def count_tokens(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens of each text as the model counts them (no special tokens), as int64."""
        if not texts:
            return np.zeros(0, dtype=np.int64)
        encoded = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return np.fromiter((len(e.ids) for e in encoded), dtype=np.int64, count=len(encoded))

    def _count_one(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    # -- units ----------------------------------------------------------------------------

    def units(self, text: str) -> list[Unit]:
        """Return the semantic units of ``text`` (sanitised first), which chunks are made of.

        Whitespace-only sections join the unit before them, so every unit (but possibly the
        first) starts with content and its trailing whitespace tells how strong the boundary
        after it is. Exposed for benchmarks and comparisons (greedy packing of the same units).
        """
        text = sanitize_text(text)
        return self._units_many([text])[0]

    def _units_many(self, texts: Sequence[str]) -> list[list[Unit]]:
        spans = [
            _to_line_starts(text, _merge_blank(text, pieces, 2 * self._unit_chars))
            for text, pieces in zip(texts, self._pieces_many(texts), strict=True)
        ]
        pieces_text = [text[s:e] for text, doc in zip(texts, spans, strict=True) for s, e in doc]
        counts = self.count_tokens(pieces_text).tolist()
        out: list[list[Unit]] = []
        at = 0
        for text, doc in zip(texts, spans, strict=True):
            units: list[Unit] = []
            for s, e in doc:
                n = counts[at]
                at += 1
                if n > self._unit_max_tokens:
                    units.extend(self._split_oversize(text, s, e))
                else:
                    units.append(Unit(s, e, n))
            out.append(units)
        return out

    def _pieces_many(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """The splitter's sections of each text as ``(start, end)``, tiling the text.

        Runs of several units' worth of characters without whitespace (or of whitespace
        only; CJK text excepted) have no structure to respect, and the library's time grows
        with the square of such a run: they are cut by a fixed stride (never right before a
        combining mark) and only the text between them goes to the library, in one batch.
        """
        segments: list[list[tuple[int, int, bool]]] = []
        for text in texts:
            doc: list[tuple[int, int, bool]] = []
            at = 0
            for match in self._long_run.finditer(text):
                if match.start() > at:
                    doc.append((at, match.start(), False))
                doc.append((match.start(), match.end(), True))
                at = match.end()
            if at < len(text):
                doc.append((at, len(text), False))
            segments.append(doc)
        plain = [
            text[s:e]
            for text, doc in zip(texts, segments, strict=True)
            for s, e, run in doc
            if not run
        ]
        split = iter(self._splitter.chunk_all_indices(plain) if plain else [])
        out: list[list[tuple[int, int]]] = []
        for text, doc in zip(texts, segments, strict=True):
            pieces: list[tuple[int, int]] = []
            for s, e, run in doc:
                if run:
                    pieces.extend(_stride(text, s, e, self._stride))
                else:
                    pieces.extend((s + a, s + b) for a, b in _spans(text[s:e], next(split)))
            out.append(pieces)
        return out

    def _split_oversize(self, text: str, start: int, end: int) -> list[Unit]:
        """Cut a unit with too many tokens per character again, counting Qwen tokens."""
        if self._token_splitter is None:
            most = max(1, self._unit_max_tokens // 2)
            self._token_splitter = self._make_splitter(
                (max(1, most // _UNIT_MIN_DIVISOR), most), self._count_one
            )
        pieces = self._token_splitter.chunk_indices(text[start:end])
        spans = [(start + s, start + e) for s, e in _spans(text[start:end], pieces)]
        counts = self.count_tokens([text[s:e] for s, e in spans]).tolist()
        return [Unit(s, e, n) for (s, e), n in zip(spans, counts, strict=True)]

    # -- chunking -------------------------------------------------------------------------

    def chunk(self, text: str) -> list[Chunk]:
        """Cut one document into chunks; see :meth:`chunk_many`."""
        return self.chunk_many([text])[0]

    def chunk_many(self, texts: Sequence[str]) -> list[list[Chunk]]:
        """Cut documents into chunks, batching the splitter and tokenizer calls.

        A document that fits in one chunk is one chunk (its whole text); an empty or
        whitespace-only document has no chunks (nothing to embed, as the engine skips it).

        Args:
            texts: Rendered documents. They are passed through
                :func:`~qwen3_pipeline.core.changes.sanitize_text` (a no-op on sanitised text),
                and spans index the sanitised text.

        Returns:
            One list of chunks per document, in document order.

        Raises:
            InputDataError: A text is not a string.
        """
        docs = [sanitized_document(t) for t in texts]
        out: list[list[Chunk]] = [[] for _ in docs]
        limit = self._config.tokens
        fast_chars = limit * _FAST_PATH_CHARS_PER_TOKEN
        todo = [i for i, t in enumerate(docs) if t and not t.isspace()]
        short = [i for i in todo if len(docs[i]) <= fast_chars]
        long = [i for i in todo if len(docs[i]) > fast_chars]
        for i, n in zip(short, self.count_tokens([docs[i] for i in short]).tolist(), strict=True):
            if n <= limit:
                out[i] = [Chunk(0, 0, 0, len(docs[i]), docs[i], content_hash(docs[i]), n)]
            else:
                long.append(i)
        long.sort()
        for i, chunks in zip(long, self._chunk_long([docs[i] for i in long]), strict=True):
            out[i] = chunks
        return out

    def _chunk_long(self, docs: list[str]) -> list[list[Chunk]]:
        if not docs:
            return []
        units_per_doc = self._units_many(docs)
        scores = [_scores(doc, units) for doc, units in zip(docs, units_per_doc, strict=True)]
        plans = [
            self._with_overlap(units, self._pack(units, score))
            for units, score in zip(units_per_doc, scores, strict=True)
        ]
        spans = [
            [_span(units, p) for p in plan]
            for units, plan in zip(units_per_doc, plans, strict=True)
        ]
        flat = [
            doc[s:e] for doc, doc_spans in zip(docs, spans, strict=True) for s, _, e in doc_spans
        ]
        counts = iter(self.count_tokens(flat).tolist())
        out: list[list[Chunk]] = []
        for d, doc in enumerate(docs):
            doc_counts = [next(counts) for _ in spans[d]]
            # Exact counts of the chunk texts: a concatenation can (rarely) take more tokens
            # than its units did apart, and the limit is a promise, so cut such a chunk again.
            while any(n > self._config.tokens for n in doc_counts):
                plans[d] = self._refit(units_per_doc[d], scores[d], plans[d], doc_counts)
                spans[d] = [_span(units_per_doc[d], p) for p in plans[d]]
                doc_counts = self.count_tokens([doc[s:e] for s, _, e in spans[d]]).tolist()
            out.append(
                [
                    Chunk(seq, s, core, e, doc[s:e], content_hash(doc[s:e]), n)
                    for seq, ((s, core, e), n) in enumerate(zip(spans[d], doc_counts, strict=True))
                ]
            )
        return out

    def _pack(self, units: list[Unit], score: list[float]) -> list[tuple[int, int]]:
        """Group units into chunks ``[first, last)`` by the content-defined rule."""
        n = len(units)
        ends = list(itertools.accumulate(u.tokens for u in units))
        if ends[-1] <= self._config.tokens:
            return [(0, n)]  # fits whole, as the fast path would have said
        cuts = _local_minima(score, ends, 0, n, self._window)
        out: list[tuple[int, int]] = []
        for first, last in itertools.pairwise([0, *cuts, n]):
            if first == 0 and last < n:
                # Anchored at the stretch's fixed end: text inserted at the top of a
                # document, or appended at its end, re-cuts only the piece it touches.
                out.extend(self._anchored(score, ends, first, last, from_end=True))
            elif last == n and first > 0:
                out.extend(self._anchored(score, ends, first, last, from_end=False))
            else:
                out.extend(self._subdivide(score, ends, first, last))
        return out

    def _subdivide(
        self, score: list[float], ends: list[int], first: int, last: int
    ) -> list[tuple[int, int]]:
        """Cut a stretch between two content-defined cuts that exceeds the budget.

        Top-down: the stretch is cut at its best-scoring boundary (at least half a window
        from both of its ends; among equal scores, the one nearest the middle), and each side
        that still exceeds the budget again. A cut depends on the units of the piece it cuts
        only, so an edit re-cuts the pieces around it, not the whole stretch (rare anyway: it
        needs a run longer than the budget without a good boundary, e.g. one very long
        paragraph or repeated lines).
        """
        budget, margin = self._config.budget, self._window // 2
        out: list[tuple[int, int]] = []
        todo = [(first, last)]
        while todo:
            a, b = todo.pop()
            base = ends[a - 1] if a else 0
            size = ends[b - 1] - base
            if size <= budget:
                out.append((a, b))
                continue
            inner = [k for k in range(a, b - 1) if margin <= ends[k] - base <= size - margin]
            middle = base + size / 2
            cut = min(inner or range(a, b - 1), key=lambda k: (score[k], abs(ends[k] - middle), k))
            todo += [(cut + 1, b), (a, cut + 1)]  # the left piece is finished first
        return out

    def _anchored(
        self, score: list[float], ends: list[int], first: int, last: int, *, from_end: bool
    ) -> list[tuple[int, int]]:
        """Cut a first or last stretch that exceeds the budget, working from its inner end.

        Each piece takes the best-scoring boundary that leaves it between half the budget and
        the budget, counted from the stretch's cut (its start, or for the first stretch its
        end), so pieces far from the document's edge never depend on what was added there.
        """
        budget = self._config.budget

        def size(a: int, b: int) -> int:  # tokens of units [a, b)
            return ends[b - 1] - (ends[a - 1] if a else 0)

        pieces: list[tuple[int, int]] = []
        a, b = first, last
        while size(a, b) > budget:
            if from_end:  # cut before unit k + 1, the piece [k + 1, b) within the budget
                fits = [k for k in range(a, b - 1) if budget // 2 <= size(k + 1, b) <= budget]
                cut = min(fits, key=lambda k: (score[k], -k)) + 1 if fits else b - 1
                pieces.append((cut, b))
                b = cut
            else:
                fits = [k for k in range(a, b - 1) if budget // 2 <= size(a, k + 1) <= budget]
                cut = min(fits, key=lambda k: (score[k], k)) + 1 if fits else a + 1
                pieces.append((a, cut))
                a = cut
        pieces.append((a, b))
        return sorted(pieces)

    def _with_overlap(
        self, units: list[Unit], plan: list[tuple[int, int]]
    ) -> list[tuple[int, int, int]]:
        """Return ``(prefix_first, first, last)`` per chunk, adding the overlap.

        The overlap is trailing whole units of the previous chunk (never all of it), at most
        ``overlap`` tokens together.
        """
        out = []
        for c, (first, last) in enumerate(plan):
            prefix = first
            if c and self._config.overlap:
                room, floor = self._config.overlap, plan[c - 1][0]
                while prefix - 1 > floor and units[prefix - 1].tokens <= room:
                    room -= units[prefix - 1].tokens
                    prefix -= 1
            out.append((prefix, first, last))
        return out

    def _refit(
        self,
        units: list[Unit],
        score: list[float],
        plan: list[tuple[int, int, int]],
        counts: list[int],
    ) -> list[tuple[int, int, int]]:
        """Cut every over-limit chunk once more (or drop its overlap when it is one unit)."""
        out: list[tuple[int, int, int]] = []
        for (prefix, first, last), n in zip(plan, counts, strict=True):
            if n <= self._config.tokens:
                out.append((prefix, first, last))
            elif prefix < first:
                out.append((first, first, last))
            elif last - first >= 2:
                cut = min(range(first, last - 1), key=lambda k: (score[k], k)) + 1
                out.extend([(first, first, cut), (cut, cut, last)])
            else:  # pragma: no cover - one unit is counted on its own when it is made
                raise Qwen3PipelineError(f"a single unit has {n} tokens, over the limit")
        return out


def _span(units: list[Unit], plan: tuple[int, int, int]) -> tuple[int, int, int]:
    prefix, first, last = plan
    return units[prefix].start, units[first].start, units[last - 1].end


def _local_minima(
    score: list[float], ends: list[int], first: int, last: int, window: int
) -> list[int]:
    """Return the content-defined cuts in units ``[first, last)``.

    A cut goes after unit ``k`` when no other eligible boundary within ``window`` tokens of it
    scores lower (ties go to the earlier unit). Eligible boundaries are at least ``window``
    tokens from both ends of the stretch. Two cuts are thus more than ``window`` tokens apart,
    and whether a cut is made depends only on the units within ``window`` tokens of it. Two
    sliding-window minima (monotonic deques) keep this linear in the number of units.

    Returns:
        The unit indices that start a new chunk (``k + 1`` for a cut after ``k``), ascending.
    """
    base = ends[first - 1] if first else 0
    top = ends[last - 1]
    eligible = [
        k for k in range(first, last - 1) if window <= ends[k] - base <= top - base - window
    ]
    keys = [(score[k], k) for k in eligible]
    pos = [ends[k] for k in eligible]
    m = len(eligible)
    best_left = [False] * m
    queue: collections.deque[int] = collections.deque()
    for i in range(m):
        while queue and keys[queue[-1]] > keys[i]:
            queue.pop()
        queue.append(i)
        while pos[queue[0]] < pos[i] - window:
            queue.popleft()
        best_left[i] = queue[0] == i
    cuts: list[int] = []
    queue.clear()
    for i in reversed(range(m)):
        while queue and keys[queue[-1]] > keys[i]:
            queue.pop()
        queue.append(i)
        while pos[queue[0]] > pos[i] + window:
            queue.popleft()
        if best_left[i] and queue[0] == i:
            cuts.append(eligible[i] + 1)
    cuts.reverse()
    return cuts


def _scores(text: str, units: list[Unit]) -> list[float]:
    """The score of the boundary after each unit: lower is a better place to cut.

    ``(6 - level) + hash``: the structural level of the boundary (see :func:`_boundary_level`)
    decides, and among boundaries of one level a hash of the text right around the boundary
    (xxh3_64 of up to ``_CONTEXT`` characters on each side, within the two units, as a
    fraction of 2**64) does. Hashing only the text at the boundary, as the rolling hash of
    byte-level content-defined chunking does, means an edit in the middle of a unit changes
    no score at all. The document's end scores ``inf`` (it is never a candidate).
    """
    out: list[float] = []
    for unit, following in itertools.pairwise(units):
        cut = unit.end
        context = text[max(unit.start, cut - _CONTEXT) : min(following.end, cut + _CONTEXT)]
        h = xxhash.xxh3_64_intdigest(context.encode("utf-8")) * _HASH_SCALE
        level = _boundary_level(
            text[max(unit.start, cut - 256) : cut], text[following.start : following.start + 64]
        )
        out.append(_TOP_LEVEL - level + h)
    out.append(np.inf)
    return out


def _boundary_level(piece: str, head: str) -> int:
    """How strong the boundary between ``piece`` and a unit starting with ``head`` is.

    6: a blank line before an unindented ``#`` line (a Markdown heading, a comment block);
    5: a blank line before another unindented line (a new section or top-level statement);
    4: a blank line; 3: a line break before an unindented line; 2: a line break; 1: a sentence
    end; 0: anything else (inside a sentence).
    """
    body = piece.rstrip()
    content = head.lstrip()
    gap = piece[len(body) :] + head[: len(head) - len(content)]
    newlines = gap.count("\n")
    if not newlines:
        return 1 if _SENTENCE_END.search(body) else 0
    if not (content and gap.endswith("\n")):  # the next line is indented (or nothing follows)
        return 4 if newlines >= 2 else 2
    if newlines == 1:
        return 3
    return 6 if _HEADING.match(content) else 5


def sanitized_document(text: Any) -> str:
    """Return a document's text sanitised (:func:`~qwen3_pipeline.core.changes.sanitize_text`).

    Raises:
        InputDataError: ``text`` is not a string (a null document should be rendered first).
    """
    if not isinstance(text, str):
        raise InputDataError(
            f"chunking needs document texts as str, got {type(text).__name__}; render and "
            "sanitise the documents first (nulls become empty texts)"
        )
    return sanitize_text(text)


def _spans(text: str, pieces: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """Check that the splitter's pieces tile ``text`` and return their ``(start, end)``."""
    spans: list[tuple[int, int]] = []
    at = 0
    for start, piece in pieces:
        if start != at:
            raise Qwen3PipelineError(
                f"the splitter returned a piece at {start} where {at} was expected; "
                "semantic-text-splitter must be used with trim=False"
            )
        at = start + len(piece)
        spans.append((start, at))
    if at != len(text):
        raise Qwen3PipelineError(f"the splitter's pieces cover {at} of {len(text)} characters")
    return spans


def _merge_blank(text: str, spans: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Join whitespace-only pieces to the piece before them (leading ones to the next).

    A join that would make a piece longer than ``limit`` characters is skipped, so a long
    whitespace run stays in pieces of its own rather than one huge unit.
    """
    out: list[tuple[int, int]] = []
    pending: int | None = None
    for start, end in spans:
        if text[start:end].isspace():
            if out and end - out[-1][0] <= limit:
                out[-1] = (out[-1][0], end)
                continue
            if not out and (pending is None or end - pending <= limit):
                pending = start if pending is None else pending
                continue
        if pending is not None and end - pending > limit:
            out.append((pending, start))
            pending = None
        out.append((start if pending is None else pending, end))
        pending = None
    if pending is not None:
        out.append((pending, len(text)))
    return out


def _to_line_starts(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Move each boundary that lies in whitespace holding a line break to the next line start.

    The splitters put a line break at the end of one unit or at the start of the next, and a
    syntax-tree unit starts at its first token, leaving the indentation to the unit before.
    Snapping to the line start makes every chunk end with its line break and start with a
    whole line; the move stays inside the whitespace, so it depends on nothing else.
    """
    out = list(spans)
    for i in range(1, len(out)):
        (prev_start, cut), (_, next_end) = out[i - 1], out[i]
        left, right = cut, cut
        while left > prev_start and text[left - 1].isspace():
            left -= 1
        while right < next_end and text[right].isspace():
            right += 1
        newline = text.rfind("\n", left, right)
        if newline >= 0 and prev_start < newline + 1 < next_end and newline + 1 != cut:
            out[i - 1] = (prev_start, newline + 1)
            out[i] = (newline + 1, next_end)
    return out


def _stride(text: str, start: int, end: int, step: int) -> list[tuple[int, int]]:
    """Cut ``text[start:end]`` every ``step`` characters, never before a combining mark."""
    out: list[tuple[int, int]] = []
    at = start
    while end - at > step:
        cut = at + step
        # Keep a grapheme together, unless it is absurdly long (stacked combining marks).
        while cut < min(end, at + 2 * step) and _joins_previous(text[cut]):
            cut += 1
        out.append((at, cut))
        at = cut
    out.append((at, end))
    return out


def _joins_previous(char: str) -> bool:
    """Whether ``char`` belongs to the grapheme before it (a mark, a joiner, a modifier)."""
    return (
        unicodedata.category(char) in {"Mn", "Mc", "Me"}
        or char in "\u200c\u200d"
        or "\ufe00" <= char <= "\ufe0f"
        or "\U0001f3fb" <= char <= "\U0001f3ff"
    )


@functools.lru_cache(maxsize=32)
def check_chunking(config: ChunkingConfig) -> None:
    """Check that documents can be cut with ``config`` here, before anything is written.

    Builds a :class:`Chunker` once per settings: the splitter library, the tree-sitter grammar
    of ``splitter="code"`` and the packaged tokenizer must all load. The refresh plan calls it
    first, so a missing grammar is refused before a table (and its spec) exists.

    Raises:
        ConfigError: The splitter library or the grammar is not installed.
        ModelLoadError: The packaged tokenizer does not load.

    Example:
        >>> check_chunking(ChunkingConfig(tokens=64, splitter="code", code_language="cobol"))
        Traceback (most recent call last):
        ...
        qwen3_pipeline.core.errors.ConfigError: splitter='code' with code_language='cobol' ...
    """
    Chunker(config)


def _load_language(config: ChunkingConfig) -> Any:
    """The tree-sitter language object of ``config.code_language``.

    Raises:
        ConfigError: The grammar package is not installed, or is not a tree-sitter grammar.
    """
    name = f"tree_sitter_{config.code_language}"
    package = name.replace("_", "-")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(
            f"splitter='code' with code_language={config.code_language!r} needs the tree-sitter "
            f"grammar package {package}, which is not installed: pip install {package} "
            "(python's grammar comes with the 'chunking' extra: pip install "
            "'qwen3-pipeline[chunking]')"
        ) from e
    language = getattr(module, "language", None)
    if not callable(language):
        raise ConfigError(
            f"module {name} (code_language={config.code_language!r}) is not a tree-sitter "
            f"grammar package: it has no language(); install {package}"
        )
    return language()
