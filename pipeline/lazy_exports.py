"""A package's public names re-exported lazily (PEP 562): each submodule is imported when one of its names is
first used.

In: the package's name, `{submodule: the public names it defines}` and the package's globals. Out: the
package's `__getattr__`, `__dir__` and `__all__`. The stage packages whose submodules import torch and
transformers (`tasks.train`, `tasks.evaluate`) use it: a flow process imports them for their tasks, and a run
whose stages all come back Cached, like a training process that has no use for Prefect, should not pay for
libraries no code of it calls.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, ...]], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """`__getattr__`, `__dir__` and `__all__` for `package`, whose names live in the submodules `exports` lists.

    Use in the package's `__init__`: `__getattr__, __dir__, __all__ = lazy_exports(__name__, EXPORTS, globals())`.
    """
    module_of = {name: module for module, names in exports.items() for name in names}
    public = sorted(module_of)

    def __getattr__(name: str) -> Any:
        """A re-exported name, from its submodule (imported now if it was not yet)."""
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)

    def __dir__() -> list[str]:
        return sorted({*namespace, *public})

    return __getattr__, __dir__, public
