"""``forkserver.mp_context()``: a ``multiprocessing`` start method built on templates (parent side).

The context owns one template, its *root*: a ``Template()`` (or a fork of
the user's) that has imported ``_mp_worker`` with multiprocessing's child
side, the modules in ``CHILD_MODULES``, the ``preload`` modules and the
caller's main module (as ``__mp_main__``, the way ``spawn`` children import
it).  Each ``Process.start()`` takes a child forked from the root ahead of
time (``_mp_warm``), or forks one (``_take_child``); the rest of a start is
``_mp_popen.Popen``'s.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import warnings
import weakref
from multiprocessing import process, reduction
from multiprocessing.context import BaseContext, set_spawning_popen
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .._errors import BrokenTemplateError, ClosedError, ThreadedTemplateError
from .._template import Template
from ._mp_popen import Popen
from ._mp_warm import Warm, discard
from ._mp_worker import CHILD_MODULES, TemplateProcess

if TYPE_CHECKING:  # pragma: no cover
    from .._process import Child

WORKER = "forkserver._pool._mp_worker"
_ENTER = f"from {WORKER} import enter_template; enter_template()"
_IMPORT_MAIN = f"from {WORKER} import import_main; import_main(args[0])"
_SET_REHEARSAL = f"from {WORKER} import set_rehearsal; set_rehearsal(args[0])"
_MAIN_KEYS = ("init_main_from_name", "init_main_from_path")


class TemplateContext(BaseContext):
    """A multiprocessing context whose processes are clones of a forkserver template.

    Made by ``forkserver.mp_context()``; see its documentation.  It answers
    ``get_start_method()`` with ``"forkserver"``: the name of the family
    whose rules it follows (a child inherits nothing but what is pickled
    and the fds passed with it; semaphores are named and tracked by the
    resource tracker), so code that branches on the name takes the right
    branch, and ``SemLock`` does not mistake it for ``fork``.
    """

    _name = "forkserver"

    def __init__(self, preload: Sequence[str] = (), template: Optional["Template"] = None) -> None:
        self._preload = _module_names(preload)
        self._template = template
        self._lock = threading.RLock()
        self._root: Optional["Template"] = None  # the template children are cloned from
        self._root_pid = 0  # the process the root belongs to
        self._env: Dict[bytes, bytes] = {}  # the environment the root's children start with
        self._main: Optional[Tuple[str, str]] = None  # the main module the root imported
        self._main_skipped: set = set()  # main modules the root could not import
        self._closed = False
        self._warm = Warm(self._fork_child)
        weakref.finalize(self, self._warm.close)
        _contexts.add(self)
        context = self

        def _Popen(process_obj: Any) -> Popen:
            return Popen(process_obj, context)

        self.Process = type("TemplateProcess", (TemplateProcess,), {
            "__module__": TemplateProcess.__module__,
            "__doc__": TemplateProcess.__doc__,
            "_per_context": True,
            "_Popen": staticmethod(_Popen),
        })

    def __repr__(self) -> str:
        base = "Template()" if self._template is None else repr(self._template)
        return f"<forkserver.mp_context preload={list(self._preload)} template={base}>"

    def __reduce__(self) -> Any:
        if self._template is not None:
            raise TypeError(
                f"{self!r} cannot be sent to another process: its template is this "
                "process's; create a context there"
            )
        return (_rebuild, (self._preload,))

    # -- the root template -------------------------------------------------------

    def _root_template(self) -> "Template":
        """The root, built on first use in this process (a forked copy builds its own)."""
        root = self._root
        if root is not None and self._root_pid == os.getpid():
            return root
        with self._lock:
            if self._closed:
                raise ClosedError(f"{self!r} was closed; create a new forkserver.mp_context()")
            if self._root is None or self._root_pid != os.getpid():
                self._build()
            assert self._root is not None
            return self._root

    def _build(self, with_main: bool = True) -> None:
        """Make the root: the template, our worker side, CHILD_MODULES, preload, __main__."""
        env = dict(_environ_data())  # what Template() adopts, next line
        # No spare clone: the waiting child (_mp_warm) is made ahead of time
        # already, and a spare asked for "after" it (_cloning.py) would wait
        # for that long-lived child's exit before it is made.
        root = Template(spare=False) if self._template is None else self._template.fork()
        try:
            root.require(WORKER)
            root._keep_spare = False  # a fork of the user's inherits theirs (set once it exists)
            root.eval(_ENTER)
            root.require(*CHILD_MODULES)
            if self._preload:
                root.require(*self._preload)
            root.eval(_SET_REHEARSAL, _rehearsal_payload())
        except BaseException:
            root.close()
            raise
        self._warm.invalidate()
        self._root, self._root_pid, self._env, self._main = root, os.getpid(), env, None
        key, data = _main_data()
        if with_main and key is not None:
            self._import_main(key, data)
        self._warm.request()

    def _prepare_main(self, prep: dict) -> None:
        """Before a start: make sure the root has the main module ``prep`` names (if it can)."""
        self._root_template()
        key = _main_key(prep)
        if key == self._main or key in self._main_skipped:
            return
        with self._lock:
            if key != self._main and key not in self._main_skipped:
                self._import_main(key, {k: v for k, v in prep.items() if k in _PREPARE_MAIN})

    def _import_main(self, key: Optional[Tuple[str, str]], data: dict) -> None:
        """Import the main module into the root; if it cannot be, children import it themselves."""
        root = self._root
        assert root is not None
        try:
            root.eval(_IMPORT_MAIN, data)
        except ThreadedTemplateError as exc:
            self._main_skipped.add(key)
            _warn_main(key, exc)  # type: ignore[arg-type]  # FIXME: a None key (no main module) fails in key[1]
            root.close()  # threads cannot be undone: a new root, without the main module
            self._build(with_main=False)
            return
        except Exception as exc:
            self._main_skipped.add(key)
            _warn_main(key, exc)  # type: ignore[arg-type]  # FIXME: a None key (no main module) fails in key[1]
            return
        except BaseException:
            self._discard_root()  # interrupted while waiting for the reply: out of step
            raise
        self._main = key
        self._warm.invalidate()  # a copy of the root without this main module
        self._warm.request()

    def _discard_root(self) -> None:
        root, self._root = self._root, None
        self._warm.invalidate()
        if root is not None:
            root.close()

    # -- what Popen asks ---------------------------------------------------------

    def _env_changes(self) -> Tuple[Dict[str, str], List[str]]:
        """(set, unset): how ``os.environ`` differs now from what the root's children start with.

        Compared as the bytes ``os.environ`` keeps (``_data``): equal, the
        usual case, costs one dict comparison and no decoding.
        """
        data = _environ_data()
        if data == self._env:
            return {}, []
        base = self._env
        decode = os.fsdecode
        changed = {decode(k): decode(v) for k, v in data.items() if base.get(k) != v}
        return changed, [decode(k) for k in base if k not in data]

    def _take_child(self) -> "Tuple[Child, bool]":
        """(a child of the root waiting for its payload, whether it was waiting already):
        the one kept ready (or being made), or a new one.

        A root found dead (someone killed it) is replaced, once per start,
        as the default template is: the children it made live on.
        """
        child = None
        try:
            child, ready = self._warm.take()
            if child is not None:
                return child, ready
        except BaseException:
            if child is not None:
                discard(child)  # interrupted: it never got a payload
            raise
        try:
            return self._fork_child(), False
        except BrokenTemplateError:
            with self._lock:
                self._discard_root()
            return self._fork_child(), False

    def _fork_child(self, background: bool = False, rehearse: bool = False) -> "Child":
        """Fork the root into a child that waits for its payload (``rehearse``: and meanwhile
        walks its start-up path once).

        ``background``: for ``Warm``'s thread, which uses the root as it
        is (it never builds one).
        """
        if background:
            root = self._root
            if root is None or self._root_pid != os.getpid():
                raise ClosedError("no root template in this process")
        else:
            root = self._root_template()
        # An interrupt here leaves the root in step: a fork has no reply on
        # its socket, and an abandoned clone reads EOF and exits (_mp_worker).
        return root.fork().send_arg(rehearse).run(f"{WORKER}:main")

    # -- BaseContext -------------------------------------------------------------

    def set_forkserver_preload(self, module_names: Iterable[str]) -> None:
        """Import ``module_names`` into the template now, for every later child.

        Unlike the standard forkserver's, an import error is raised here.
        """
        names = _module_names(module_names)
        with self._lock:
            self._root_template().require(*names)
            self._preload += names
            self._warm.invalidate()
            self._warm.request()

    def close(self) -> None:
        """End the template (running children go on).  Later starts raise ``ClosedError``."""
        with self._lock:
            self._closed = True
            self._warm.close()
            if self._root_pid == os.getpid():
                self._discard_root()
            self._root = None

    def __enter__(self) -> "TemplateContext":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PREPARE_MAIN = ("sys_path", "sys_argv", "dir", "orig_dir", *_MAIN_KEYS)


def _environ_data() -> Dict[bytes, bytes]:
    """``os.environ`` as the bytes it keeps (the encoded mapping behind it)."""
    return os.environ._data  # type: ignore[attr-defined]


def _main_key(prep: dict) -> Optional[Tuple[str, str]]:
    for name in _MAIN_KEYS:
        if name in prep:
            return name, prep[name]
    return None


def _main_data() -> Tuple[Optional[Tuple[str, str]], dict]:
    """The main module's key and what ``import_main`` needs, as ``get_preparation_data`` has them.

    Computed here rather than by calling it: it would also fix the default
    start method of the program (``multiprocessing.get_start_method()``).
    """
    main = sys.modules.get("__main__")
    data: dict = {}
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        data["init_main_from_name"] = name
    else:
        path = getattr(main, "__file__", None)
        if path is None:
            return None, {}
        if not os.path.isabs(path) and process.ORIGINAL_DIR is not None:  # type: ignore[attr-defined]  # CPython's, not in typeshed
            path = os.path.join(process.ORIGINAL_DIR, path)  # type: ignore[attr-defined]  # CPython's, not in typeshed
        data["init_main_from_path"] = os.path.normpath(path)
    sys_path = list(sys.path)
    if "" in sys_path:
        sys_path[sys_path.index("")] = process.ORIGINAL_DIR  # type: ignore[attr-defined]  # CPython's, not in typeshed
    data.update(sys_path=sys_path, sys_argv=list(sys.argv), dir=os.getcwd(),
                orig_dir=process.ORIGINAL_DIR)  # type: ignore[attr-defined]  # CPython's, not in typeshed
    return _main_key(data), data


def _warn_main(key: Tuple[str, str], exc: BaseException) -> None:
    warnings.warn(
        f"forkserver.mp_context(): the main module {key[1]!r} could not be imported into "
        f"the template ({type(exc).__name__}: {exc}); each child imports it itself, "
        "as under the spawn start method",
        RuntimeWarning,
        stacklevel=4,
    )


def _module_names(names: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(names, str):
        raise TypeError(f"preload={names!r}: pass a list of module names, e.g. [{names!r}]")
    found = tuple(names)
    for name in found:
        if not isinstance(name, str) or not name:
            raise TypeError(f"preload: module names are non-empty strings, got {name!r}")
    return found


def _rehearsal_payload() -> bytes:
    """What a waiting child rehearses its start-up with: preparation data and a process, pickled.

    Shaped like a real start's (``spawn.get_preparation_data()`` and a
    ``TemplateProcess``), built without either's side effects: no start
    method is fixed, no process number is used up.
    """
    import io

    current = process.current_process()
    # No main module: a waiting child must not run the user's script (it
    # would, where the template could not import it); the rest is the same.
    prep = {"sys_path": list(sys.path), "sys_argv": list(sys.argv), "dir": os.getcwd(),
            "orig_dir": process.ORIGINAL_DIR}  # type: ignore[attr-defined]  # CPython's, not in typeshed
    prep.update(name="rehearsal", authkey=current.authkey, log_to_stderr=False,
                start_method=process_start_method())
    stand_in = TemplateProcess.__new__(TemplateProcess)
    stand_in.__dict__.update(
        _identity=(0,), _config=current._config.copy(), _parent_pid=os.getpid(),  # type: ignore[attr-defined]  # CPython's, not in typeshed
        _parent_name=current.name, _popen=None, _closed=False, _target=None, _args=(),
        _kwargs={}, _name="rehearsal",
    )
    buf = io.BytesIO()
    set_spawning_popen(stand_in)  # anything not None: the authkey may be pickled
    try:
        reduction.dump(prep, buf)
        reduction.dump(stand_in, buf)
    finally:
        set_spawning_popen(None)
    return buf.getvalue()


def process_start_method() -> str:
    """The program's start method, without fixing it (``get_start_method(allow_none=True)``)."""
    from multiprocessing import context

    return context._default_context.get_start_method(allow_none=True) or "fork"


def _rebuild(preload: Tuple[str, ...]) -> TemplateContext:
    """Unpickle a context: a new one, built when first used."""
    return TemplateContext(preload)


def mp_context(
    *, preload: Sequence[str] = (), template: Optional["Template"] = None
) -> TemplateContext:
    """A ``multiprocessing`` context whose processes are forks of a forkserver template.

    Pass it wherever a context is taken::

        ctx = forkserver.mp_context(preload=["numpy"])
        ProcessPoolExecutor(mp_context=ctx)
        ctx.Pool(4)
        DataLoader(dataset, num_workers=2, multiprocessing_context=ctx)
        ctx.Process(target=f, args=(1,)).start()

    Everything a context offers works: ``Process`` (and its ``start``,
    ``join``, ``is_alive``, ``exitcode``, ``terminate``, ``kill``, ``close``,
    ``sentinel``, ``daemon``, ``name``), queues, pipes, locks, shared values,
    ``Manager``, ``Pool``.  What each child is:

    * a fork of a template (``preload`` imported; a failing import raises
      here, with its type), never of your process: safe from threads, and
      as fast from a big parent as from a small one;
    * your direct child (``os.getppid()`` in it is your pid), reaped by
      you: ``exitcode`` is exact, negative for a signal;
    * started with your *current* ``os.environ`` (the changes since
      ``mp_context()`` are applied in it), working directory, ``sys.path``,
      ``sys.argv`` and stdio fds 0-2, as of each ``start()``;
    * given its objects as under the standard ``forkserver`` method:
      pickled, with fds duplicated for it and the resource tracker shared;
      functions of your main script work as under ``spawn``, the main
      module being imported once into the template as ``__mp_main__``
      (its ``if __name__ == "__main__":`` block does not run there).

    The context keeps one child forked and waiting (an idle process of
    ~2 MiB USS): ``start()`` hands it the process object at once.
    ``ctx.close()`` (or leaving ``with ctx:``) ends it and the template;
    running children go on.  So does interpreter exit.

    ``template``: fork children from a ``forkserver.Template`` of yours
    (a fork of it: yours is left as it is) instead of a new ``Template()``;
    its environment is the base the changes are applied to.
    ``get_start_method()`` answers ``"forkserver"`` (see
    docs/multiprocessing.md for why, and what differs).
    """
    ctx = TemplateContext(preload, template)
    if not getattr(process.current_process(), "_inheriting", False):
        ctx._root_template()  # now, so that a failing preload raises here
    return ctx


_contexts: "weakref.WeakSet[TemplateContext]" = weakref.WeakSet()


def _after_fork_child() -> None:
    # A forked copy of the caller builds its own root on first use; another
    # thread may have held a context's lock at the fork.
    for ctx in list(_contexts):
        ctx._lock = threading.RLock()


def _at_exit() -> None:
    """Interpreter exit: the waiting children and the roots end (running children do not)."""
    for ctx in list(_contexts):
        if ctx._root_pid == os.getpid():
            ctx.close()


os.register_at_fork(after_in_child=_after_fork_child)
atexit.register(_at_exit)  # after _template's (imported above): runs before it
