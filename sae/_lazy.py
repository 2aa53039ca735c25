"""Lazy package exports (PEP 562): `import sae` stays cheap; a public name imports its module on
first access."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """(__getattr__, __all__) for `package` whose public names live in the modules `exports` maps
    them to ({name: "package.module"})."""
    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__, sorted(exports)
