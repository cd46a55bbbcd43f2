"""``forkserver.template``: the namespace of a template process, seen from outside.

Inside every template process (and in the workers and forks made from it)
``forkserver.template`` is the module where the template's code lives:

* ``Template.require("a.b")`` imports ``a.b`` and binds ``a`` there, as
  ``import a.b`` would;
* ``Template.eval(source, *args)`` runs ``source`` there (``args`` bound as
  ``args``), so what it defines are the module's globals;
* ``Template.fork()`` copies it with the rest of the process;
* ``Template.run("handler")`` -- a bare name -- calls the function
  ``handler`` defined there (``"forkserver.template:handler"`` says the same);
* worker code reads it like any module: ``from forkserver.template import MODEL``.

It is a real module in the template's ``sys.modules``, so functions and
classes that ``eval`` defines have ``__module__ == "forkserver.template"``:
pickle, ``dataclasses`` and ``inspect`` resolve them in workers and forks.

*This* module -- the one your own process imports -- is empty: each
template's namespace lives in that template's process only.  Looking up a
name here raises an ``AttributeError`` that says so.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # PEP 562
    if name.startswith("__"):
        raise AttributeError(name)  # dunder probes (copy, pickle, doctest...): plain miss
    raise AttributeError(
        f"forkserver.template has no attribute {name!r} in this process: it is the namespace "
        "of a template process, filled there by require() and eval(); use it from worker code "
        "(from forkserver.template import ...) or run('name') it, or define what both sides "
        "need in a module of your own"
    )
