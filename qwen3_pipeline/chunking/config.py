"""How documents are cut into chunks: :class:`ChunkingConfig`, validated and fingerprinted.

The settings are part of a chunk table's spec (``EmbeddingSpec.chunking`` holds
:meth:`ChunkingConfig.as_json`), so they change its fingerprint. Cheap to import (no
tokenizer, splitter or pandas): sources and drivers build the config before anything is cut;
:mod:`qwen3_pipeline.chunking.chunker` does the cutting.

Example:
    >>> ChunkingConfig(tokens=512, overlap=32).budget
    480
"""

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from qwen3_pipeline.core.errors import ConfigError

SplitterKind = Literal["text", "markdown", "code"]
SPLITTERS: tuple[str, ...] = get_args(SplitterKind)

# Bump when the same settings would cut the same text differently (levels, unit sizes, the
# window, the packing rule): the settings fingerprint then changes with it. The splitter
# library's version is deliberately left out: every stored chunk is a valid chunk of its
# document whichever rule cut it, and chunk-level reuse keeps the vectors of chunks whose text
# survives a re-cut.
ALGORITHM = "cdc-1"

MIN_TOKENS = 16
MAX_TOKENS = 32768  # Qwen3-Embedding's context
_CODE_LANGUAGE = re.compile(r"[a-z][a-z0-9_]{0,39}")


@dataclass(frozen=True, kw_only=True)
class ChunkingConfig:
    """How the documents of one source are cut into chunks; validated at construction.

    Args:
        tokens: Maximum tokens of a chunk's text (overlap included), counted with the Qwen
            tokenizer without special tokens. The encoder adds ``<|endoftext|>`` and the
            document prompt: see :meth:`check_fits`. 16..32768.
        overlap: Tokens of the previous chunk repeated at the start of each chunk (whole
            semantic units, up to this many); ``0 <= overlap < tokens / 2``.
        splitter: Which structure units follow: ``"text"`` (paragraphs, lines, sentences),
            ``"markdown"`` (CommonMark blocks and headings as well) or ``"code"`` (tree-sitter
            syntax nodes).
        code_language: The tree-sitter grammar for ``splitter="code"``: the module
            ``tree_sitter_<code_language>`` must be installed (``python`` comes with the
            ``chunking`` extra). Only valid with ``splitter="code"``.

    Raises:
        ConfigError: A value is out of range or of the wrong type.

    Example:
        >>> ChunkingConfig(tokens=512, overlap=32).as_dict()["algorithm"]
        'cdc-1'
    """

    tokens: int
    overlap: int = 0
    splitter: SplitterKind = "text"
    code_language: str | None = None

    def __post_init__(self) -> None:
        for name in ("tokens", "overlap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"chunking {name} must be an integer, got {value!r}")
        if not MIN_TOKENS <= self.tokens <= MAX_TOKENS:
            raise ConfigError(
                f"chunking tokens={self.tokens} is outside {MIN_TOKENS}..{MAX_TOKENS}; a chunk "
                "must hold at least a sentence and fit Qwen3-Embedding's 32k context"
            )
        if not 0 <= 2 * self.overlap < self.tokens:
            raise ConfigError(
                f"chunking overlap={self.overlap} must be >= 0 and less than half of "
                f"tokens={self.tokens} (at most {(self.tokens - 1) // 2})"
            )
        if self.splitter not in SPLITTERS:
            raise ConfigError(
                f"chunking splitter={self.splitter!r} is unknown; choose one of {list(SPLITTERS)}"
            )
        if self.splitter == "code":
            if not isinstance(self.code_language, str) or not _CODE_LANGUAGE.fullmatch(
                self.code_language
            ):
                raise ConfigError(
                    f"splitter='code' needs code_language, the lower-case name of a tree-sitter "
                    f"grammar such as 'python' (module tree_sitter_python); got "
                    f"{self.code_language!r}"
                )
        elif self.code_language is not None:
            raise ConfigError(
                f"code_language={self.code_language!r} only applies to splitter='code', not "
                f"splitter={self.splitter!r}"
            )

    @property
    def budget(self) -> int:
        """Tokens available to a chunk's own text (``tokens - overlap``)."""
        return self.tokens - self.overlap

    def as_dict(self) -> dict[str, Any]:
        """Return the settings, with the algorithm version, as a JSON-ready dict.

        This is what :meth:`fingerprint` hashes and what :meth:`from_dict` reads back.
        """
        return {
            "algorithm": ALGORITHM,
            "tokens": self.tokens,
            "overlap": self.overlap,
            "splitter": self.splitter,
            "code_language": self.code_language,
        }

    def as_json(self) -> str:
        """:meth:`as_dict` as canonical JSON (what ``EmbeddingSpec.chunking`` holds)."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, payload: str) -> "ChunkingConfig":
        """Rebuild a config from :meth:`as_json` output.

        Raises:
            ConfigError: Not a JSON object of chunking settings.
        """
        try:
            values = json.loads(payload)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"chunking settings {payload!r} are not JSON: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"chunking settings {payload!r} are not a JSON object")
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "ChunkingConfig":
        """Rebuild a config from :meth:`as_dict` output (``algorithm`` is ignored).

        Raises:
            ConfigError: An unknown key, or an invalid value.
        """
        fields = {k: v for k, v in payload.items() if k != "algorithm"}
        unknown = sorted(set(fields) - {"tokens", "overlap", "splitter", "code_language"})
        if unknown:
            raise ConfigError(f"unknown chunking setting(s) {unknown}")
        return cls(**fields)

    def fingerprint(self) -> str:
        """A stable hash of :meth:`as_dict` (xxh3_128, 32 hex digits) for the spec fingerprint.

        Example:
            >>> a, b = ChunkingConfig(tokens=256), ChunkingConfig(tokens=256, overlap=0)
            >>> a.fingerprint() == b.fingerprint() != ChunkingConfig(tokens=512).fingerprint()
            True
        """
        # Imported here: core.changes pulls in pandas, and this module must stay cheap to
        # import (sources validate their config with it before anything is chunked).
        from qwen3_pipeline.core.changes import content_hash

        return content_hash(self.as_json())

    def check_fits(self, max_length: int, reserved_tokens: int = 1) -> None:
        """Check that a full chunk fits the encoder's ``max_length`` (so none is truncated).

        Args:
            max_length: The spec's token limit per text, ``<|endoftext|>`` included.
            reserved_tokens: Tokens the encoder adds to each chunk: 1 for ``<|endoftext|>``
                plus the document prompt's tokens (plus 1 for the merge at the prompt's end).

        Raises:
            ConfigError: ``tokens + reserved_tokens > max_length``.
        """
        if self.tokens + reserved_tokens > max_length:
            raise ConfigError(
                f"chunking tokens={self.tokens} plus {reserved_tokens} reserved token(s) exceeds "
                f"max_length={max_length}: chunks would be truncated. Lower the chunk size to "
                f"{max_length - reserved_tokens} or raise max_length"
            )
