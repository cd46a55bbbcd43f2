"""The template's namespace module (runs inside template processes).

Every template has one namespace: a real module, ``forkserver.template``,
in ``sys.modules``.  ``require("a.b")`` binds ``a`` there, as ``import a.b``
would; ``eval`` runs there; forks inherit it (a clone copies the process);
``run("name")`` calls a function defined there; worker code reaches it with
``import forkserver.template`` or ``from forkserver.template import NAME``.
Because it is a module in ``sys.modules``, what ``eval`` defines has a
``__module__`` that resolves in workers and forks: pickle, ``dataclasses``,
``typing`` and ``inspect`` find it as they find any module's.

In the caller's process ``forkserver.template`` is a different, empty module
(``forkserver/template.py``): it only documents this one.
"""
from __future__ import annotations

import importlib
import sys

from .._protocol import NAMESPACE as NAME

_DOC = (
    "The namespace of this template process: what require() bound and eval() defined "
    "(see the forkserver.Template docs)."
)


def install() -> dict:
    """Create the namespace module, register it in ``sys.modules``; return its globals."""
    module = type(sys)(NAME, _DOC)  # types.ModuleType, without importing types
    sys.modules[NAME] = module
    package = sys.modules.get("forkserver")
    if package is not None:
        package.template = module  # type: ignore[attr-defined]  # so `from forkserver import template` finds it
    return module.__dict__


def bind_import(namespace: dict, name: str) -> None:
    """Import ``name`` and bind its top-level package in ``namespace``, as ``import name``."""
    importlib.import_module(name)
    top = name.partition(".")[0]
    namespace[top] = sys.modules[top]
