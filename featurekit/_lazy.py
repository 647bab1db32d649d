"""Public names of a package, imported on first use, listed once: in the package's ``__init__.pyi``.

A package's ``__init__.pyi`` holds one ``from .module import name`` (or ``name as alias``) per
public name. Type checkers and IDEs read it as the package's interface; at run time
:func:`attach` reads the same lines and imports each module when one of its names is first asked
for. So ``import featurekit`` and ``featurekit --help`` import no torch, and the list of public
names is written once (the pattern of scientific Python's ``lazy_loader`` stubs).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any, Callable

__all__ = ["attach"]


def attach(package: str, init_file: str) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for the package ``package`` whose ``__init__.py`` is ``init_file``."""
    exports = _exports(Path(init_file).with_suffix(".pyi"))
    module_globals = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = exports[name]
        value = getattr(importlib.import_module(module, package), attribute)
        module_globals[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*module_globals, *exports])

    return __getattr__, __dir__, sorted(exports)


def _exports(stub: Path) -> dict[str, tuple[str, str]]:
    """public name -> (relative module, attribute) from the ``from .x import y [as z]`` lines of ``stub``."""
    exports = {}
    for node in ast.parse(stub.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            for alias in node.names:
                exports[alias.asname or alias.name] = ("." * node.level + (node.module or ""), alias.name)
    return exports
