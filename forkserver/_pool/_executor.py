"""``forkserver.Executor``: a ``concurrent.futures`` executor of warm forks of a template.

The public face: arguments, ``submit``/``map``/``shutdown``, interpreter exit.
The engine (queue, workers, the I/O thread) is ``_dispatch.Pool``; the
workers run ``_executor_worker.serve``.
"""
from __future__ import annotations

import atexit
import functools
import itertools
import os
import pickle
import sys
import time
import weakref
from concurrent.futures import Executor as _StdExecutor, Future
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from .._template import Template
from . import _executor_worker as W, _map
from ._dispatch import Pool
from ._map import MapTask, Results
from ._workers import Task

__all__ = ["Executor"]

_pools: "weakref.WeakSet[Pool]" = weakref.WeakSet()  # every live pool of this process
_exiting = False  # the interpreter is exiting: no new futures


class Executor(_StdExecutor):
    """A ``concurrent.futures.Executor`` whose workers are warm forks of a template.

    A drop-in for ``ProcessPoolExecutor``: ``submit``, ``map`` and
    ``shutdown`` behave as the standard library documents them.  What differs:

    * workers are forks of ``template`` -- a :class:`~forkserver.Template` you
      prepared (``require``d modules, ``eval``'d state, ``send_fh`` fds) -- or,
      without one, of a new ``Template()`` with ``preload`` required in it.
      An error importing ``preload`` is raised here, with its type.  A worker
      starts in about a millisecond and shares the template's memory.
    * a worker that dies (``os._exit``, a signal, the OOM killer) fails only
      the task(s) it was running, with :class:`~forkserver.WorkerDiedError` (a
      ``BrokenProcessPool``) naming its pid and exit status; a new worker
      replaces it.  Only a crash loop -- ``CRASH_LOOP`` (5) workers in a row
      dying before they finish a task -- or a failing ``initializer`` breaks
      the executor, with ``BrokenProcessPool`` saying why.

    ``max_workers`` (default: the CPUs this process may use) bounds the
    workers; ``min_workers`` are started at once and kept; more start on
    demand.  A worker idle for ``idle_timeout`` seconds exits (never below
    ``min_workers``); after ``max_tasks_per_child`` tasks a worker exits and
    a fresh fork replaces it.  ``load`` is how many tasks a worker holds at
    once (more than 1 pipelines small tasks; a long task then delays those
    queued behind it on its worker); tasks go to the least-loaded worker, in
    submission order.  ``map`` streams its calls: 2 per worker at once (8
    while they take under a millisecond), or ``load`` if more.
    ``initializer(*sent, *initargs)`` runs once in each worker, ``sent``
    being what the template was sent (``send_arg``/``send_fh``), if anything.

    A task may call :func:`forkserver.worker.event` with a picklable object:
    ``on_event(future, obj)`` then runs in this process (in the executor's
    I/O thread, like done callbacks), before the future's result is set.

    Calls travel pickled (protocol 5; large ``bytes`` and numpy arrays out of
    band, without a copy: do not modify such an argument until its future is
    done).  ``fn`` and the classes of arguments are found by module and
    name in the worker, as ``pickle`` does; functions of a script run as
    ``__main__`` are found by importing that script in the worker, as
    ``multiprocessing``'s spawn does (so not those under ``if __name__ ==
    "__main__":``, nor those of an interactive session).
    """

    def __init__(
        self,
        max_workers: Optional[int] = None,
        *,
        template: Optional[Template] = None,
        preload: Sequence[str] = (),
        initializer: Optional[Callable[..., Any]] = None,
        initargs: tuple = (),
        max_tasks_per_child: Optional[int] = None,
        min_workers: int = 0,
        idle_timeout: Optional[float] = None,
        load: int = 1,
        on_event: Optional[Callable[[Future, Any], Any]] = None,
    ) -> None:
        max_workers = _check_counts(max_workers, min_workers, max_tasks_per_child, load,
                                    idle_timeout)
        if isinstance(preload, str):
            preload = (preload,)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if on_event is not None and not callable(on_event):
            raise TypeError("on_event must be a callable taking (future, obj)")
        config = {
            "events": on_event is not None,
            "initializer": _pickled_initializer(initializer, initargs),
            "main": None if template is not None and template._main_ok else _main_reference(),
        }
        self._main = config["main"]
        self._main_ok = template is not None and template._main_ok
        self._ids = itertools.count(1)
        self._max_workers = max_workers  # the name dask and others read
        source, owned = _worker_template(template, preload)
        try:
            self._pool = Pool(source, owned, config, max_workers=max_workers,
                              min_workers=min_workers, idle_timeout=idle_timeout, load=load,
                              max_tasks=max_tasks_per_child, on_event=on_event)
        except BaseException:
            if owned:
                source.close()
            raise
        _pools.add(self._pool)
        weakref.finalize(self, _dropped, self._pool)

    def __repr__(self) -> str:
        pool = self._pool
        state = "broken" if pool.broken else "shut down" if pool.shutdown else "running"
        return f"<forkserver.Executor max_workers={self._max_workers} {state}>"

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` in a worker; returns its ``Future``.

        An argument that cannot be pickled fails that future (at once), as
        does a result that cannot be; neither harms the executor.  Raises
        ``RuntimeError`` after ``shutdown()``, ``BrokenProcessPool`` once
        the executor is broken.
        """
        self._check_open()
        future: Future = Future()
        task_id = next(self._ids) & 0xFFFFFFFF
        try:
            chunks = self._encode(fn, args, kwargs, task_id)
        except Exception as exc:  # unpicklable: this future fails, nothing else
            future.set_exception(exc)
            return future
        self._pool.submit(Task(future, chunks, task_id, fn))
        return future

    def _check_open(self) -> None:
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        pool = self._pool
        if pool.shutdown or pool.broken is not None:
            with pool.lock:
                pool._check_open()

    def _encode(self, fn: Any, args: tuple, kwargs: dict, task_id: int) -> List[Any]:
        """The frame of a call (raises what pickling raises)."""
        if args:
            args = tuple([W.big(a) for a in args])
        if getattr(fn, "__module__", None) == "__main__":
            self._check_main(fn)
        return W.encode(W.CALL, task_id, (fn, args, kwargs))

    def _check_main(self, fn: Any) -> None:
        if self._main is None and not self._main_ok:
            raise pickle.PicklingError(
                f"{fn!r} is defined in an interactive __main__ (the REPL, python -c, a notebook): "
                "a worker cannot import it. Define it in a module (or in a script run as a file)"
            )

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: Optional[float] = None, chunksize: int = 1) -> Iterator[Any]:
        """``map(fn, *iterables)`` in the workers; results in order, as they are needed.

        As ``ProcessPoolExecutor.map``: every call is submitted at once;
        ``timeout`` (seconds, from this call) raises ``TimeoutError`` from the
        iterator; a call's exception is raised at its place; ``chunksize`` > 1
        sends the calls in batches of that many.  Closing the iterator early
        cancels the calls that have not started.  The calls stream (see the
        class docs) and have no ``Future`` each, unless there is an
        ``on_event`` (it is given the calls' futures).
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._pool.on_event is not None:  # on_event gets real futures
            if chunksize == 1:
                return super().map(fn, *iterables, timeout=timeout)
            return _flatten(super().map(functools.partial(W.process_chunk, fn),
                                        _batched(zip(*iterables), chunksize), timeout=timeout))
        self._check_open()
        calls: Iterable[tuple] = zip(*iterables)
        sent = fn
        if chunksize > 1:
            sent = functools.partial(W.process_chunk, fn)
            calls = ((chunk,) for chunk in _batched(calls, chunksize))
        shared = Results()
        tasks, ready = [], []
        for args in calls:
            task_id = next(self._ids) & 0xFFFFFFFF
            try:
                task = MapTask(self._encode(sent, args, {}, task_id), task_id, fn, shared)
                ready.append(task)
            except Exception as exc:  # unpicklable: that call fails, in its place
                task = MapTask([], task_id, fn, shared)
                task.set_exception(exc)
            tasks.append(task)
        self._pool.submit_many(ready)
        results = _map.iterate(tasks, deadline)
        return _flatten(results) if chunksize > 1 else results

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more tasks; the workers exit once the queued and running tasks are done.

        ``wait``: return only then, with every worker reaped.  ``cancel_futures``:
        cancel the tasks that have not started.  Safe to call more than once.
        From a done callback or ``on_event`` it does not wait (it cannot: they
        run in the thread that does the work).
        """
        pool = self._pool
        pool.begin_shutdown(cancel_futures)
        if wait:
            pool.wait_finished()


def _check_counts(max_workers: Optional[int], min_workers: int, max_tasks: Optional[int],
                  load: int, idle_timeout: Optional[float]) -> int:
    if max_workers is None:
        max_workers = len(os.sched_getaffinity(0))
    elif max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
    if not 0 <= min_workers <= max_workers:
        raise ValueError(f"min_workers must be between 0 and max_workers ({max_workers}), "
                         f"got {min_workers}")
    if max_tasks is not None and (not isinstance(max_tasks, int) or max_tasks < 1):
        raise ValueError("max_tasks_per_child must be >= 1")
    if not isinstance(load, int) or load < 1:
        raise ValueError(f"load (tasks in flight per worker) must be an int >= 1, got {load!r}")
    if idle_timeout is not None and not idle_timeout > 0:
        raise ValueError("idle_timeout must be a positive number of seconds or None, "
                         f"got {idle_timeout!r}")
    return max_workers


def _pickled_initializer(initializer: Optional[Callable[..., Any]],
                         initargs: tuple) -> Optional[bytes]:
    if initializer is None:
        return None
    try:
        return pickle.dumps((initializer, tuple(initargs)), 5)
    except Exception as exc:
        raise type(exc)(f"initializer and initargs must be picklable (a module-level function): "
                        f"{exc}") from exc


def _main_reference() -> Optional[Tuple[str, str]]:
    """How a worker imports this program's ``__main__`` (as multiprocessing's spawn does)."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name:
        if name == "__main__" or name.endswith(".__main__"):
            return None  # a package's __main__ is not meant to be imported again
        return ("name", name)
    path = getattr(main, "__file__", None)
    if path and not path.startswith("<"):
        return ("path", os.path.abspath(path))
    return None  # interactive: nothing to import


def _worker_template(template: Optional[Template], preload: Sequence[str]) -> Tuple[Template, bool]:
    """(the template workers are forked from, whether the executor owns it and closes it).

    A template given without ``preload`` is used as it is: its forks are the
    workers (each resolves the worker loop as a ``run`` target does), so a
    worker is a spare clone of it started -- about a millisecond.  With
    ``preload``, a fork of it (or, without one, a new ``Template()``) gets
    the modules, and import errors are raised here.  Commands sent to a
    fresh clone cost it copy-on-write faults (~2 ms for a numpy template):
    prepare your template instead of passing ``preload`` when start-up time counts.
    """
    if template is not None and not preload:
        return template, False
    private = template.fork() if template is not None else Template()
    try:
        private.require("forkserver._pool._executor_worker", *preload)
    except BaseException:
        private.close()
        raise
    return private, True


def _batched(iterable: Iterable[Any], n: int) -> Iterator[List[Any]]:
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


def _flatten(results: Iterator[List[Any]]) -> Iterator[Any]:
    for chunk in results:
        chunk.reverse()  # pop from the end: each result is referenced by the caller only
        while chunk:
            yield chunk.pop()


def _dropped(pool: Pool) -> None:
    """The Executor was garbage-collected without shutdown(): its work completes, then it stops."""
    pool.begin_shutdown(False)


def _at_exit() -> None:
    """Interpreter exit: every executor finishes its work (as ProcessPoolExecutor does), then stops.

    Ctrl-C while waiting kills the workers instead.
    """
    global _exiting
    _exiting = True
    pools = list(_pools)
    for pool in pools:
        pool.begin_shutdown(False)
    try:
        for pool in pools:
            pool.wait_finished()
    except KeyboardInterrupt:
        for pool in pools:
            pool.kill_all()
        raise


def _after_fork_child() -> None:
    for pool in list(_pools):
        try:
            pool.after_fork_child()
        except Exception:  # pragma: no cover - the others must still be handled
            pass


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_after_fork_child)
