"""Re-export names from submodules on first access (PEP 562), so a package import stays cheap.

``import qwen3_pipeline`` must not import torch, LanceDB or Dagster: the package front names
where each public name lives, and :func:`lazy_exports` imports that module only when the name
is first used.
"""

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """Build a module ``__getattr__`` that imports ``where[name]`` and returns its ``name``.

    Args:
        package: The package's ``__name__`` (for the error message).
        where: Public name -> the absolute module that defines it.

    Returns:
        The ``__getattr__`` to assign in the package's ``__init__``.

    Example:
        >>> getattr_ = lazy_exports("pkg", {"sqrt": "math"})
        >>> getattr_("sqrt")(4.0)
        2.0
    """

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
