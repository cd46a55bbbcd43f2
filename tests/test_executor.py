"""forkserver.Executor: its arguments, results and errors, events, and the lives of its workers.

The standard library's own tests, adapted, are in test_executor_stdlib.py;
interrupts, threads, interpreter exit and a killed parent in
test_executor_safety.py.
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
from concurrent.futures import BrokenExecutor, Future
from concurrent.futures.process import BrokenProcessPool

import pytest

import forkserver
from forkserver import Executor, Template, WorkerDiedError
from forkserver._pool import _loop

from . import _executor_tasks as T

WAIT = 30  # seconds: a deadline for anything that should take milliseconds


def live_workers(ex: Executor) -> int:
    return len(ex._pool.procs)


@pytest.fixture
def ex(no_leaks):
    executor = Executor(2)
    yield executor
    executor.shutdown()


# -- arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"max_workers": 0}, "max_workers must be greater than 0"),
    ({"max_workers": -1}, "max_workers must be greater than 0"),
    ({"max_workers": 2, "min_workers": 3}, "min_workers"),
    ({"load": 0}, "load"),
    ({"idle_timeout": 0}, "idle_timeout"),
    ({"max_tasks_per_child": 0}, "max_tasks_per_child must be >= 1"),
])
def test_bad_counts_are_value_errors_naming_the_argument(kwargs, message, no_leaks):
    with pytest.raises(ValueError, match=message):
        Executor(**kwargs)


def test_a_preload_that_fails_to_import_raises_at_construction_with_its_type(no_leaks):
    with pytest.raises(ModuleNotFoundError, match="no_such_module_for_executor"):
        Executor(1, preload=["no_such_module_for_executor"])


def test_an_initializer_that_cannot_be_pickled_is_refused_at_construction(no_leaks):
    with pytest.raises(Exception, match="initializer and initargs must be picklable"):
        Executor(1, initializer=lambda: None)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        Executor(1, initializer=3)


def test_max_workers_defaults_to_the_cpus_this_process_may_use(no_leaks):
    with Executor() as ex:
        assert ex._max_workers == len(os.sched_getaffinity(0))


# -- results and errors ---------------------------------------------------------------


def test_submit_runs_the_call_in_a_worker_that_is_our_child(ex):
    assert ex.submit(T.mul, 6, y=7).result(WAIT) == 42
    pid = ex.submit(T.pid).result(WAIT)
    assert pid != os.getpid()
    import psutil

    assert psutil.Process(pid).ppid() == os.getpid()


def test_workers_are_forks_of_the_given_template_and_the_template_is_left_as_it_was(no_leaks):
    with Template() as tpl:
        tpl.require("tests._executor_tasks")
        tpl.eval("import tests._executor_tasks as t; t.INIT_VALUE = 'set in the template'")
        with Executor(1, template=tpl) as ex:
            assert ex.submit(T.get_init).result(WAIT) == "set in the template"
        # the template is still open, and still forks
        tpl.eval("assert t.INIT_VALUE == 'set in the template'")
        child = tpl.fork().run("tests._executor_tasks:report_modules")
        assert "tests._executor_tasks" in _read_pickle(child)
        assert child.wait(WAIT) == 0


def _read_pickle(child) -> object:
    child.control.setblocking(True)
    data = b""
    while True:
        chunk = child.control.recv(65536)
        if not chunk:
            break
        data += chunk
    child.control.close()
    return pickle.loads(data)


def test_items_sent_to_the_template_go_to_the_initializer_before_initargs(no_leaks):
    r, w = os.pipe()
    try:
        with Template() as tpl:
            tpl.send_arg("first").send_fh(r)
            with Executor(1, template=tpl, initializer=T.keep_all, initargs=("last",)) as ex:
                assert ex.submit(T.describe_kept).result(WAIT) == ["first", "fd", "last"]
    finally:
        os.close(r)
        os.close(w)


def test_a_remote_exception_keeps_its_type_and_its_remote_traceback(ex):
    with pytest.raises(ValueError, match="went wrong") as info:
        ex.submit(T.boom, "went wrong").result(WAIT)
    cause = info.value.__cause__
    assert isinstance(cause, forkserver.RemoteTraceback)
    assert "raise ValueError(message)" in str(cause)
    with pytest.raises(T.CustomError) as info:
        ex.submit(T.raise_custom).result(WAIT)
    assert info.value.args == ("custom", 1)


def test_an_exception_whose_type_cannot_be_rebuilt_arrives_as_remote_error(ex):
    with pytest.raises(forkserver.RemoteError, match="made in the worker") as info:
        ex.submit(T.raise_local_type).result(WAIT)
    assert "Local" in info.value.remote_type
    assert "raise Local" in str(info.value.__cause__)


def test_an_unpicklable_argument_fails_only_its_future_and_at_once(ex):
    future = ex.submit(T.ident, lambda: None)
    assert future.done()
    assert isinstance(future.exception(), (pickle.PicklingError, AttributeError, TypeError))
    assert ex.submit(T.ident, 5).result(WAIT) == 5


def test_an_unpicklable_result_fails_only_its_future(ex):
    with pytest.raises(TypeError, match="Unpicklable refuses"):
        ex.submit(T.return_unpicklable).result(WAIT)
    assert ex.submit(T.ident, 5).result(WAIT) == 5


def test_large_bytes_and_numpy_arrays_travel_out_of_band_both_ways(ex):
    numpy = pytest.importorskip("numpy")
    data = os.urandom(3 << 20)
    assert ex.submit(T.ident, data).result(WAIT) == data
    assert ex.submit(T.nbytes, bytearray(data)).result(WAIT) == len(data)
    arr = numpy.arange(2_000_000, dtype=numpy.int64)
    assert ex.submit(T.array_sum, arr).result(WAIT) == arr.sum()
    back = ex.submit(T.make_array, 1_500_000).result(WAIT)
    assert back.dtype == numpy.int64 and (back == numpy.arange(1_500_000)).all()
    assert ex.submit(T.big_bytes, 5 << 20).result(WAIT) == b"x" * (5 << 20)
    small = numpy.arange(10)
    assert (ex.submit(T.ident, small).result(WAIT) == small).all()


# -- a dead worker fails only its own task ------------------------------------------------


def test_a_worker_that_exits_fails_only_its_task_with_its_pid_and_status(ex):
    others = [ex.submit(T.mul, i, 2) for i in range(10)]
    with pytest.raises(WorkerDiedError) as info:
        ex.submit(T.exit_now, 3).result(WAIT)
    err = info.value
    assert isinstance(err, BrokenProcessPool) and isinstance(err, forkserver.ForkserverError)
    assert err.returncode == 3 and err.signal is None and err.pid > 0
    assert f"worker {err.pid} exited with status 3" in str(err)
    assert [f.result(WAIT) for f in others] == [i * 2 for i in range(10)]
    assert ex.submit(T.ident, "after").result(WAIT) == "after"


def test_a_worker_killed_mid_task_fails_that_task_and_the_next_100_complete(no_leaks):
    started = threading.Event()
    pids = []

    def on_event(future, pid):
        pids.append(pid)
        started.set()

    with Executor(2, on_event=on_event) as ex:
        victim = ex.submit(T.announce_then_wait, 60)
        assert started.wait(WAIT)
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(WorkerDiedError) as info:
            victim.result(WAIT)
        assert info.value.pid == pids[0]
        assert info.value.returncode == -signal.SIGKILL
        assert info.value.signal == signal.SIGKILL
        assert "killed by SIGKILL" in str(info.value) and "announce_then_wait" in str(info.value)
        futures = [ex.submit(T.mul, i, i) for i in range(100)]
        assert [f.result(WAIT) for f in futures] == [i * i for i in range(100)]
        assert pids[0] not in {f.result() for f in [ex.submit(T.pid) for _ in range(4)]}


def test_a_worker_that_dies_of_a_segfault_names_the_signal(ex):
    with pytest.raises(WorkerDiedError, match="killed by SIGSEGV"):
        ex.submit(T.kill_self, signal.SIGSEGV).result(WAIT)


def test_workers_dying_before_any_task_finishes_are_a_crash_loop_that_breaks_the_executor(no_leaks):
    with Executor(1) as ex:
        futures = [ex.submit(T.kill_self) for _ in range(_loop.CRASH_LOOP + 3)]
        errors = [f.exception(WAIT) for f in futures]
        assert all(isinstance(e, WorkerDiedError) for e in errors[: _loop.CRASH_LOOP])
        for err in errors[_loop.CRASH_LOOP:]:
            assert type(err) is BrokenProcessPool and "crash loop" in str(err)
        with pytest.raises(BrokenProcessPool, match="crash loop"):
            ex.submit(T.ident, 1)


def test_a_finished_task_resets_the_crash_loop_count(ex):
    for _ in range(2 * _loop.CRASH_LOOP):
        with pytest.raises(WorkerDiedError):
            ex.submit(T.exit_now, 1).result(WAIT)
        assert ex.submit(T.ident, 1).result(WAIT) == 1


def test_a_failing_initializer_breaks_the_executor_with_the_remote_traceback_as_cause(no_leaks):
    with Executor(2, initializer=T.init_fails) as ex:
        with pytest.raises(BrokenExecutor) as info:
            ex.submit(T.get_init).result(WAIT)
        cause = info.value.__cause__
        assert isinstance(cause, ValueError) and "error in initializer" in str(cause)
        assert "raise ValueError" in str(cause.__cause__)  # the remote traceback
        with pytest.raises(BrokenProcessPool, match="initializer"):
            ex.submit(T.get_init)


def test_the_initializer_runs_once_in_each_worker(no_leaks):
    with Executor(2, initializer=T.set_init, initargs=("initialized",)) as ex:
        assert {ex.submit(T.get_init).result(WAIT) for _ in range(6)} == {"initialized"}


# -- events ------------------------------------------------------------------------


def test_on_event_gets_each_event_in_order_before_the_result(no_leaks):
    seen = []

    def on_event(future, obj):
        assert not future.done()
        seen.append(obj)

    with Executor(1, on_event=on_event) as ex:
        future = ex.submit(T.events, 5)
        future.add_done_callback(lambda f: seen.append("done"))
        assert future.result(WAIT) == "done"
    assert seen == [("progress", i) for i in range(5)] + ["done"]


def test_an_error_in_on_event_is_logged_and_the_task_still_completes(no_leaks, caplog):
    def on_event(future, obj):
        raise RuntimeError("on_event broke")

    with Executor(1, on_event=on_event) as ex:
        assert ex.submit(T.events, 2).result(WAIT) == "done"
    assert "exception calling on_event" in caplog.text


def test_event_without_on_event_does_nothing_and_outside_a_task_raises(ex):
    assert ex.submit(T.events, 3).result(WAIT) == "done"
    with pytest.raises(RuntimeError, match="only in a task run by forkserver.Executor"):
        forkserver.worker.event("in the parent")


# -- the lives of workers ----------------------------------------------------------------


def test_min_workers_are_started_at_once(no_leaks):
    with Executor(3, min_workers=2) as ex:
        assert ex._pool.wait_until(lambda p: len(p.idle) == 2, WAIT)


def test_workers_start_on_demand_up_to_max_workers(no_leaks):
    r, w = os.pipe()
    try:
        with Template() as tpl, Executor(3, template=tpl.send_fh(r), initializer=T.keep) as ex:
            assert live_workers(ex) == 0
            blocked = [ex.submit(T.wait_on_kept) for _ in range(10)]
            assert ex._pool.wait_until(lambda p: len(p.procs) == 3, WAIT)
            os.write(w, b"x" * 10)
            assert len({f.result(WAIT) for f in blocked}) == 3
            assert live_workers(ex) == 3
    finally:
        os.close(r)
        os.close(w)


def test_idle_workers_exit_after_idle_timeout_but_never_below_min_workers(no_leaks):
    with Executor(3, min_workers=1, idle_timeout=0.2) as ex:
        r, w = os.pipe()
        futures = [ex.submit(T.sleep_then, 0.3) for _ in range(3)]
        [f.result(WAIT) for f in futures]
        os.close(r)
        os.close(w)
        assert ex._pool.wait_until(lambda p: len(p.procs) == 1, WAIT)
        assert ex.submit(T.ident, 1).result(WAIT) == 1


def test_max_tasks_per_child_replaces_a_worker_after_that_many_tasks(no_leaks):
    with Executor(1, max_tasks_per_child=3) as ex:
        pids = [ex.submit(T.pid).result(WAIT) for _ in range(7)]
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]


def test_load_gives_a_worker_that_many_tasks_at_once(no_leaks):
    r, w = os.pipe()
    try:
        with Template() as tpl, Executor(1, template=tpl.send_fh(r), initializer=T.keep,
                                         load=3) as ex:
            blocked = [ex.submit(T.wait_on_kept) for _ in range(3)]
            assert ex._pool.wait_until(
                lambda p: sum(len(x.inflight) for x in p.procs.values()) == 3, WAIT)
            os.write(w, b"x" * 3)
            assert len({f.result(WAIT) for f in blocked}) == 1
    finally:
        os.close(r)
        os.close(w)


def test_tasks_go_to_the_least_loaded_worker(no_leaks):
    with Executor(2, min_workers=2, load=2) as ex:
        assert ex._pool.wait_until(lambda p: len(p.idle) == 2, WAIT)
        slow = [ex.submit(T.sleep_then, 0.5, i) for i in range(2)]
        loads = sorted(len(w.inflight) for w in ex._pool.procs.values())
        assert loads == [1, 1]
        assert [f.result(WAIT) for f in slow] == [0, 1]


def test_shutdown_waits_for_the_queue_then_every_worker_is_reaped(no_leaks):
    ex = Executor(2)
    futures = [ex.submit(T.sleep_then, 0.05, i) for i in range(6)]
    ex.shutdown(wait=True)
    assert [f.result(0) for f in futures] == list(range(6))
    assert not ex._pool.procs and ex._pool.finished.is_set()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(T.ident, 1)
    ex.shutdown()  # again: a no-op


def test_shutdown_cancel_futures_cancels_what_has_not_started(no_leaks):
    ex = Executor(1)
    futures = [ex.submit(T.sleep_then, 0.1, i) for i in range(20)]
    ex.shutdown(wait=True, cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    assert len(cancelled) >= 15
    for i, future in enumerate(futures):
        if not future.cancelled():  # it had started: it ran to its end
            assert future.result(0) == i


def test_shutdown_without_wait_returns_at_once_and_the_work_still_completes(no_leaks):
    ex = Executor(1)
    futures = [ex.submit(T.sleep_then, 0.05, i) for i in range(4)]
    ex.shutdown(wait=False)
    assert [f.result(WAIT) for f in futures] == list(range(4))
    assert ex._pool.finished.wait(WAIT)


def test_an_executor_dropped_without_shutdown_finishes_its_work_and_reaps_its_workers(no_leaks):
    import gc

    ex = Executor(1)
    future = ex.submit(T.sleep_then, 0.1, "kept")
    pool = ex._pool
    del ex
    gc.collect()
    assert future.result(WAIT) == "kept"
    assert pool.finished.wait(WAIT)


def test_the_worker_loop_loads_neither_threading_nor_concurrent_futures(no_leaks):
    # Compared with a plain worker of the same template: what the template
    # has loaded itself is not the executor's doing.
    with Template().require("tests._executor_tasks") as tpl:
        plain = tpl.fork().run("tests._executor_tasks:report_modules")
        baseline = set(_read_pickle(plain))
        assert plain.wait(WAIT) == 0
        with Executor(1, template=tpl) as ex:
            added = set(ex.submit(T.modules).result(WAIT)) - baseline
    assert added <= {"forkserver._pool", "forkserver._pool._executor_worker"}, sorted(added)


def test_a_future_is_a_concurrent_futures_future(ex):
    future = ex.submit(T.ident, 1)
    assert isinstance(future, Future)
    assert isinstance(ex, __import__("concurrent.futures").futures.Executor)
    assert future.result(WAIT) == 1


# -- map -----------------------------------------------------------------------------------


def test_map_streams_two_calls_per_worker_while_submit_keeps_to_load(no_leaks):
    r, w = os.pipe()
    try:
        with Template() as tpl, Executor(1, template=tpl.send_fh(r), initializer=T.keep) as ex:
            results = ex.map(T.wait_on_kept_arg, range(4))
            assert ex._pool.wait_until(
                lambda p: sum(len(x.inflight) for x in p.procs.values()) == 2, WAIT)
            assert len(ex._pool.queue) == 2
            os.write(w, b"x" * 4)
            assert len(set(results)) == 1  # one worker ran them all
            blocked = [ex.submit(T.wait_on_kept) for _ in range(2)]
            assert ex._pool.wait_until(lambda p: len(p.queue) == 1, WAIT)  # load=1 for submit
            os.write(w, b"x" * 2)
            assert [f.result(WAIT) for f in blocked] == [blocked[0].result()] * 2
    finally:
        os.close(r)
        os.close(w)


def test_map_fails_an_unpicklable_call_in_its_place(ex):
    results = ex.map(T.ident, [1, lambda: None, 3])
    assert next(results) == 1
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        next(results)


def test_closing_the_map_iterator_cancels_the_calls_not_started(no_leaks):
    with Executor(1) as ex:
        results = ex.map(T.sleep_then, [0.2] * 6, range(6))
        assert next(results) == 0
        results.close()
        queued = list(ex._pool.queue)
        assert queued and all(task.cancelled() for task in queued)
        assert ex.submit(T.ident, "after").result(WAIT) == "after"


def test_map_with_chunks_and_several_iterables_matches_the_builtin(ex):
    assert list(ex.map(T.mul, range(50), range(50, 100), chunksize=7)) == \
        [a * b for a, b in zip(range(50), range(50, 100))]


def test_map_with_on_event_gives_on_event_real_futures(no_leaks):
    seen = []
    with Executor(1, on_event=lambda future, obj: seen.append(type(future))) as ex:
        assert list(ex.map(T.events, [1, 2])) == ["done", "done"]
    assert seen == [Future] * 3


def test_map_streams_deeper_while_its_calls_are_fast_and_back_to_two_after_a_slow_one(no_leaks):
    from forkserver._pool import _dispatch

    with Executor(1) as ex:
        worker_of = lambda: next(iter(ex._pool.procs.values()))  # noqa: E731
        assert list(ex.map(T.ident, range(200))) == list(range(200))
        worker = worker_of()
        assert worker.fast
        assert ex._pool._limit(worker, _map_task()) == _dispatch.MAP_LOAD_FAST
        assert list(ex.map(T.sleep_then, [0.01], [1])) == [1]
        assert not worker.fast
        assert ex._pool._limit(worker, _map_task()) == _dispatch.MAP_LOAD


def _map_task():
    from forkserver._pool._map import MapTask, Results

    return MapTask([], 0, T.ident, Results())


def test_a_template_that_cannot_fork_breaks_the_executor_after_a_few_tries_saying_why(no_leaks):
    with Template().require("tests._threaded_mod") as tpl, Executor(1, template=tpl) as ex:
        with pytest.raises(BrokenProcessPool, match="could not start a worker") as info:
            ex.submit(T.ident, 1).result(WAIT)
        assert isinstance(info.value.__cause__, forkserver.ThreadedTemplateError)
        assert f"({_loop.CRASH_LOOP} failures in a row)" in str(info.value)


def test_a_dead_template_breaks_the_executor_when_it_needs_a_new_worker(no_leaks):
    with Template() as tpl:
        ex = Executor(2, template=tpl, max_tasks_per_child=1)
        assert ex.submit(T.ident, 1).result(WAIT) == 1
        os.kill(tpl.pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool, match="could not start a worker"):
            for _ in range(3):
                ex.submit(T.ident, 2).result(WAIT)
        ex.shutdown()
