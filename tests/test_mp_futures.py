"""ProcessPoolExecutor(mp_context=forkserver.mp_context()), end to end.

Adapted (in our own words) from the ProcessPoolExecutor parts of CPython's
``Lib/test/test_concurrent_futures/`` (3.13; ``test_concurrent_futures.py``
in 3.9): ``executor.py`` (ExecutorTest), ``test_process_pool.py``,
``test_init.py``, ``test_shutdown.py`` (ProcessPoolShutdownTest),
``test_deadlock.py``, ``test_wait.py`` and ``test_as_completed.py``, with
every pool on our context.  ``test_mp_cpython_futures.py`` also runs
CPython's own classes where the interpreter ships them.

Left out, and why:

* ``test_interpreter_shutdown``/``test_submit_after_interpreter_shutdown``,
  ``test_hang_gh83386``/``gh94440``, ``test_python_finalization_error``:
  they run scripts or mock thread creation, with the default context or
  ``fork`` -- CPython's own run of them is in ``test_mp_cpython_futures.py``;
* ``test_max_tasks_per_child_defaults_to_spawn_context``: no context of ours;
* ``test_gh105829_should_not_deadlock_if_wakeup_pipe_full`` and
  ``test_crash_big_data``: they test the executor's own wake-up pipe;
* ``test_ressources_gced_in_workers``: it needs a Manager per test, covered by
  ``test_mp_stdlib.py``'s manager test;
* timing assertions: only deadlines here.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import weakref
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool

import pytest

from forkserver._pool._mp import TemplateContext

from ._mp_helpers import module_context, mp_no_leaks, mp_tracker  # noqa: F401

pytestmark = pytest.mark.usefixtures("mp_no_leaks")

TIMEOUT = 30.0
# Built on first use, not at import: pytest imports every module before it
# runs any, and a context's waiting child would stand among other modules'
# children meanwhile.  (mp_context() builds at once, to raise preload errors.)
CTX = TemplateContext(preload=[__name__])


@pytest.fixture(scope="module", autouse=True)
def _built_then_closed():
    with module_context(CTX):
        yield


def executor(workers=5, **kwargs):
    return futures.ProcessPoolExecutor(max_workers=workers, mp_context=CTX, **kwargs)


# -- module-level targets ------------------------------------------------------------


def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


class MyObject:
    def my_method(self):
        pass


def make_dummy_object(_):
    return MyObject()


def raise_runtime_error():
    raise RuntimeError(123)  # some comment


EVENT = None  # an Event handed to each worker by its initializer (tasks cannot carry one)


def keep_event(event):
    global EVENT
    EVENT = event


def wait_event(_=None):
    return EVENT.wait(TIMEOUT)


def with_event(workers=5, **kwargs):
    """(an executor whose workers have ``EVENT``, the event)."""
    event = CTX.Event()
    return executor(workers, initializer=keep_event, initargs=(event,), **kwargs), event


INIT_STATUS = "uninitialized"


def init(value):
    global INIT_STATUS
    INIT_STATUS = value


def get_init_status():
    return INIT_STATUS


def init_fail():
    raise ValueError("error in initializer")


def _exit():
    sys.exit(1)


def _crash():
    os.kill(os.getpid(), signal.SIGKILL)


def _raise():
    raise RuntimeError("raised in the worker")


class CrashAtUnpickle:
    def __reduce__(self):
        return _crash, ()


class ExitAtUnpickle:
    def __reduce__(self):
        return _exit, ()


class ErrorAtUnpickle:
    def __reduce__(self):
        return _raise, ()


class CrashAtPickle:
    def __reduce__(self):
        _crash()


class ErrorAtPickle:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


def identity(x):
    return x


def returns(cls):
    return cls()


def call(func):
    return func()


# -- ExecutorTest --------------------------------------------------------------------


def test_submit_returns_the_result():
    with executor() as ex:
        assert ex.submit(pow, 2, 8).result(TIMEOUT) == 256


def test_submit_passes_keywords():
    with executor() as ex:
        assert ex.submit(mul, 2, y=8).result(TIMEOUT) == 16
        assert ex.submit(capture, 1, self=2, fn=3).result(TIMEOUT) == ((1,), {"self": 2, "fn": 3})
        with pytest.raises(TypeError):
            ex.submit(fn=capture, arg=1)
        with pytest.raises(TypeError):
            ex.submit(arg=1)


def test_map_with_and_without_chunks():
    expected = list(map(pow, range(40), range(40)))
    with executor() as ex:
        assert list(ex.map(pow, range(10), range(10))) == expected[:10]
        for chunksize in (3, 6, 40, 50):
            assert list(ex.map(pow, range(40), range(40), chunksize=chunksize)) == expected
        with pytest.raises(ValueError):
            list(ex.map(pow, range(40), range(40), chunksize=-1))


# On 3.9 a ProcessPoolExecutor can hang in shutdown() when futures still
# pending are cancelled just before it (CPython gh-94440; the fix reached 3.10
# and 3.11 in patch releases, never 3.9), as map() does with the calls after
# the one that raised: there the failing call is the last.
_AFTER_THE_ERROR = [5] if sys.version_info >= (3, 10) else []


def test_map_raises_the_first_exception_in_order():
    with executor() as ex:
        results = ex.map(divmod, [1] * (3 + len(_AFTER_THE_ERROR)), [2, 3, 0, *_AFTER_THE_ERROR])
        assert next(results) == (0, 1)
        assert next(results) == (0, 1)
        with pytest.raises(ZeroDivisionError):
            next(results)


def test_map_times_out():
    ex, event = with_event()
    with ex:
        results = []
        with pytest.raises(futures.TimeoutError):
            for value in ex.map(wait_event, range(3), timeout=0.5):
                results.append(value)
        event.set()
    assert results == []  # each waits for the event, set only now


def test_shutdown_right_after_map():
    ex = executor()
    ex.map(str, [2] * 6)
    ex.shutdown()


def test_the_executor_keeps_no_reference_to_a_submitted_callable():
    obj = MyObject()
    collected = threading.Event()
    ref = weakref.ref(obj, lambda _: collected.set())
    with executor() as ex:
        ex.submit(obj.my_method)
        del obj
        assert collected.wait(TIMEOUT)
    assert ref() is None


def test_the_result_iterator_keeps_no_reference_to_results():
    import gc

    with executor() as ex:
        for obj in ex.map(make_dummy_object, range(10)):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None


# -- ProcessPoolExecutorTest ---------------------------------------------------------


def test_a_killed_worker_breaks_the_pool():
    ex, _ = with_event()
    with ex:
        fut = ex.submit(wait_event)
        proc = next(iter(ex._processes.values()))
        proc.terminate()
        with pytest.raises(BrokenProcessPool):
            fut.result(TIMEOUT)
        with pytest.raises(BrokenProcessPool):
            ex.submit(pow, 2, 8)


def test_the_remote_traceback_is_attached():
    with executor() as ex:
        with pytest.raises(RuntimeError) as info:
            ex.submit(raise_runtime_error).result(TIMEOUT)
    assert info.value.args == (123,)
    cause = info.value.__cause__
    assert type(cause) is futures.process._RemoteTraceback
    assert "raise RuntimeError(123)  # some comment" in cause.tb


def test_saturation_starts_at_most_max_workers():
    sem = CTX.Semaphore(0)
    with executor(3) as ex:
        for _ in range(15 * 3):
            ex.submit(sem.acquire)
        assert len(ex._processes) == 3
        for _ in range(15 * 3):
            sem.release()


def test_an_idle_worker_is_reused():
    with executor(4) as ex:
        assert ex.submit(mul, 21, 2).result(TIMEOUT) == 42
        assert ex.submit(mul, 6, 7).result(TIMEOUT) == 42
        assert ex.submit(mul, 3, 14).result(TIMEOUT) == 42
        assert len(ex._processes) == 1


needs_max_tasks = pytest.mark.skipif(sys.version_info < (3, 11),
                                     reason="max_tasks_per_child: 3.11+")


@needs_max_tasks
def test_max_tasks_per_child_replaces_the_worker():
    with executor(1, max_tasks_per_child=3) as ex:
        first = ex.submit(os.getpid).result(TIMEOUT)
        assert ex.submit(os.getpid).result(TIMEOUT) == first
        assert ex.submit(os.getpid).result(TIMEOUT) == first
        assert ex.submit(os.getpid).result(TIMEOUT) != first
        assert len(ex._processes) == 1


@needs_max_tasks
def test_max_tasks_per_child_finishes_every_task_at_an_early_shutdown():
    ex = executor(3, max_tasks_per_child=1)
    futs = [ex.submit(mul, i, i) for i in range(6)]
    ex.shutdown()
    assert [f.result(TIMEOUT) for f in futs] == [i * i for i in range(6)]


def test_workers_are_our_direct_children():
    with executor(2) as ex:
        ex.submit(pow, 1, 1).result(TIMEOUT)
        for proc in ex._processes.values():
            assert ex.submit(os.getppid).result(TIMEOUT) == os.getpid()
            assert proc._parent_pid == os.getpid()


# -- initializers ----------------------------------------------------------------------


def test_the_initializer_runs_in_each_worker():
    with executor(2, initializer=init, initargs=("initialized",)) as ex:
        assert [ex.submit(get_init_status).result(TIMEOUT) for _ in range(2)] == ["initialized"] * 2


def test_a_failing_initializer_breaks_the_executor(capfd):
    ex = executor(2, initializer=init_fail)
    try:
        try:
            fut = ex.submit(get_init_status)
        except futures.BrokenExecutor:
            pass
        else:
            with pytest.raises(futures.BrokenExecutor):
                fut.result(TIMEOUT)
        with pytest.raises(futures.BrokenExecutor):
            ex.submit(get_init_status)
    finally:
        ex.shutdown()
    assert "error in initializer" in capfd.readouterr().err


# -- shutdown ---------------------------------------------------------------------------


def test_submit_after_shutdown_raises():
    ex = executor()
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(pow, 2, 5)


def test_shutdown_ends_the_workers():
    ex = executor(3)
    for _ in range(3):
        ex.submit(mul, 21, 2)
    procs = list(ex._processes.values())
    ex.shutdown()
    assert all(p.exitcode == 0 for p in procs)


def test_leaving_the_with_block_waits_for_the_workers():
    with executor(5) as ex:
        assert list(ex.map(abs, range(-5, 5))) == [abs(i) for i in range(-5, 5)]
        procs = list(ex._processes.values())
    assert all(p.exitcode == 0 for p in procs)


def test_shutdown_cancel_futures_cancels_the_pending_ones():
    ex, event = with_event(1)
    running = ex.submit(wait_event)
    pending = [ex.submit(pow, 2, 2) for _ in range(10)]
    threading.Timer(0.2, event.set).start()
    ex.shutdown(cancel_futures=True)
    assert running.result(TIMEOUT) is True
    assert any(f.cancelled() for f in pending)


def test_shutdown_without_wait_lets_the_work_finish():
    ex = executor(5)
    res = ex.map(abs, range(-5, 5))
    manager, procs, call_queue = ex._executor_manager_thread, dict(ex._processes), ex._call_queue
    ex.shutdown(wait=False)
    assert list(res) == [abs(i) for i in range(-5, 5)]
    manager.join(TIMEOUT)  # everything is cleaned up without our waiting
    for proc in procs.values():
        assert (proc.join(TIMEOUT), proc.exitcode) == (None, 0)
    call_queue.join_thread()


# -- crashes (test_deadlock) ----------------------------------------------------------------


@pytest.mark.parametrize("func, arg, error", [
    (identity, ErrorAtPickle(), RuntimeError),  # error pickling the task: raised here
    (identity, ExitAtUnpickle(), BrokenProcessPool),
    (identity, ErrorAtUnpickle(), BrokenProcessPool),
    (identity, CrashAtUnpickle(), BrokenProcessPool),
    (call, _crash, BrokenProcessPool),  # the worker dies in the function
    (call, _exit, SystemExit),
    (call, _raise, RuntimeError),
    (returns, CrashAtPickle, BrokenProcessPool),  # ... while pickling the result
    (returns, ErrorAtPickle, RuntimeError),
])
def test_a_worker_failing_at_each_stage_fails_the_future_without_a_hang(func, arg, error):
    ex = executor(2)
    try:
        with pytest.raises(error):
            ex.submit(func, arg).result(TIMEOUT)
    finally:
        ex.shutdown(wait=True)


def test_shutdown_of_a_broken_pool_does_not_hang():
    with executor(2) as ex:
        fut = ex.submit(call, _crash)
        with pytest.raises(BrokenProcessPool):
            fut.result(TIMEOUT)


# -- wait and as_completed ----------------------------------------------------------------------


def test_wait_first_completed_all_completed_first_exception():
    ex, event = with_event(3)
    with ex:
        slow = ex.submit(wait_event)
        quick = ex.submit(mul, 21, 2)
        done, not_done = futures.wait([slow, quick], timeout=TIMEOUT,
                                      return_when=futures.FIRST_COMPLETED)
        assert done == {quick} and not_done == {slow}
        failing = ex.submit(call, _raise)
        done, not_done = futures.wait([slow, failing], timeout=TIMEOUT,
                                      return_when=futures.FIRST_EXCEPTION)
        assert done == {failing} and not_done == {slow}
        done, not_done = futures.wait([slow], timeout=0.1)
        assert not done and not_done == {slow}
        event.set()
        done, not_done = futures.wait([slow, quick, failing], timeout=TIMEOUT)
        assert done == {slow, quick, failing} and not not_done


def test_as_completed_yields_each_future_once():
    with executor(3) as ex:
        futs = [ex.submit(mul, i, 2) for i in range(6)]
        seen = list(futures.as_completed(futs + futs[:2], timeout=TIMEOUT))
    assert sorted(f.result() for f in seen) == [i * 2 for i in range(6)]
