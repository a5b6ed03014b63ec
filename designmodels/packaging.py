"""The project's import names, and a clear error when one of them is shadowed.

The repository's layout is the API: ``designmodels``, ``filters``, ``layers``, ``configs`` and
``experiments`` are installed as top-level packages (every command, doc and test imports them by these
names). A module of the same name earlier on ``sys.path`` (a ``layers.py`` or ``layers/`` in the working
directory, say) would shadow ours; where this project imports one of its packages from another, it checks
the origin with `require_sibling`, so a shadowed name fails at import with a message naming both paths,
not later with an ``AttributeError`` deep inside.
"""
from __future__ import annotations

import os
from types import ModuleType

PACKAGES = ("designmodels", "filters", "layers", "configs", "experiments")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _location(module: ModuleType):
    path = getattr(module, "__file__", None)
    if path:
        return os.path.dirname(os.path.abspath(path)) if path.endswith("__init__.py") else os.path.abspath(path)
    paths = list(getattr(module, "__path__", []))           # a namespace package: a directory, no __init__
    return os.path.abspath(paths[0]) if paths else None


def require_sibling(module: ModuleType) -> ModuleType:
    """``module`` if it is this project's package of that name (installed beside `designmodels`), else an
    ImportError that names the module that shadows it and what to do."""
    where = _location(module)
    expected = os.path.join(ROOT, module.__name__)
    if where != expected:
        raise ImportError(
            f"the module {module.__name__!r} imported from {where} is not memory-by-design's ({expected}): a "
            f"module or folder of that name earlier on sys.path shadows it. This project installs the top-level "
            f"packages {', '.join(PACKAGES)}; rename your own {module.__name__!r} or run from a directory "
            "that does not hold one.")
    return module
