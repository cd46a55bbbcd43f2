"""forkserver.Executor stays consistent under Ctrl-C, threads, callbacks, forks and deaths.

A KeyboardInterrupt is injected at every line of our code that ``submit``
and ``shutdown`` execute (tests/_ctrl_c_at.py); interpreter exit, a SIGKILLed
parent and Ctrl-C reaching the workers run in real subprocesses.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures.process import BrokenProcessPool

import pytest

import forkserver
from forkserver import Executor, WorkerDiedError
from forkserver._pool import _loop

from . import _executor_tasks as T
from ._helpers import run_in_child, wait_exitcode
from ._ctrl_c_at import ctrl_c_at

WAIT = 30
PACKAGE = os.path.dirname(os.path.abspath(forkserver.__file__))
ROOT = os.path.dirname(PACKAGE)


def _gone(pid: int) -> bool:
    try:
        os.close(os.pidfd_open(pid))
    except ProcessLookupError:
        return True
    return False


def _wait_gone(pid: int, timeout: float = WAIT) -> bool:
    """Wait for a process that is not our child to end (its pidfd turns readable)."""
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


# -- Ctrl-C at every line ------------------------------------------------------------


@pytest.mark.parametrize("path", ["to an idle worker", "into the queue", "map"])
def test_ctrl_c_at_any_line_of_submit_leaves_the_executor_consistent(path, no_leaks):
    r, w = os.pipe()
    ex = Executor(1, initializer=T.keep, template=forkserver.Template().send_fh(r))
    blocker = None
    try:
        assert ex.submit(T.ident, 0).result(WAIT) == 0
        if path == "into the queue":
            blocker = ex.submit(T.wait_on_kept)
        n, fired = 1, 0
        while True:
            with ctrl_c_at(n, PACKAGE) as probe:
                try:
                    if path == "map":
                        assert list(ex.map(T.ident, range(3))) == [0, 1, 2]
                    else:
                        ex.submit(T.ident, n)
                except KeyboardInterrupt:
                    pass
            if not probe.fired:
                break
            fired += 1
            if blocker is None:  # the executor still works; a torn write cost one worker at most
                assert ex.submit(T.ident, "next").result(WAIT) == "next"
            n += 1
        assert fired >= 5  # it really got into our code
        if blocker is not None:
            os.write(w, b"x")
            blocker.exception(WAIT)
            assert ex.submit(T.ident, "next").result(WAIT) == "next"
    finally:
        ex.shutdown(wait=True)  # returns: nothing is left half-queued
        os.close(r)
        os.close(w)
    assert ex._pool.finished.is_set() and not ex._pool.procs


@pytest.mark.parametrize("cancel", [False, True])
def test_ctrl_c_at_any_line_of_shutdown_leaves_it_to_complete_later(cancel, no_leaks):
    n = 1
    while True:
        ex = Executor(1)
        futures = [ex.submit(T.sleep_then, 0.01, i) for i in range(3)]
        with ctrl_c_at(n, PACKAGE) as probe:
            try:
                ex.shutdown(wait=True, cancel_futures=cancel)
            except KeyboardInterrupt:
                pass
        ex.shutdown(wait=True)  # the second call completes the first one's work
        for i, future in enumerate(futures):
            assert future.done()
            assert future.cancelled() or future.result(0) == i
        assert ex._pool.finished.is_set()
        if not probe.fired:
            break
        n += 1
    assert n > 3


def test_ctrl_c_while_waiting_for_a_result_leaves_the_future_to_complete(ex_one):
    import concurrent.futures

    stdlib = os.path.dirname(concurrent.futures.__file__)
    future = ex_one.submit(T.sleep_then, 0.3, "late")
    with ctrl_c_at(3, stdlib) as probe:
        with pytest.raises(KeyboardInterrupt):
            future.result(WAIT)
    assert probe.fired
    assert future.result(WAIT) == "late"


@pytest.fixture
def ex_one(no_leaks):
    executor = Executor(1)
    yield executor
    executor.shutdown()


# -- threads and callbacks --------------------------------------------------------------


def test_sixteen_threads_submitting_at_once_all_get_their_own_results(no_leaks):
    barrier = threading.Barrier(16)
    errors = []

    def submitter(k: int) -> None:
        try:
            barrier.wait(WAIT)
            futures = [ex.submit(T.mul, k, i) for i in range(100)]
            assert [f.result(WAIT) for f in futures] == [k * i for i in range(100)]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with Executor(3) as ex:
        threads = [threading.Thread(target=submitter, args=(k,)) for k in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
    assert not errors, errors[0]


def test_a_task_submitted_from_a_done_callback_runs(ex_one):
    second = []
    done = threading.Event()

    def callback(future):
        second.append(ex_one.submit(T.mul, future.result(), 10))
        done.set()

    ex_one.submit(T.ident, 4).add_done_callback(callback)
    assert done.wait(WAIT)
    assert second[0].result(WAIT) == 40


def test_shutdown_from_a_done_callback_does_not_wait_for_itself(no_leaks):
    ex = Executor(1)
    returned = threading.Event()

    def callback(future):
        ex.shutdown(wait=True)
        returned.set()

    ex.submit(T.ident, 1).add_done_callback(callback)
    assert returned.wait(WAIT)
    ex.shutdown(wait=True)


def test_loop_run_in_executor_and_wrap_future_work(ex_one):
    async def main():
        loop = asyncio.get_running_loop()
        direct = await loop.run_in_executor(ex_one, T.mul, 3, 4)
        wrapped = await asyncio.wrap_future(ex_one.submit(T.mul, 5, 6))
        many = await asyncio.gather(*[loop.run_in_executor(ex_one, T.ident, i) for i in range(20)])
        return direct, wrapped, many

    assert asyncio.run(main()) == (12, 30, list(range(20)))


# -- deaths, signals, forks ---------------------------------------------------------------


def test_a_worker_that_closes_its_socket_and_stays_is_killed_after_a_grace(no_leaks, monkeypatch):
    monkeypatch.setattr(_loop, "EXIT_GRACE", 0.3)
    with Executor(1) as ex:
        with pytest.raises(WorkerDiedError, match="did not exit after its socket closed") as info:
            ex.submit(T.close_control_then_sleep, 60).result(WAIT)
        assert info.value.returncode == -signal.SIGKILL
        assert ex.submit(T.ident, 1).result(WAIT) == 1


def test_ctrl_c_reaching_a_worker_interrupts_its_task_and_the_worker_stays(no_leaks):
    started = threading.Event()
    pids = []

    def on_event(future, pid):
        pids.append(pid)
        started.set()

    with Executor(1, on_event=on_event) as ex:
        future = ex.submit(T.announce_then_work, 60)
        assert started.wait(WAIT)
        os.kill(pids[0], signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            future.result(WAIT)
        assert ex.submit(T.pid).result(WAIT) == pids[0]
        os.kill(pids[0], signal.SIGINT)  # idle now: ignored
        assert ex.submit(T.pid).result(WAIT) == pids[0]


def test_an_os_fork_child_gets_a_broken_executor_and_the_parent_keeps_its_own(ex_one):
    assert ex_one.submit(T.ident, 1).result(WAIT) == 1

    def in_child():
        with pytest.raises(BrokenProcessPool, match="belongs to process"):
            ex_one.submit(T.ident, 2)
        ex_one.shutdown(wait=True)  # returns at once: nothing of it runs here

    import warnings

    with warnings.catch_warnings():  # 3.12+: fork() of a multi-threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = run_in_child(in_child)
    assert wait_exitcode(pid) == 0
    assert ex_one.submit(T.ident, 3).result(WAIT) == 3


# -- interpreter exit and a killed parent (real processes) -------------------------------


def _script(body: str) -> list:
    source = f"import sys\nsys.path.insert(0, {ROOT!r})\n" + textwrap.dedent(body)
    return [sys.executable, "-c", source]


def test_interpreter_exit_finishes_the_work_of_an_executor_never_shut_down():
    out = subprocess.run(_script("""
        from forkserver import Executor
        from tests._executor_tasks import print_after, pid
        if __name__ == "__main__":
            ex = Executor(2)
            print("worker", ex.submit(pid).result(), flush=True)
            ex.submit(print_after, 0.2, "apple")
    """), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.split()
    assert lines[-1] == "apple"
    assert _gone(int(lines[1]))  # reaped before the interpreter exited


def test_submit_after_interpreter_shutdown_raises_runtime_error():
    out = subprocess.run(_script("""
        import atexit
        @atexit.register
        def run_last():
            try:
                ex.submit(id, None)
            except RuntimeError as exc:
                print("runtime-error:", exc)
        from forkserver import Executor
        ex = Executor(1)
        ex.submit(id, 42).result()
    """), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "runtime-error: cannot schedule new futures after interpreter shutdown" in out.stdout


def test_workers_exit_when_their_parent_is_killed():
    proc = subprocess.Popen(_script("""
        from forkserver import Executor
        from tests._executor_tasks import sleep_then
        ex = Executor(2, min_workers=2)
        ex._pool.wait_until(lambda p: len(p.idle) == 2, 30)
        pids = [w.pid for w in ex._pool.procs.values()]
        busy = ex.submit(sleep_then, 0.5)  # one of them is in a task when we die
        print(*pids, ex._pool.template.pid, flush=True)
        sys.stdin.read()
    """), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    for pid in pids:  # the two workers and their template: EOF on their sockets
        assert _wait_gone(pid), f"process {pid} outlived its killed parent"


# -- functions of __main__ -------------------------------------------------------------------


def test_functions_of_a_script_run_as_main_are_found_as_multiprocessing_spawn_finds_them(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from forkserver import Executor

        def triple(x):
            return 3 * x

        if __name__ == "__main__":
            def hidden(x):  # under the guard: the worker's import of this file skips it
                return x

            with Executor(2) as ex:
                print(list(ex.map(triple, range(4))))
                try:
                    ex.submit(hidden, 1).result()
                except Exception as exc:
                    print(type(exc).__name__, "hidden" in str(exc), "top level" in str(exc))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[0, 3, 6, 9]", "BrokenProcessPool True True"]


def test_a_function_of_an_interactive_main_fails_at_submit_with_a_clear_error():
    out = subprocess.run(_script("""
        from forkserver import Executor
        def f(x):
            return x
        with Executor(1) as ex:
            print(ex.submit(f, 1).exception())
    """), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "is defined in an interactive __main__" in out.stdout
    assert "Define it in a module" in out.stdout


# -- stress: workers killed while many tasks run -----------------------------------------------


def _kill_busy_workers(tasks: int, kills: int) -> None:
    from concurrent.futures import as_completed

    with Executor(3) as ex:
        futures = [ex.submit(T.sleep_then, 0.001, i) for i in range(tasks)]
        killed = set()
        every = max(1, tasks // (kills + 1))
        for done, _ in enumerate(as_completed(futures), 1):
            if done % every == 0 and len(killed) < kills:
                with ex._pool.lock:  # a worker busy with a task, that finished some already
                    busy = [w for w in ex._pool.procs.values() if w.inflight and w.done]
                if busy:
                    os.kill(busy[0].pid, signal.SIGKILL)
                    killed.add(busy[0].pid)
        failed = 0
        for i, future in enumerate(futures):
            exc = future.exception(WAIT)
            if exc is None:
                assert future.result() == i
            else:
                assert isinstance(exc, WorkerDiedError) and exc.pid in killed, exc
                failed += 1
        assert killed and failed <= len(killed)  # load=1: one task per killed worker
        assert ex.submit(T.ident, "after").result(WAIT) == "after"


def test_workers_killed_among_many_tasks_fail_only_the_tasks_they_ran(no_leaks):
    _kill_busy_workers(tasks=300, kills=5)


@pytest.mark.slow
def test_workers_killed_among_many_tasks_fail_only_the_tasks_they_ran_long(no_leaks):
    _kill_busy_workers(tasks=5000, kills=60)
