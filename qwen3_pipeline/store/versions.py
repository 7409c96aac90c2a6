"""Checked versions, rollback points and rollbacks of a vector table, kept as LanceDB tags.

A Lance table keeps every committed version readable until upkeep prunes it, and a tag names a
version and keeps it from being pruned. Two kinds of tags give readers and operators what they
need:

- ``checked-v{N}`` (:func:`tag_checked`): version ``N`` passed every check of the embedding
  asset. Readers read the newest checked version by default (:func:`resolve_read_version`), so
  a version whose checks failed (it has no tag) is never served while an older checked one
  exists. A table with no checked tag at all (written by the CLI or the Python API, which run
  no checks) is read at its latest version, with a warning that it is unchecked.
- ``before-swap-v{N}-{YYYYMMDDTHHMMSSZ}`` (:func:`tag_before_swap`): the live table's version
  ``N`` just before a rebuild swapped other rows in (UTC time of the swap). :func:`rollback`
  restores it (or any tag or version) in one commit.

Tags and pruning: LanceDB refuses to prune a tagged version, so
:func:`qwen3_pipeline.store.upkeep.optimize_table` (the one upkeep path, ``maybe_optimize``
included)
moves its cut-off back to just before the *oldest* tag; a tag kept forever would stop pruning
from there on. :func:`prune_checked_tags` therefore keeps only the newest ``keep`` checked tags
and drops before-swap tags once they are older than ``before_swap_max_age`` (30 days by
default: the window in which a rebuild can be rolled back). Never deleted automatically: the
newest checked tag (``keep`` is at least 1) and a before-swap tag younger than that age.

LanceDB 0.40 facts this module relies on (checked against the installed package):
``Table.tags.list()`` maps tag names to ``{"version": int, "manifest_size": int}``;
``tags.create(name, version)`` raises ``RuntimeError`` ("Ref conflict error: tag ... already
exists") for a taken name; tag names may hold only letters, digits, ``.``, ``-`` and ``_``;
``tags.delete`` raises for an unknown tag; ``Table.restore(version)`` (a number or a tag)
commits one new version holding that version's rows and schema (history and tags kept) and
raises ``ValueError`` ("Version ... no longer exists") for an unknown one.

Example:
    >>> table = lancedb.connect("data/lancedb").open_table("documents")  # doctest: +SKIP
    >>> tag_checked(table, table.version)  # doctest: +SKIP
    'checked-v12'
    >>> resolve_read_version(table, None)  # doctest: +SKIP
    12
    >>> rollback(table, None).as_dict()  # the newest before-swap tag  # doctest: +SKIP
    {'table': 'documents', 'from_version': 15, 'to_version': 9, 'version': 16, ...}
"""

import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.schema import validate_table_name, validate_uri
from qwen3_pipeline.store.connection import list_table_names
from qwen3_pipeline.store.retries import RetryPolicy, run_typed, store_error, with_retries

log = logging.getLogger(__name__)

CHECKED_PREFIX = "checked-v"
BEFORE_SWAP_PREFIX = "before-swap-v"
DEFAULT_KEEP_CHECKED = 3
DEFAULT_BEFORE_SWAP_MAX_AGE = timedelta(days=30)
_STAMP = "%Y%m%dT%H%M%SZ"
_CHECKED = re.compile(r"^checked-v(\d+)$")
_BEFORE_SWAP = re.compile(r"^before-swap-v(\d+)-(\d{8}T\d{6}Z)$")
# Tags named in an error message before "(+N more)".
_SHOWN = 20


@dataclass(frozen=True, kw_only=True)
class RollbackResult:
    """What one :func:`rollback` did.

    Attributes:
        table: Table name.
        from_version: The latest version before the rollback.
        to_version: The version whose rows (and schema, spec included) were restored.
        version: The table's latest version after: the new commit holding ``to_version``'s
            rows, or ``from_version`` when nothing was committed.
        tag: The tag that named ``to_version``, if it was chosen by tag.
        committed: Whether a commit was made (False when ``to_version`` is already latest).
        checked: Whether ``version`` is tagged checked (only when ``to_version`` was).
        retired_tags: Checked tags of the rolled-back versions (after ``to_version``), deleted
            so that default readers stop serving them.
    """

    table: str
    from_version: int
    to_version: int
    version: int
    tag: str | None
    committed: bool
    checked: bool
    retired_tags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


# --------------------------------------------------------------------------- checked tags


def checked_tag(version: int) -> str:
    """The name of the tag that marks ``version`` as checked.

    Example:
        >>> checked_tag(12)
        'checked-v12'
    """
    return f"{CHECKED_PREFIX}{_version_number(version)}"


def tag_checked(table: Any, version: int) -> str:
    """Tag ``version`` of ``table`` as checked (every check passed on it); idempotent.

    Args:
        table: A ``lancedb`` table.
        version: The version the checks read.

    Returns:
        The tag name (``checked-v{version}``).

    Raises:
        ConfigError: ``version`` is not a version number.
        StoreError: LanceDB could not create the tag (e.g. the version does not exist).
    """
    name = checked_tag(version)
    _ensure_tag(table, name, int(version))
    return name


def checked_versions(table: Any) -> list[int]:
    """Return the checked versions of ``table``, oldest first.

    Raises:
        StoreError: LanceDB could not list the tags.
    """
    return sorted({version for name, version in _tags(table).items() if _CHECKED.match(name)})


def latest_checked_version(table: Any) -> int | None:
    """Return the newest version of ``table`` tagged checked, or None when there is none.

    Raises:
        StoreError: LanceDB could not list the tags.
    """
    versions = checked_versions(table)
    return versions[-1] if versions else None


def prune_checked_tags(
    table: Any,
    keep: int = DEFAULT_KEEP_CHECKED,
    *,
    before_swap_max_age: timedelta | None = DEFAULT_BEFORE_SWAP_MAX_AGE,
    now: datetime | None = None,
) -> list[str]:
    """Delete the tags that would keep upkeep from pruning old versions for good.

    Keeps the newest ``keep`` checked tags (by version) and deletes the older ones; deletes
    before-swap tags made more than ``before_swap_max_age`` ago (their rollback window is
    over). Untagged, those versions are pruned by the next upkeep once they are older than its
    ``cleanup_older_than``. Tags of other names (yours) are never touched.

    Args:
        table: A ``lancedb`` table.
        keep: Checked tags kept (at least 1: the newest checked version is what readers read).
        before_swap_max_age: How long a before-swap tag is kept; None keeps them all.
        now: The current time (UTC; for tests).

    Returns:
        The deleted tag names.

    Raises:
        ConfigError: ``keep`` is below 1.
        StoreError: LanceDB could not list or delete the tags.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(
            f"keep must be an integer of at least 1 (the newest checked version is what readers "
            f"read), got {keep!r}"
        )
    tags = _tags(table)
    checked = sorted((version, name) for name, version in tags.items() if _CHECKED.match(name))
    doomed = [name for _, name in checked[:-keep]]
    if before_swap_max_age is not None:
        cutoff = (now or datetime.now(UTC)) - before_swap_max_age
        doomed += [name for name in tags if (made := _swap_time(name)) and made < cutoff]
    for name in doomed:
        _delete_tag(table, name)
    if doomed:
        log.info("deleted tag(s) %s of table %s", doomed, _name(table))
    return doomed


# --------------------------------------------------------------------------- before-swap tags


def tag_before_swap(table: Any, version: int, *, now: datetime | None = None) -> str:
    """Tag ``version`` of the live ``table`` as the rollback point of a swap about to happen.

    Idempotent per version: when a before-swap tag of ``version`` exists (a retried swap), its
    name is returned and no other tag is made.

    Args:
        table: The live ``lancedb`` table.
        version: Its current version (the rows the swap replaces).
        now: The time of the swap (UTC; for tests).

    Returns:
        The tag name, ``before-swap-v{version}-{YYYYMMDDTHHMMSSZ}``.

    Raises:
        StoreError: LanceDB could not create the tag.
    """
    number = _version_number(version)
    for name, tagged in _tags(table).items():
        if tagged == number and _BEFORE_SWAP.match(name):
            return name
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime(_STAMP)
    name = f"{BEFORE_SWAP_PREFIX}{number}-{stamp}"
    _ensure_tag(table, name, number)
    log.info("tagged version %d of table %s as %s before the swap", number, _name(table), name)
    return name


def latest_before_swap_tag(table: Any) -> str | None:
    """Return the newest before-swap tag of ``table`` (by swap time, then version), or None.

    Raises:
        StoreError: LanceDB could not list the tags.
    """
    found = [
        (made, version, name)
        for name, version in _tags(table).items()
        if (made := _swap_time(name)) is not None
    ]
    return max(found)[2] if found else None


# --------------------------------------------------------------------------- readers


def resolve_read_version(table: Any, pinned: int | None) -> int:
    """Return the version a reader reads: ``pinned``, else the newest checked version.

    The one rule of every default reader (``open_vector_table``, Dagster's ``open_vectors``,
    ``qwen3-pipeline search``). A table with no checked tag at all is read at its latest
    version, and a warning says it is unchecked.

    Args:
        table: A ``lancedb`` table, freshly opened (at its latest version).
        pinned: A version asked for explicitly (returned as is), or None.

    Returns:
        The version to check out.

    Raises:
        StoreError: LanceDB could not list the tags.
    """
    if pinned is not None:
        return _version_number(pinned)
    latest = int(table.version)
    checked = latest_checked_version(table)
    if checked is None:
        log.warning(
            "table %s has no checked version (no %s* tag: no checks have passed on it, e.g. it "
            "was written by the CLI or the Python API): reading its latest version %d, which is "
            "UNCHECKED; run the embedding asset's checks to tag a checked version",
            _name(table),
            CHECKED_PREFIX,
            latest,
        )
        return latest
    if checked < latest:
        log.info(
            "reading table %s at its newest checked version %d; version(s) %d..%d are newer but "
            "not checked (failed checks, upkeep commits or writes without checks)",
            _name(table),
            checked,
            checked + 1,
            latest,
        )
    return checked


# --------------------------------------------------------------------------- rollback


def rollback(table: Any, to: str | int | None = None) -> RollbackResult:
    """Restore an earlier version of ``table`` as its newest version, in one commit.

    ``to`` names the version: a tag, a version number (an int, or a string of digits), or None
    for the newest before-swap tag (undo the last rebuild). The restored rows, schema and
    recorded spec become a new version; nothing is copied. That new version is tagged checked
    only when the restored version was; and the checked tags of the rolled-back versions (after
    ``to``) are deleted, so that default readers follow the rollback: they read the new version
    when it is checked, else the newest checked version up to ``to``, else (no checked version
    left) the latest with a warning. Restoring the latest version itself commits nothing.

    Args:
        table: A ``lancedb`` table (it is moved to its latest version first).
        to: Tag, version, or None.

    Returns:
        The versions before and after, and what was tagged or retired.

    Raises:
        ConfigError: ``to`` is an unknown tag or version, or None on a table without a
            before-swap tag; the message lists the available tags.
        StoreError: LanceDB failed (``StoreConflictError`` when concurrent writers kept
            committing first); the table is then unchanged.
    """
    run_typed(table.checkout_latest, "move to the latest version")
    tags = _tags(table)
    target, tag = _rollback_target(table, tags, to)
    from_version = int(table.version)
    if target == from_version:
        return RollbackResult(
            table=_name(table),
            from_version=from_version,
            to_version=target,
            version=from_version,
            tag=tag,
            committed=False,
            checked=from_version in _checked_of(tags),
        )
    was_checked = target in _checked_of(tags)
    with_retries(
        RetryPolicy(),
        f"restore version {target} of table {_name(table)!r}",
        lambda: table.restore(target),
        before_retry=table.checkout_latest,
    )
    version = int(table.version)
    retired = sorted(
        name for name, tagged in tags.items() if _CHECKED.match(name) and target < tagged < version
    )
    for name in retired:
        _delete_tag(table, name)
    if was_checked:
        tag_checked(table, version)
    log.info(
        "rolled table %s back to version %d (%s) as version %d; retired %s",
        _name(table),
        target,
        tag or "by number",
        version,
        retired or "no tag",
    )
    return RollbackResult(
        table=_name(table),
        from_version=from_version,
        to_version=target,
        version=version,
        tag=tag,
        committed=True,
        checked=was_checked,
        retired_tags=retired,
    )


def open_lance_table(uri: str, table: str, *, storage_options: dict[str, str] | None = None) -> Any:
    """Open the ``lancedb`` table ``table`` under ``uri`` at its latest version.

    Raises:
        UnsafeNameError: ``uri`` or ``table`` is unsafe.
        ConfigError: The table does not exist.
        StoreError: LanceDB could not be read.
    """
    import lancedb

    validate_uri(uri)
    validate_table_name(table)
    db = run_typed(
        lambda: lancedb.connect(uri, storage_options=storage_options),
        f"connect to {uri!r}",
    )
    if table not in list_table_names(db):
        raise ConfigError(
            f"vector table {table!r} does not exist under {uri!r}; check the database URI and "
            "the table name (CLI: --db, --table)"
        )
    return run_typed(lambda: db.open_table(table), f"open table {table!r}")


def _rollback_target(
    table: Any, tags: dict[str, int], to: str | int | None
) -> tuple[int, str | None]:
    if to is None:
        name = latest_before_swap_tag(table)
        if name is None:
            raise ConfigError(
                f"table {_name(table)!r} has no before-swap tag (no rebuild has swapped it since "
                f"tags were kept); name what to restore with --to TAG_OR_VERSION. "
                f"{_available(tags)}"
            )
        return tags[name], name
    if isinstance(to, str) and to in tags:
        return tags[to], to
    if isinstance(to, str) and not to.isdigit():
        raise ConfigError(
            f"table {_name(table)!r} has no tag {to!r}; pass one of its tags or a version "
            f"number. {_available(tags)}"
        )
    number = _version_number(int(to))
    versions = sorted(int(v["version"]) for v in run_typed(table.list_versions, "list versions"))
    if number not in versions:
        span = f"{versions[0]}..{versions[-1]}" if versions else "none"
        raise ConfigError(
            f"table {_name(table)!r} has no version {number} (pruned, or never made); it keeps "
            f"versions {span} (not all of them in between, once pruned). {_available(tags)}"
        )
    return number, None


# --------------------------------------------------------------------------- helpers


def _available(tags: dict[str, int]) -> str:
    if not tags:
        return "Available tags: none."
    ordered = sorted(tags.items(), key=lambda item: (item[1], item[0]), reverse=True)
    shown = ", ".join(f"{name} (version {version})" for name, version in ordered[:_SHOWN])
    more = f" (+{len(ordered) - _SHOWN} more)" if len(ordered) > _SHOWN else ""
    return f"Available tags, newest first: {shown}{more}."


def _checked_of(tags: dict[str, int]) -> set[int]:
    return {version for name, version in tags.items() if _CHECKED.match(name)}


def _swap_time(name: str) -> datetime | None:
    match = _BEFORE_SWAP.match(name)
    if match is None:
        return None
    return datetime.strptime(match.group(2), _STAMP).replace(tzinfo=UTC)


def _version_number(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"a Lance version is an integer of at least 1, got {version!r}")
    return version


def _name(table: Any) -> str:
    return str(getattr(table, "name", "?"))


def _tags(table: Any) -> dict[str, int]:
    listed = run_typed(table.tags.list, "list tags")
    return {str(name): int(tag["version"]) for name, tag in listed.items()}


def _ensure_tag(table: Any, name: str, version: int) -> None:
    tags = _tags(table)
    if tags.get(name) == version:
        return
    if name in tags:  # a tag of this name on another version: point it at this one
        run_typed(lambda: table.tags.update(name, version), f"move tag {name!r}")
        return
    try:
        table.tags.create(name, version)
    except Exception as e:  # LanceDB raises RuntimeError for a taken name, ValueError/OSError
        # Another process made the same tag in between: what matters is where it points.
        if _tags(table).get(name) == version:
            return
        raise store_error(e, f"tag version {version} of table {_name(table)!r} as {name!r}") from e


def _delete_tag(table: Any, name: str) -> None:
    try:
        table.tags.delete(name)
    except Exception as e:  # LanceDB raises RuntimeError for an unknown tag
        if name not in _tags(table):  # deleted by another process in between
            return
        raise store_error(e, f"delete tag {name!r} of table {_name(table)!r}") from e
