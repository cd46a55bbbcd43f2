"""The daemon's templates: preloading, staleness, and which one serves a run (parent side).

A *zygote* here is one ``Template.new_exec`` -- a freshly exec'd interpreter,
so an edited forkserver or library is really re-read -- that imported the
preload set, plus what it imported it *from*.  ``python script.py`` would
find a preloaded name on the run's own ``sys.path`` (its ``sys.path[0]`` is
the script's directory, or the cwd for ``-m``), so before each run the
daemon asks the import system where each preloaded top-level name would
come from for that path, and uses (or builds) the zygote that imported it
from exactly there: a project's own package in two checkouts gets two
zygotes, never the wrong one.

Staleness: after preloading, a fork of the template reports every module
file it has loaded with its ``(mtime_ns, size, inode)``; before each run
those are compared with the files on disk.  A change closes that zygote
and builds a new one first, and the stale bytecode of a changed source is
removed (the import system checks a source's mtime to the second: an edit
within the same second, same size, would otherwise load the old code).
"""
from __future__ import annotations

import logging
import os
import pickle
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._errors import ForkserverError
from .._template import Template
from . import _child

log = logging.getLogger("forkserver.zygote")

CHILD = "forkserver._zygote._child"
MAX_ZYGOTES = 4  # per daemon: the least recently used beyond this is closed
REPORT_TIMEOUT = 60.0
Stat = Optional[Tuple[int, int, int]]


def _stat(path: str) -> Stat:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def changed(files: Dict[str, Stat]) -> Optional[str]:
    """The first file whose ``(mtime_ns, size, inode)`` is not what it was, or None."""
    for path, was in files.items():
        if _stat(path) != was:
            return path
    return None


class Zygote:
    """One preloaded template, or why it could not be made (``error``)."""

    def __init__(self, preload: Sequence[str], sys_path: List[str], env: Dict[str, str],
                 generation: int) -> None:
        self.preload = list(preload)
        self.sys_path = sys_path
        self.generation = generation
        self.template: Optional[Template] = None
        self.error: Optional[str] = None
        self.files: Dict[str, Stat] = {}
        self.origins: Dict[str, Optional[str]] = {}
        self.modules = 0
        self.runs = 0
        self.dirs: Dict[str, Stat] = {}  # sys.path directories, watched after a failed build
        dirs = {p: _stat(p) for p in sys_path if p}  # as they were before the imports
        t0 = time.monotonic()
        try:
            self._build(env)
        except Exception as exc:  # an import error of the user's, a template that died
            self.dirs = dirs
            self.error = self.error or _describe(exc)
            log.warning("zygote %d: preloading %s failed: %s", generation,
                        ",".join(self.preload) or "(nothing)", self.error)
            self.close()
        self.build_ms = (time.monotonic() - t0) * 1e3
        if self.template is not None:
            log.info("zygote %d: pid %d preloaded %s in %.0f ms (%d modules, %d files watched)",
                     generation, self.template.pid, ",".join(self.preload) or "(nothing)",
                     self.build_ms, self.modules, len(self.files))

    def _build(self, env: Dict[str, str]) -> None:
        tpl = self.template = Template.new_exec(env=env, cwd="/")
        try:
            # sys.path set by eval, not new_exec(sys_path=): that one calls
            # importlib.invalidate_caches(), which on 3.12+ imports
            # importlib.metadata and threading (30 ms) into the template.
            tpl.eval("import sys\nsys.path[:] = args[0]", self.sys_path)
            tpl.require(CHILD, *self.preload)
        except Exception as exc:  # remote ImportError & co: the template itself is fine
            self.error = _describe(exc)
            # Watch what it did load: a later edit or install may fix it (``stale``).
            self._fingerprint(tpl)
            raise
        self._fingerprint(tpl)

    def _fingerprint(self, tpl: Template) -> None:
        child = tpl.fork().send_arg(self.preload).run(f"{CHILD}:report")
        try:
            sock = child.control
            assert sock is not None  # a worker's control socket
            sock.settimeout(REPORT_TIMEOUT)
            data = b""
            while len(data) < 8 or len(data) < 8 + int.from_bytes(data[:8], "little"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ForkserverError("the zygote's fingerprint worker died before reporting")
                data += chunk
            found = pickle.loads(data[8:])  # from our own template, over its private socket
        finally:
            child.close()
            child.wait(REPORT_TIMEOUT)
        self.files, self.origins, self.modules = found["files"], found["origins"], found["modules"]

    def stale(self) -> Optional[str]:
        """Why this zygote must not serve another run (a changed file), or None."""
        path = changed(self.files)
        if path is not None:
            _drop_bytecode(path)
            return f"{path} changed"
        if self.error is not None:
            # A failed build is retried once something could fix it: a file
            # it loaded changed (above) or a sys.path directory did (an install).
            path = changed(self.dirs)
            if path is not None:
                return f"{path} changed"
        return None

    def start(self, spec: Dict[str, Any], fds: Sequence[int]):
        """Fork the run: a ``Child`` running ``_child.main(control, spec, *fds)``."""
        assert self.template is not None
        self.runs += 1
        return self.template.fork().send_arg(spec).send_fh(*fds).run(f"{CHILD}:main")

    def info(self) -> Dict[str, Any]:
        return {"generation": self.generation, "pid": self.template.pid if self.template else None,
                "preload": self.preload, "origins": self.origins, "error": self.error,
                "modules": self.modules, "files_watched": len(self.files),
                "build_ms": round(self.build_ms, 1), "runs": self.runs, "sys_path0": self.sys_path[:1]}

    def close(self) -> None:
        if self.template is not None:
            self.template.close()
            self.template = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _drop_bytecode(path: str) -> None:
    if path.endswith(".py"):
        import importlib.util

        try:
            os.unlink(importlib.util.cache_from_source(path))
        except (OSError, ValueError, NotImplementedError):
            pass


class Zygotes:
    """The daemon's zygotes, keyed by where their preloaded names were imported from."""

    def __init__(self, preload: Sequence[str], base_path: List[str]) -> None:
        self.preload = list(preload)
        self.tops = list(dict.fromkeys(name.partition(".")[0] for name in self.preload))
        self.base_path = base_path
        self.by_origins: "OrderedDict[tuple, Zygote]" = OrderedDict()
        self.generation = 0

    def sys_path_for(self, p0: Optional[str], cwd: str) -> List[str]:
        """The run's ``sys.path``: its ``sys.path[0]`` (None: -P/PYTHONSAFEPATH) + the base."""
        if p0 is None:
            return list(self.base_path)
        return [p0 or cwd] + self.base_path

    def for_run(self, p0: Optional[str], cwd: str, env: Dict[str, str]) -> Tuple[Optional[Zygote], str]:
        """(the zygote to fork this run from, "") or (None, why the run cannot use one)."""
        sys_path = self.sys_path_for(p0, cwd)
        # A name found nowhere (None) is tried all the same: the zygote's
        # import error says why, and the failed zygote is kept (and watched)
        # so that the next runs from here do not try again until something changed.
        origins = tuple(_child.find_origin(top, sys_path) for top in self.tops)
        zygote = self.by_origins.get(origins)
        if zygote is not None:
            why = zygote.stale()
            if why is not None:
                log.info("zygote %d replaced: %s", zygote.generation, why)
                self.discard(origins)
                zygote = None
        if zygote is None:
            zygote = self.build(origins, sys_path, env)
        self.by_origins.move_to_end(origins)
        if zygote.error is not None:
            return None, f"the zygote could not preload {','.join(self.preload)} ({zygote.error})"
        return zygote, ""

    def build(self, origins: tuple, sys_path: List[str], env: Dict[str, str]) -> Zygote:
        self.generation += 1
        zygote = Zygote(self.preload, sys_path, env, self.generation)
        if zygote.error is None and tuple(zygote.origins.get(t) for t in self.tops) != origins:
            zygote.error = (f"it imported {zygote.origins} where {dict(zip(self.tops, origins))} "
                            "was expected (a sitecustomize or .pth changing sys.path?)")
            zygote.close()
        self.by_origins[origins] = zygote
        while len(self.by_origins) > MAX_ZYGOTES:
            self.discard(next(iter(self.by_origins)))
        return zygote

    def discard(self, origins: tuple) -> None:
        zygote = self.by_origins.pop(origins, None)
        if zygote is not None:
            zygote.close()

    def rebuild(self, zygote: Zygote, env: Dict[str, str]) -> Zygote:
        """A new zygote in place of ``zygote`` (its template died)."""
        for origins, z in list(self.by_origins.items()):
            if z is zygote:
                self.discard(origins)
                return self.build(origins, zygote.sys_path, env)
        return zygote

    def info(self) -> List[Dict[str, Any]]:
        return [z.info() for z in self.by_origins.values()]

    def close(self) -> None:
        for origins in list(self.by_origins):
            self.discard(origins)
