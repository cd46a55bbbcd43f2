"""The template's namespace module and its import caches (runs inside template processes).

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
        setattr(package, "template", module)  # so `from forkserver import template` finds it
    return module.__dict__


def bind_import(namespace: dict, name: str) -> None:
    """Import ``name`` and bind its top-level package in ``namespace``, as ``import name``."""
    importlib.import_module(name)
    top = name.partition(".")[0]
    namespace[top] = sys.modules[top]


def refresh_import_caches() -> None:
    """``importlib.invalidate_caches()``, minus what CPython 3.13 added to it.

    A new template adopts the caller's ``sys.path`` and directory, and the
    finders it inherited from its template cached directory listings (and
    "no such directory" entries) from earlier: they must be dropped so that
    modules created since are found.  Since 3.13, ``PathFinder.invalidate_caches``
    also does ``from importlib.metadata import MetadataPathFinder`` to clear
    that finder's cache: the first call in a process imports
    ``importlib.metadata`` with ``email``, ``zipfile``, ``pathlib``, ``json``,
    ``inspect``, ``threading``... (~22 ms measured here, paid by every new
    template; ``threading`` then adds its at-fork hook to every clone).  When
    ``importlib.metadata`` is not loaded it has no cache to clear, so we do
    the rest of the work only.
    """
    if "importlib.metadata" in sys.modules:
        importlib.invalidate_caches()
        return
    bootstrap = importlib._bootstrap_external  # type: ignore[attr-defined]
    for finder in sys.meta_path:
        if finder is bootstrap.PathFinder:
            _invalidate_path_finder(bootstrap)
        elif hasattr(finder, "invalidate_caches"):
            finder.invalidate_caches()


def _invalidate_path_finder(bootstrap) -> None:
    """What ``PathFinder.invalidate_caches`` does (3.9-3.13), without the metadata import."""
    cache = sys.path_importer_cache
    for entry, finder in list(cache.items()):
        # Relative entries depend on the working directory, which changed.
        if finder is None or not bootstrap._path_isabs(entry):
            del cache[entry]
        elif hasattr(finder, "invalidate_caches"):
            finder.invalidate_caches()
    namespace_path = getattr(bootstrap, "_NamespacePath", None)
    if namespace_path is not None and hasattr(namespace_path, "_epoch"):
        namespace_path._epoch += 1  # namespace packages recompute their path
