"""SETUP: a new template adopts the caller's context (runs inside template processes).

``Template()`` clones the default template and sends it the caller's
environment, directory, ``sys.path`` and stdio (DESIGN rule 4).  Its first
command is therefore served by a fresh clone, where every page touched for
the first time is a copy-on-write fault and every function run for the first
time writes its bytecode caches: a spare of the default template walks SETUP
and an empty command once, with its own context (no effect), while idle, as
spares rehearse a worker's start (``_fork.py``).  Measured here (3.11, in
the template): SETUP 650 -> 75 us, a first ``eval("pass")`` 270 -> 130 us;
``Template()`` to its first reply ~1.4 -> ~0.55 ms.
"""
from __future__ import annotations

import gc
import importlib
import os
import sys

from .. import _protocol as P
from .._fds import Frame
from ._state import import_checked


def do_setup(state, frame: Frame, ctx=None) -> None:
    """Serve SETUP: stdio fds, environment, directory, ``sys.path``, ``gc_freeze``.

    ``ctx``: the payload, when the caller already loaded (and checked) it.
    """
    if ctx is None:
        ctx = P.loads(frame.payload)
    fds = iter(frame.fds)
    for target in ctx.get("stdio", ()):
        fd = next(fds)
        os.dup2(fd, target)  # dup2 makes the target inheritable, as stdio must be
        os.close(fd)
    if ctx.get("stderr_to_stdout"):  # Template(stderr=subprocess.STDOUT)
        os.dup2(1, 2)
    if ctx.get("env") is not None:
        adopt_environ(ctx["env"])
    if ctx.get("cwd") is not None:
        os.chdir(ctx["cwd"])
    if ctx.get("sys_path") is not None:
        sys.path[:] = ctx["sys_path"]
        refresh_import_caches()
    if "gc_freeze" in ctx:
        state.gc_freeze = ctx["gc_freeze"]
        if not state.gc_freeze:
            gc.unfreeze()  # what the default template froze is collectable again
    state.set_up = True


def rehearse_setup(state) -> None:
    """Walk SETUP with this process's own context: nothing changes, the pages get touched.

    For spares of a template that never had a SETUP (the default
    template's, which ``Template()`` takes): their next command is one,
    and then usually a ``require`` or ``eval``, whose common frame (thread
    checks, pool limits, ``compile``) is walked too.
    """
    try:
        own = {"env": dict(os.environ), "cwd": os.getcwd(), "sys_path": list(sys.path),
               "gc_freeze": state.gc_freeze, "stdio": []}
        do_setup(state, Frame(P.SETUP, P.dumps(own), []))
        # and the frame of a require/eval (the thread checks, the pool limits, compile)
        import_checked(state, "", lambda: exec(compile("pass", "<rehearsal>", "exec"), {}))
    except Exception:
        pass  # only a warm-up (our directory may have been removed, say): the real one reports
    finally:
        state.set_up = False  # still the default template's context, not a caller's


def adopt_environ(env: dict) -> None:
    """Make ``os.environ`` equal ``env``, changing only what differs.

    A new template's environment is usually the one its default template
    started with: setting only the differences (often none) spares a fresh
    clone rewriting every variable (clear + update: ~0.4 ms of its first
    command, measured here).
    """
    environ = os.environ
    for name in [name for name in environ if name not in env]:
        del environ[name]
    for name, value in env.items():
        if environ.get(name) != value:
            environ[name] = value


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
    bootstrap = importlib._bootstrap_external
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
