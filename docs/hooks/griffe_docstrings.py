"""A Griffe extension that lets mkdocstrings render the package's docstrings as written.

The docstrings follow the Google convention as ruff checks it (``convention = "google"``),
which names a section ``Example:``, and cross-reference with Sphinx roles
(``:class:`~.options.RefreshOptions```). Griffe's Google parser reads only ``Examples:`` as
an examples section (an ``Example:`` becomes an admonition whose ``>>>`` lines are rendered as
Markdown) and knows no Sphinx roles. Once the package is loaded, this extension rewrites each
docstring for the site only:

- a line ``Example:`` becomes ``Examples:``, so doctests render as code;
- a role becomes an *optional* autorefs link, its target resolved the way Sphinx would
  (``~`` shows the last name; a leading ``.`` is relative to the module's package; a bare name
  is looked up in the object's class, then its module): it links when the target is rendered
  somewhere on the site and stays plain code otherwise (``dg.Failure``, ``pa.Table``), so
  ``mkdocs build --strict`` never fails on a reference to another library;
- an RST literal-block marker (a line ending in ``::``) ends in ``:``; the indented block
  after it is already code in Markdown;
- a ``Raises:`` section that names no exception type (``Raises: The errors of
  :func:`refresh`.``, which Google style cannot parse) becomes the sentence it is
  ("Raises the errors of refresh.").

Configured in ``mkdocs.yml`` under the python handler's ``extensions``.
"""

import re
from typing import Any

import griffe

_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
_LITERAL_MARKER = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)
_RAISES = re.compile(
    r"^(?P<indent>[ \t]*)Raises:[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+\S.*\n?)+)", re.MULTILINE
)
_TYPED_ITEM = re.compile(r"^[ \t]*[\w.]+[ \t]*(?:\([^)]*\))?:")


class SphinxRolesToAutorefs(griffe.Extension):
    """Rewrite ``Example:`` headers, Sphinx roles and RST literal markers in docstrings."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite every docstring of the loaded package, its members known."""
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj.docstring.value, obj, pkg)


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _rewrite(text: str, obj: griffe.Object, pkg: griffe.Module) -> str:
    text = _EXAMPLE_HEADER.sub(r"\1Examples:", text)
    text = _LITERAL_MARKER.sub(r"\1:", text)
    text = _RAISES.sub(_untyped_raises_as_sentence, text)

    def link(match: re.Match[str]) -> str:
        short, target = match.group(1) == "~", match.group(2).strip()
        target = target.removesuffix("()")
        identifier = _resolve(target, obj, pkg)
        shown = target.lstrip(".").rsplit(".", 1)[-1] if short else target.lstrip(".")
        return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'

    return _ROLE.sub(link, text)


def _untyped_raises_as_sentence(match: re.Match[str]) -> str:
    body = match.group("body")
    if _TYPED_ITEM.match(body):
        return match.group(0)
    sentence = " ".join(line.strip() for line in body.splitlines())
    return f"{match.group('indent')}Raises {sentence[:1].lower()}{sentence[1:]}\n"


def _resolve(target: str, obj: griffe.Object, pkg: griffe.Module) -> str:
    module = obj if obj.is_module else obj.module
    if target.startswith("."):
        package = module if module.is_package else module.parent
        base = package.path if package is not None else module.path
        return _canonical(f"{base}.{target.lstrip('.')}", pkg)
    if target.split(".", 1)[0] == pkg.name:
        return _canonical(target, pkg)
    scopes = [obj, obj.parent] if obj.is_class or obj.is_function else [obj]
    for scope in [*scopes, module]:
        if scope is not None and target.split(".", 1)[0] in scope.members:
            return _canonical(f"{scope.path}.{target}", pkg)
    return target


def _canonical(path: str, pkg: griffe.Module) -> str:
    try:
        found = pkg[path.split(".", 1)[1]] if "." in path else pkg
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return path
    try:
        return str(found.final_target.path) if found.is_alias else str(found.path)
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return path
