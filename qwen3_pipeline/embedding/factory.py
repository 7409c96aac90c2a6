"""Any embedder in place of the Qwen3 encoder: a factory named ``"module:callable"``.

An *embedder factory* is an importable callable that takes the run's
:class:`~qwen3_pipeline.core.spec.EmbeddingSpec` and returns an
:class:`~qwen3_pipeline.embedding.interface.Embedder` following it: a client of a TEI or vLLM
server, a quantised model, or :func:`qwen3_pipeline.testing.fake_embedder_factory` in tests.
The engines build it where the model would run (in this process, or in every Ray actor), so
the refresh, the report and the checks are unchanged.

Two checks, each as early as it can be:

- :func:`import_embedder_factory` runs where the setting is read (the CLI, the engine options,
  the Ray driver before any actor starts) and refuses a reference that is malformed, whose
  module does not import, whose attribute is missing or is not callable.
- :func:`build_embedder_with` runs where the embedder is built (the actor) and refuses an
  embedder whose spec is not the one it was asked for: a table's vectors must all follow the
  spec written in its metadata, and the pool's query vectors must use the spec's query
  instruction, which the fingerprint leaves out; so the specs must be equal, not merely of the
  same fingerprint and dimension.

Example:
    >>> from qwen3_pipeline.core.spec import EmbeddingSpec
    >>> factory = import_embedder_factory("qwen3_pipeline.testing:fake_embedder_factory")
    >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
    >>> build_embedder_with(factory, spec).embed_documents(["hello"]).vectors.shape
    (1, 64)
"""

import importlib
from collections.abc import Callable
from dataclasses import fields

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import Embedder

EmbedderFactory = Callable[[EmbeddingSpec], Embedder]
"""Builds the embedder of a spec (where the model runs: this process or each Ray actor)."""

_EXAMPLE = "qwen3_pipeline.testing:fake_embedder_factory"


def import_embedder_factory(reference: str) -> EmbedderFactory:
    """Import the factory ``reference`` names: ``"package.module:callable"``.

    The part after the colon may be a dotted path (``module:Class.create``), as in an entry
    point.

    Args:
        reference: ``MODULE:CALLABLE``.

    Returns:
        The callable (not called: building the embedder is the engine's job).

    Raises:
        ConfigError: The reference is malformed, its module cannot be imported, the attribute
            is missing, or it is not callable; the message names the reference.

    Example:
        >>> import_embedder_factory("qwen3_pipeline.testing:fake_embedder_factory").__name__
        'fake_embedder_factory'
    """
    module_name, colon, attribute = (
        reference.partition(":") if isinstance(reference, str) else ("", "", "")
    )
    path = attribute.split(".")
    if not colon or not module_name.strip() or ":" in attribute or not all(path):
        raise ConfigError(
            f"embedder factory {reference!r} is not MODULE:CALLABLE (e.g. {_EXAMPLE!r})"
        )
    try:
        target: object = importlib.import_module(module_name)
    # A user's module may raise anything while it imports (a missing dependency, an unset
    # environment variable): every such failure means "this factory cannot be used".
    except Exception as e:
        raise ConfigError(
            f"embedder factory {reference!r}: module {module_name!r} cannot be imported "
            f"({type(e).__name__}: {e}); install it where the embedder runs (each Ray node too)"
        ) from e
    for depth, name in enumerate(path):
        if not hasattr(target, name):
            owner = ".".join([module_name, *path[:depth]])
            raise ConfigError(
                f"embedder factory {reference!r}: {owner!r} has no attribute {name!r}"
            )
        target = getattr(target, name)
    if not callable(target):
        raise ConfigError(
            f"embedder factory {reference!r} is not callable (its type is "
            f"{type(target).__name__}); name a callable taking an EmbeddingSpec and returning "
            "an Embedder"
        )
    return target


def build_embedder_with(
    factory: EmbedderFactory, spec: EmbeddingSpec, *, name: str | None = None
) -> Embedder:
    """Build the embedder of ``spec`` with ``factory`` and check that it follows ``spec``.

    Args:
        factory: The factory (imported with :func:`import_embedder_factory`, or any callable).
        spec: The spec asked for.
        name: How to name the factory in errors (default: its qualified name).

    Returns:
        The embedder.

    Raises:
        ConfigError: The factory returned something that is not an
            :class:`~qwen3_pipeline.embedding.interface.Embedder`, or one whose spec differs
            from ``spec`` (the differing fields are named). What the factory itself raises
            is not caught.
    """
    label = name or factory_name(factory)
    embedder = factory(spec)
    if not isinstance(embedder, Embedder):
        raise ConfigError(
            f"embedder factory {label!r} returned a {type(embedder).__name__}, not an Embedder "
            "(spec, embed_documents, embed_queries)"
        )
    differences = spec_differences(embedder.spec, spec)
    if differences:
        raise ConfigError(
            f"embedder factory {label!r} built an embedder for another spec "
            f"({'; '.join(differences)}): it must return an embedder for the spec it is given, "
            "so that every vector of a table follows the spec stored with it"
        )
    return embedder


def factory_name(factory: EmbedderFactory) -> str:
    """How to name a factory given as a callable in logs and errors: its qualified name."""
    return getattr(factory, "__qualname__", None) or type(factory).__name__


def spec_differences(built: EmbeddingSpec, requested: EmbeddingSpec) -> list[str]:
    """Name the compared fields in which ``built`` differs from ``requested``.

    Example:
        >>> from dataclasses import replace
        >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
        >>> spec_differences(replace(spec, dim=32), spec)
        ['dim 32, asked for 64']
    """
    if not isinstance(built, EmbeddingSpec):
        return [f"spec is a {type(built).__name__}, not an EmbeddingSpec"]
    return [
        f"{f.name} {getattr(built, f.name)!r}, asked for {getattr(requested, f.name)!r}"
        for f in fields(EmbeddingSpec)
        if f.compare and getattr(built, f.name) != getattr(requested, f.name)
    ]
