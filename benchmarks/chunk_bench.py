"""Chunking: splitter libraries compared, then chunk-level re-embedding under realistic edits.

Part 1, splitters. On the demo corpus (the standard library's docstrings, rendered
``"{title}\\n\\n{body}"``) and on long documents (pydoc's topic pages and standard-library
module sources), each cut into chunks of at most ``--tokens`` Qwen tokens:

* semantic-text-splitter (``TextSplitter.from_huggingface_tokenizer``, Rust),
* semchunk (``chunkerify`` with a Qwen token counter, Python),
* ours (``qwen3_pipeline.chunking.chunker.Chunker``: semantic-text-splitter's units,
content-defined).

It prints documents per second, chunk fill (mean tokens / limit), the largest chunk, and where
chunk ends fall: at a blank line (paragraph/block), a line break, a sentence end, or inside a
sentence.

Part 2, edits. A corpus of long documents (pydoc topics + module sources) is indexed, then
edited step by step: a no-op, one sentence rewritten in the middle of a ~50-chunk document, a
paragraph inserted at the top, a typo fixed, text appended, a document deleted, a document
added. After each edit three pipelines sync and the embedder counts the texts it is given
(a fake that returns constant vectors: the figures are chunk counts and pipeline overhead,
not model time):

* ours: the real engine, ``refresh()`` of a chunk table in LanceDB (``SourceConfig(chunking=...)``):
  changed documents (by content hash) are re-chunked, every stored chunk whose text is
  unchanged keeps its vector, and each batch of documents is replaced in one commit (the
  times include LanceDB's reads and commits);
* LangChain: ``langchain_core.indexing.index()`` with an ``InMemoryRecordManager``,
  ``cleanup="incremental"``, over the same units packed greedily (what LangChain's text
  splitters do), all documents passed on every sync as its docs describe;
* pgai: every chunk of each changed document is re-embedded (same greedy chunks).

    python benchmarks/chunk_bench.py                      # tokens 512, overlap 0
    python benchmarks/chunk_bench.py --tokens 256 --overlap 32 --skip-splitters
"""

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen3_pipeline.chunking.chunker import Chunker  # noqa: E402
from qwen3_pipeline.chunking.config import ChunkingConfig  # noqa: E402
from qwen3_pipeline.chunking.tokenizer import packaged_tokenizer  # noqa: E402
from qwen3_pipeline.core.changes import content_hash  # noqa: E402
from qwen3_pipeline.core.spec import EmbeddingSpec  # noqa: E402
from qwen3_pipeline.demo.corpus import stdlib_docstrings, stdlib_root  # noqa: E402
from qwen3_pipeline.engine.refresh import refresh  # noqa: E402
from qwen3_pipeline.sources import ArrowSource, SourceConfig  # noqa: E402
from qwen3_pipeline.testing import FakeEmbedder  # noqa: E402

MODULES = (
    "argparse.py",
    "typing.py",
    "inspect.py",
    "dataclasses.py",
    "functools.py",
    "subprocess.py",
    "json/decoder.py",
    "csv.py",
    "pathlib.py",
    "logging/__init__.py",
    "enum.py",
    "textwrap.py",
)
_SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


# ----------------------------------------------------------------------------- corpora


def demo_corpus() -> list[str]:
    return [f"{r.title}\n\n{r.body}" for r in stdlib_docstrings()]


def long_corpus() -> dict[str, str]:
    from pydoc_data.topics import topics

    docs = {f"topic:{k}": v for k, v in sorted(topics.items()) if len(v) >= 4000}
    root = stdlib_root()
    docs.update({f"module:{m}": (root / m).read_text(encoding="utf-8") for m in MODULES})
    return docs


# ----------------------------------------------------------------------------- part 1


def boundary_kind(text: str, pos: int) -> str:
    before, after = text[:pos], text[pos:]
    body = before.rstrip()
    gap = before[len(body) :] + after[: len(after) - len(after.lstrip())]
    newlines = gap.count("\n")
    if newlines >= 2:
        return "para"
    if newlines == 1:
        return "line"
    return "sentence" if _SENTENCE_END.search(body) else "mid"


def splitter_row(
    name: str, docs: list[str], split: Callable[[list[str]], list[list[tuple[int, int]]]], limit
) -> str:
    tok = packaged_tokenizer()
    started = time.perf_counter()
    spans = split(docs)
    elapsed = time.perf_counter() - started
    texts = [doc[s:e] for doc, doc_spans in zip(docs, spans, strict=True) for s, e in doc_spans]
    counts = np.array([len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False)])
    kinds = {"para": 0, "line": 0, "sentence": 0, "mid": 0}
    for doc, doc_spans in zip(docs, spans, strict=True):
        for _, end in doc_spans:
            if doc[end:].strip():  # not the end of the document
                kinds[boundary_kind(doc, end)] += 1
    cuts = max(1, sum(kinds.values()))
    shares = "  ".join(f"{100 * n / cuts:5.1f}" for n in kinds.values())
    return (
        f"{name:<24} {len(docs) / elapsed:>9,.0f} {len(texts):>7} {counts.mean() / limit:>5.2f} "
        f"{counts.max():>5}   {shares}"
    )


def part_splitters(tokens: int) -> None:
    import semchunk
    from semantic_text_splitter import TextSplitter

    tok = packaged_tokenizer()
    sts = TextSplitter.from_huggingface_tokenizer(tok, tokens)
    sem = semchunk.chunkerify(lambda t: len(tok.encode(t, add_special_tokens=False).ids), tokens)
    ours = Chunker(ChunkingConfig(tokens=tokens), tok)

    def run_sts(docs: list[str]) -> list[list[tuple[int, int]]]:
        return [[(s, s + len(c)) for s, c in doc] for doc in sts.chunk_all_indices(docs)]

    def run_sem(docs: list[str]) -> list[list[tuple[int, int]]]:
        return [sem(doc, offsets=True)[1] for doc in docs]

    def run_ours(docs: list[str]) -> list[list[tuple[int, int]]]:
        return [[(c.core_start, c.end) for c in doc] for doc in ours.chunk_many(docs)]

    for title, docs in (
        ("demo corpus (stdlib docstrings)", demo_corpus()),
        ("long documents (pydoc topics + module sources)", list(long_corpus().values())),
    ):
        size = sum(map(len, docs)) / 1e6
        print(f"\n{title}: {len(docs)} documents, {size:.2f} MB, chunks of <= {tokens} tokens")
        print(
            f"{'splitter':<24} {'docs/s':>9} {'chunks':>7} {'fill':>5} {'max':>5}   "
            f"ends at: {'para':>5} {'line':>5} {'sent.':>5} {'mid':>5} (%)"
        )
        for name, fn in (
            ("semantic-text-splitter", run_sts),
            ("semchunk", run_sem),
            ("ours (content-defined)", run_ours),
        ):
            print(splitter_row(name, docs, fn, tokens))


# ----------------------------------------------------------------------------- part 2


class Ours:
    """The real engine: ``refresh()`` of a chunk table in LanceDB, with a counting fake model.

    Document-level change detection, chunk-level reuse of stored vectors, one commit per
    batch of documents: exactly what a user's refresh does, minus the model's arithmetic.
    """

    def __init__(self, chunker: Chunker) -> None:
        self.directory = tempfile.mkdtemp(prefix="chunk-bench-")
        self.config = SourceConfig(key="key", text_columns=("text",), chunking=chunker.config)
        self.embedder = _RecordingEmbedder(_SPEC)
        self.tokenizer = packaged_tokenizer()

    def sync(self, docs: dict[str, str]) -> tuple[int, int]:
        source = ArrowSource(pa.table({"key": list(docs), "text": list(docs.values())}))
        self.embedder.texts.clear()
        report = refresh(
            source=source,
            config=self.config,
            embedder=self.embedder,
            db_uri=self.directory,
            table="chunks",
            allow_mass_delete=True,
            progress=False,
        )
        texts = self.embedder.texts
        tokens = sum(
            len(e.ids) for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        )
        assert report.embedded_rows == len(texts)
        return report.embedded_rows, tokens

    def chunks_by_doc(self) -> dict[str, list[str]]:
        """The stored chunk hashes of every document, in chunk order."""
        db = lancedb.connect(self.directory)
        if "chunks" not in db.list_tables().tables:
            return {}
        rows = db.open_table("chunks").to_arrow().select(["doc_key", "chunk_seq", "chunk_hash"])
        by_doc: dict[str, list[str]] = {}
        for row in rows.sort_by([("doc_key", "ascending"), ("chunk_seq", "ascending")]).to_pylist():
            by_doc.setdefault(row["doc_key"], []).append(row["chunk_hash"])
        return by_doc


class _RecordingEmbedder(FakeEmbedder):
    """The fake embedder, remembering the texts of the last refresh (to count their tokens)."""

    def __init__(self, spec: EmbeddingSpec) -> None:
        super().__init__(spec)
        self.texts: list[str] = []

    def embed_documents(self, texts, *, on_batch=None):  # type: ignore[no-untyped-def]
        self.texts.extend(texts)
        return super().embed_documents(texts, on_batch=on_batch)


class CountingEmbeddings:
    """A LangChain ``Embeddings`` that counts the texts it embeds (constant 8-d vectors)."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.texts.extend(texts)
        return [[1.0] * 8 for _ in texts]

    def embed_query(self, text: str) -> list[float]:
        return [1.0] * 8


def greedy_chunks(chunker: Chunker, text: str) -> list[str]:
    """The same semantic units, packed left to right up to the budget (LangChain's way)."""
    out, start, size = [], 0, 0
    for unit in chunker.units(text):
        if size + unit.tokens > chunker.config.budget and size:
            out.append(text[start : unit.start])
            start, size = unit.start, 0
        size += unit.tokens
    if text[start:].strip():
        out.append(text[start:])
    return out


class LangChain:
    def __init__(self, chunker: Chunker) -> None:
        from langchain_core.embeddings import Embeddings
        from langchain_core.indexing import InMemoryRecordManager
        from langchain_core.vectorstores import InMemoryVectorStore

        counting = type("Counting", (CountingEmbeddings, Embeddings), {})()
        self.embeddings = counting
        self.store = InMemoryVectorStore(embedding=counting)
        self.records = InMemoryRecordManager(namespace="bench")
        self.records.create_schema()
        self.chunker = chunker
        self.cache: dict[str, list[str]] = {}

    def sync(self, docs: dict[str, str]) -> tuple[list[str], int]:
        """Index every document's chunks; return the texts embedded and how many were deleted.

        One batch for the whole corpus: with the default batch_size=100, incremental cleanup
        after a batch deletes the chunks of a document that continue in the next batch, and
        they are embedded again on every sync.
        """
        from langchain_core.documents import Document
        from langchain_core.indexing import index

        documents = []
        for key, text in docs.items():
            if self.cache.get(key, [None])[0] != text:  # re-split only what changed
                self.cache[key] = [text, *greedy_chunks(self.chunker, text)]
            documents += [Document(c, metadata={"source": key}) for c in self.cache[key][1:]]
        before = len(self.embeddings.texts)
        result = index(
            documents,
            self.records,
            self.store,
            batch_size=max(1, len(documents)),
            cleanup="incremental",
            source_id_key="source",
            key_encoder="sha256",
        )
        return self.embeddings.texts[before:], result["num_deleted"]


class Pgai:
    """Re-embed every chunk of each changed document."""

    def __init__(self, chunker: Chunker) -> None:
        self.chunker = chunker
        self.doc_hash: dict[str, str] = {}

    def sync(self, docs: dict[str, str]) -> list[str]:
        hashes = {k: content_hash(v) for k, v in docs.items()}
        changed = [k for k, h in hashes.items() if self.doc_hash.get(k) != h]
        self.doc_hash = hashes
        return [c for k in changed for c in greedy_chunks(self.chunker, docs[k])]


def sentence_edit(text: str, where: float = 0.5) -> str:
    at = text.find(". ", int(len(text) * where))
    end = text.find(". ", at + 2)
    if at < 0 or end < 0:
        return text + " A sentence."
    return text[: at + 2] + "This sentence was rewritten for the benchmark." + text[end + 1 :]


def typo_fix(text: str, where: float = 1 / 3) -> str:
    at = text.find(" the ", int(len(text) * where))
    if at < 0:
        return text.replace(" ", "  ", 1)
    return text[:at] + " teh " + text[at + 5 :]  # the stored text had the typo...


SWEEP: dict[str, Callable[[str, float], str]] = {
    "sentence rewritten": sentence_edit,
    "paragraph at the top": lambda t, _: "A new first paragraph. Two sentences.\n\n" + t,
    "typo": typo_fix,
    "text appended": lambda t, _: t + "\n\nAn appended paragraph.\n",
}


def part_sweep(tokens: int, overlap: int) -> None:
    """Each edit applied to every document on its own (3 positions where it has one)."""
    chunker = Chunker(ChunkingConfig(tokens=tokens, overlap=overlap), packaged_tokenizer())
    docs = list(long_corpus().values())
    base = chunker.chunk_many(docs)
    base_greedy = [set(greedy_chunks(chunker, d)) for d in docs]
    print(
        f"\nevery edit on each of the {len(docs)} documents separately (LangChain: chunks whose "
        "text index() has not stored for that source)"
    )
    print(
        f"{'edit':<22} {'edits':>5} | {'embedded: ours':>14} {'lc':>6} {'pgai':>6} | "
        f"{'max: ours':>9} {'lc':>4} | {'ours > lc':>9} {'ours > 3':>8} {'ours == new':>11}"
    )
    for name, edit in SWEEP.items():
        wheres = (0.5,) if name in ("paragraph at the top", "text appended") else (0.2, 0.5, 0.8)
        edited = [(d, edit(doc, w)) for d, doc in enumerate(docs) for w in wheres]
        after = chunker.chunk_many([e for _, e in edited])
        ours, lc, pgai, exact = [], [], [], 0
        for (d, text), chunks in zip(edited, after, strict=True):
            stored = {c.hash for c in base[d]}
            new = sum(c.hash not in stored for c in chunks)
            ours.append(new)  # what the engine embeds (checked by the scenario above)
            exact += new == len({c.hash for c in chunks} - stored)
            greedy_after = greedy_chunks(chunker, text)
            lc.append(len(set(greedy_after) - base_greedy[d]))
            pgai.append(len(greedy_after))
        worse = sum(o > g for o, g in zip(ours, lc, strict=True))
        print(
            f"{name:<22} {len(ours):>5} | {sum(ours):>14} {sum(lc):>6} {sum(pgai):>6} | "
            f"{max(ours):>9} {max(lc):>4} | {worse:>9} {sum(o > 3 for o in ours):>8} "
            f"{exact:>5}/{len(ours)}"
        )


def part_edits(tokens: int, overlap: int) -> None:
    tok = packaged_tokenizer()
    chunker = Chunker(ChunkingConfig(tokens=tokens, overlap=overlap), tok)
    docs = long_corpus()
    sizes = {k: len(c) for k, c in zip(docs, chunker.chunk_many(list(docs.values())), strict=True)}
    fifty = min(docs, key=lambda k: abs(sizes[k] - 50))
    by_size = sorted(docs, key=lambda k: -sizes[k])
    top_doc = "module:argparse.py" if "module:argparse.py" in docs else by_size[0]
    typo_doc = next(k for k in by_size if k not in (fifty, top_doc))
    append_doc = next(k for k in by_size if k not in (fifty, top_doc, typo_doc))
    delete_doc = by_size[-1]
    # The typo is present in the first version and fixed by the edit.
    docs[typo_doc] = typo_fix(docs[typo_doc])
    print(
        f"\n{len(docs)} long documents ({sum(map(len, docs.values())) / 1e6:.2f} MB), chunks of "
        f"<= {tokens} tokens, overlap {overlap}. doc: chunks of the edited document; new: "
        "chunks whose text was not stored before"
    )
    ours = Ours(chunker)
    pipelines = {"ours": ours, "langchain": LangChain(chunker), "pgai": Pgai(chunker)}
    original_typo = docs[typo_doc].replace(" teh ", " the ", 1)
    steps: list[tuple[str, Callable[[dict[str, str]], None]]] = [
        ("initial load", lambda d: None),
        ("no-op", lambda d: None),
        (f"sentence rewritten ({fifty})", lambda d: d.update({fifty: sentence_edit(d[fifty])})),
        (
            f"paragraph at the top ({top_doc})",
            lambda d: d.update({top_doc: "A new first paragraph. Two sentences.\n\n" + d[top_doc]}),
        ),
        (f"typo fixed ({typo_doc})", lambda d: d.update({typo_doc: original_typo})),
        (
            f"text appended ({append_doc})",
            lambda d: d.update({append_doc: d[append_doc] + "\n\nAn appended paragraph.\n"}),
        ),
        (f"document deleted ({delete_doc})", lambda d: d.pop(delete_doc)),
        (
            "document added (module:shutil.py)",
            lambda d: d.update({"module:shutil.py": (stdlib_root() / "shutil.py").read_text()}),
        ),
    ]
    print(
        f"{'edit':<44} {'doc':>4} {'new':>5} | {'embedded chunks: ours':>21} {'lc':>5} "
        f"{'pgai':>5} | {'ktokens: ours':>13} {'lc':>6} {'pgai':>6} | {'ms: ours':>8} {'lc':>6} "
        f"{'pgai':>6}"
    )
    goals: list[str] = []
    lc_stale = 0
    for name, edit in steps:
        before = ours.chunks_by_doc()
        edit(docs)
        times = {}
        for label, pipeline in pipelines.items():
            started = time.perf_counter()
            results = pipeline.sync(docs)
            times[label] = 1000 * (time.perf_counter() - started)
            if label == "ours":
                ours_chunks, ours_tokens = results
            elif label == "langchain":
                lc_texts = results[0]
            else:
                pgai_texts = results
        lc_tokens, pgai_tokens = (
            sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
            for texts in (lc_texts, pgai_texts)
        )
        stored = ours.chunks_by_doc()
        after = {k: stored.get(k, []) for k in docs}
        new = sum(len([h for h in after[k] if h not in set(before.get(k, []))]) for k in after)
        touched = [k for k in after if after[k] != before.get(k)]
        doc_chunks = max((len(after[k]) for k in touched), default=0)
        if "deleted" in name:
            lc_stale = len(before[delete_doc])
        print(
            f"{name[:44]:<44} {doc_chunks if name != 'initial load' else '':>4} {new:>5} | "
            f"{ours_chunks:>21} {len(lc_texts):>5} {len(pgai_texts):>5} | "
            f"{ours_tokens / 1000:>13.1f} {lc_tokens / 1000:>6.1f} {pgai_tokens / 1000:>6.1f} | "
            f"{times['ours']:>8.1f} {times['langchain']:>6.1f} {times['pgai']:>6.1f}"
        )
        if name != "initial load":
            goals.append(
                f"  {name[:44]:<44} ours == new: {ours_chunks == new}, "
                f"ours <= langchain: {ours_chunks <= len(lc_texts)}"
            )
        if name == "no-op":
            goals.append(f"  no-op embeds 0: {ours_chunks == 0}")
        if name.startswith("sentence"):
            goals.append(
                f"  one-sentence edit in a {doc_chunks}-chunk document embeds "
                f"{ours_chunks} chunks (<= 3: {ours_chunks <= 3})"
            )
    print("goals:")
    print("\n".join(goals))
    if lc_stale:
        print(
            f"note: LangChain's incremental cleanup only deletes within sources it is given: the "
            f"{lc_stale} chunks of the deleted document stay in its store (cleanup='full' needed)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--skip-splitters", action="store_true", help="only part 2 (edits)")
    args = parser.parse_args()
    packaged_tokenizer()  # load once, outside the timings
    if not args.skip_splitters:
        part_splitters(args.tokens)
    part_edits(args.tokens, args.overlap)
    part_sweep(args.tokens, args.overlap)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
