"""What every multiprocessing context offers, with forkserver.mp_context(): processes, queues.

(Synchronisation, shared memory, managers, pools and connections are in
``test_mp_stdlib_sync.py``.)

Adapted (in our own words) from CPython's ``Lib/test/_test_multiprocessing.py``
(3.13, checked against 3.9's): the ``processes`` flavour of ``_TestProcess``,
``_TestSubclassingProcess``, ``_TestQueue``, ``_TestLock``, ``_TestSemaphore``,
``_TestCondition``, ``_TestEvent``, ``_TestBarrier``, ``_TestValue``,
``_TestArray``, ``_TestContainers`` (the manager), ``_TestPool``,
``_TestPoolWorkerLifetime``, ``_TestConnection`` and ``_TestPicklingConnections``
(fd transfer), ``_TestSharedMemory`` (across processes).  Every child is
started with our context, which preloads this module (its targets).
CPython's own classes also run, unchanged, with our context as the default
one: ``test_mp_cpython_multiprocessing.py``.

Left out, and why:

* the ``threads`` and ``manager`` flavours of the same classes: they test
  ``multiprocessing.dummy`` and proxies, not a start method;
* ``test_set_executable``: our children are forks, never exec'd, so the
  executable does not apply (documented);
* ``test_forkserver_sigint/sigkill`` (the server dies): ours have no server;
  ``test_mp_context.py`` kills the template instead;
* timings (``assertTimingAlmostEqual``, ``TimingWrapper``): speed is measured
  in benchmarks; every wait here has a deadline instead of a ``sleep``;
* ``test_many_processes`` runs 20 processes, not 100 (2 shared CPUs);
* listeners/clients, ``_TestPoll``, the heap's internals, ``_TestFinalize``,
  ``_TestLogging``, ``TestManagerExceptions``, ``test_no_import_lock_contention``:
  no start method in them;
* ``_TestRemoteManager``/``_TestManagerRestart`` (TCP managers), shared-memory
  tests that need no child, and ``test_closed_queue_*``,
  ``test_error_on_stdio_flush_*`` that replace
  ``sys.stdout`` in the parent: the first need no child of ours, the last is
  pytest's ``sys.stdout``;
* ``test_recursion`` starts one child per level, not two (a child that
  starts processes builds a template of its own: ~0.3 s).
"""
from __future__ import annotations

import gc
import os
import queue as pyqueue
import signal
import sys
import threading
import weakref
from multiprocessing import connection

import pytest

from forkserver._pool._mp import TemplateContext

from ._mp_helpers import (  # noqa: F401
    close_queue,
    join,
    module_context,
    mp_no_leaks,
    mp_tracker,
    readable,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("mp_no_leaks")

TIMEOUT = 30.0
SHORT = 0.1  # a wait that must time out
# Built on first use, not at import: pytest imports every module before it
# runs any, and a context's waiting child would stand among other modules'
# children meanwhile.  (mp_context() builds at once, to raise preload errors.)
CTX = TemplateContext(preload=[__name__])


@pytest.fixture(scope="module", autouse=True)
def _built_then_closed():
    with module_context(CTX):
        yield


# -- targets --------------------------------------------------------------------


def put_args(q, *args, **kwargs):
    current = CTX.current_process()
    q.put(args)
    q.put(kwargs)
    q.put(current.name)
    q.put(bytes(current.authkey))
    q.put(current.pid)


def put_one(q, value):
    q.put(value)


def send_parent(conn):
    parent = CTX.parent_process()
    conn.send((parent.pid, parent.name))


def make_grandchild(conn):
    proc = CTX.Process(target=report_parent_status, args=(conn,))
    proc.start()
    threading.Event().wait(300)  # until terminated


def report_parent_status(conn):
    parent = CTX.parent_process()
    conn.send("alive" if parent.is_alive() else "not alive")
    parent.join(timeout=TIMEOUT)
    conn.send("alive" if parent.is_alive() else "not alive")


def sleep_long():
    threading.Event().wait(100)


def wait_for_event(event):
    event.wait(TIMEOUT)


def get_then_exit(q, rc=0):
    q.get(timeout=TIMEOUT)
    sys.exit(rc)


def recurse(conn, path):
    conn.send(path)
    if len(path) < 2:
        proc = CTX.Process(target=recurse, args=(conn, path + [len(path)]))
        proc.start()
        assert join(proc) == 0


class Callable:
    def __call__(self, q, me):
        assert isinstance(me, Callable)
        q.put(5)


def count_fds(event, q):
    q.put(len(os.listdir("/proc/self/fd")))
    event.wait(TIMEOUT)


def start_threads(event):
    def slow():
        threading.Event().wait(0.5)
        event.set()

    threading.Thread(target=slow).start()
    threading.Thread(target=threading.Event().wait, args=(20,), daemon=True).start()


def write_stderr_then_fail(path):
    sys.stderr = open(path, "w", encoding="utf-8")
    1 / 0  # MARKER


def write_stderr_then_exit(reason, path):
    sys.stderr = open(path, "w", encoding="utf-8")
    sys.exit(reason)


class UpperCaser(CTX.Process):
    def __init__(self):
        super().__init__()
        self.child_conn, self.parent_conn = CTX.Pipe()

    def run(self):
        self.parent_conn.close()
        for text in iter(self.child_conn.recv, None):
            self.child_conn.send(text.upper())
        self.child_conn.close()

    def submit(self, text):
        self.parent_conn.send(text)
        return self.parent_conn.recv()

    def stop(self):
        self.parent_conn.send(None)
        self.parent_conn.close()
        self.child_conn.close()


def drain(q, start, go_on):
    start.wait(TIMEOUT)
    for _ in range(6):
        q.get(timeout=TIMEOUT)
    go_on.set()


def fill(q, start, go_on):
    start.wait(TIMEOUT)
    for i in (2, 3, 4, 5):
        q.put(i)
    go_on.set()


def put_range(q):
    for i in range(10, 20):
        q.put(i)


def do_tasks(q):
    for _ in iter(q.get, None):
        q.task_done()


# -- Process ----------------------------------------------------------------------


def test_process_runs_its_target_with_args_kwargs_and_name():
    q = CTX.Queue(1)
    proc = CTX.Process(target=put_args, args=(q, 1, 2), kwargs={"hello": 23, "bye": 2.54},
                       name="SomeProcess")
    proc.daemon = True
    current = CTX.current_process()
    assert proc.authkey == current.authkey
    assert not proc.is_alive() and proc.daemon and proc.exitcode is None
    assert proc not in CTX.active_children()
    proc.start()
    assert proc.exitcode is None and proc.is_alive()
    assert proc in CTX.active_children()
    assert q.get(timeout=TIMEOUT) == (1, 2)
    assert q.get(timeout=TIMEOUT) == {"hello": 23, "bye": 2.54}
    assert q.get(timeout=TIMEOUT) == "SomeProcess"
    assert q.get(timeout=TIMEOUT) == current.authkey
    assert q.get(timeout=TIMEOUT) == proc.pid
    assert join(proc) == 0
    assert not proc.is_alive() and proc not in CTX.active_children()
    close_queue(q)


@pytest.mark.parametrize("args", [1, "str", [1], (1,)])
@pytest.mark.parametrize("kind", [list, tuple])
def test_args_may_be_a_list_or_a_tuple(args, kind):
    q = CTX.Queue(1)
    proc = CTX.Process(target=put_one, args=kind((q, args)))
    proc.start()
    assert q.get(timeout=TIMEOUT) == args
    join(proc)
    close_queue(q)


def test_daemon_defaults_to_the_current_process_flag():
    assert CTX.Process(target=noop_target).daemon == CTX.current_process().daemon
    assert CTX.Process(target=noop_target, daemon=True).daemon
    assert not CTX.Process(target=noop_target, daemon=False).daemon


def noop_target():
    pass


def test_the_child_knows_its_parent_process():
    assert CTX.parent_process() is None
    reader, writer = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=send_parent, args=(writer,))
    proc.start()
    join(proc)
    assert reader.recv() == (os.getpid(), CTX.current_process().name)
    reader.close()
    writer.close()


def test_a_grandchild_sees_its_parent_die():
    reader, writer = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=make_grandchild, args=(writer,))
    proc.start()
    try:
        assert reader.poll(TIMEOUT) and reader.recv() == "alive"
        proc.terminate()
        join(proc)
        assert reader.poll(TIMEOUT) and reader.recv() == "not alive"
    finally:
        reader.close()
        writer.close()
    # The grandchild was the child's: gone with it (it exited after its report).


def test_the_main_thread_native_id_is_the_childs_own():
    q = CTX.Queue()
    proc = CTX.Process(target=put_native_id, args=(q,))
    proc.start()
    child_id = q.get(timeout=TIMEOUT)
    join(proc)
    close_queue(q)
    assert child_id != threading.main_thread().native_id


def put_native_id(q):
    q.put(threading.main_thread().native_id)


@pytest.mark.parametrize("how, code", [("terminate", -signal.SIGTERM), ("kill", -signal.SIGKILL)])
def test_terminate_and_kill_end_a_sleeping_child(how, code):
    proc = CTX.Process(target=sleep_long, daemon=True)
    proc.start()
    assert proc.is_alive() and proc in CTX.active_children() and proc.exitcode is None
    proc.join(0)
    assert proc.is_alive()
    proc.join(-1)
    assert proc.is_alive()
    getattr(proc, how)()
    assert join(proc) == code
    assert not proc.is_alive() and proc not in CTX.active_children()


def test_cpu_count_is_a_positive_int():
    assert isinstance(CTX.cpu_count(), int) and CTX.cpu_count() >= 1


def test_children_can_start_children_of_their_own():
    reader, writer = CTX.Pipe(duplex=False)
    recurse(writer, [])  # the child starts a grandchild: with a template of its own
    got = []
    while reader.poll(0):
        got.append(reader.recv())
    assert got == [[], [0], [0, 1]]
    reader.close()
    writer.close()


def test_the_sentinel_becomes_ready_when_the_child_exits():
    event = CTX.Event()
    proc = CTX.Process(target=wait_for_event, args=(event,))
    with pytest.raises(ValueError):
        proc.sentinel
    proc.start()
    sentinel = proc.sentinel
    assert isinstance(sentinel, int)
    assert not connection.wait([sentinel], timeout=0)
    event.set()
    join(proc)
    assert connection.wait([sentinel], timeout=TIMEOUT)


def test_close_refuses_a_running_process_and_frees_a_finished_one():
    q = CTX.Queue()
    proc = CTX.Process(target=get_then_exit, args=(q,), daemon=True)
    proc.start()
    assert proc.is_alive()
    with pytest.raises(ValueError):
        proc.close()
    q.put(None)
    assert join(proc) == 0
    proc.close()
    with pytest.raises(ValueError):
        proc.is_alive()
    with pytest.raises(ValueError):
        proc.join()
    with pytest.raises(ValueError):
        proc.terminate()
    proc.close()
    ref = weakref.ref(proc)
    del proc
    gc.collect()
    assert ref() is None
    close_queue(q)


def test_many_processes_start_and_are_terminated():
    event = CTX.Event()  # kept: a child opens its semaphore by name once it runs
    procs = [CTX.Process(target=wait_for_event, args=(event,)) for _ in range(20)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.terminate()
    assert [join(proc) for proc in procs] == [-signal.SIGTERM] * 20


def test_the_target_is_not_kept_alive_by_the_process():
    target = Callable()
    ref = weakref.ref(target)
    q = CTX.Queue()
    proc = CTX.Process(target=target, args=(q, target))
    del target
    proc.start()
    join(proc)
    gc.collect()
    assert ref() is None
    assert q.get(timeout=TIMEOUT) == 5
    close_queue(q)


def test_children_have_as_many_fds_however_many_siblings_run():
    event = CTX.Event()
    q = CTX.Queue()
    procs = [CTX.Process(target=count_fds, args=(event, q)) for _ in range(5)]
    for proc in procs:
        proc.start()
    try:
        counts = [q.get(timeout=TIMEOUT) for _ in procs]
        assert len(set(counts)) == 1, counts
    finally:
        event.set()
        for proc in procs:
            join(proc)
        close_queue(q)


def test_a_child_waits_for_its_non_daemon_threads():
    event = CTX.Event()
    proc = CTX.Process(target=start_threads, args=(event,))
    proc.start()
    join(proc)
    assert event.is_set()


def test_subclassing_process_works():
    upper = UpperCaser()
    upper.daemon = True
    upper.start()
    assert upper.submit("hello") == "HELLO"
    assert upper.submit("world") == "WORLD"
    upper.stop()
    join(upper)


def test_stderr_is_flushed_when_a_child_fails(tmp_path):
    path = tmp_path / "err"
    proc = CTX.Process(target=write_stderr_then_fail, args=(str(path),))
    proc.start()
    assert join(proc) == 1
    text = path.read_text()
    assert "ZeroDivisionError" in text and "1 / 0  # MARKER" in text


@pytest.mark.parametrize("reason", [[1, 2, 3], "ignore this"])
def test_sys_exit_with_an_object_prints_it_and_exits_1(tmp_path, reason):
    path = tmp_path / "err"
    proc = CTX.Process(target=write_stderr_then_exit, args=(reason, str(path)), daemon=True)
    proc.start()
    assert join(proc) == 1
    assert path.read_text().rstrip() == str(reason)


@pytest.mark.parametrize("args, code",
                         [((True,), 1), ((False,), 0), ((8,), 8), ((None,), 0), ((), 0)])
def test_sys_exit_codes(args, code):
    proc = CTX.Process(target=sys.exit, args=args, daemon=True)
    proc.start()
    assert join(proc) == code


# -- queues -----------------------------------------------------------------------


def test_queue_put_blocks_when_full_and_raises_full():
    q = CTX.Queue(maxsize=6)
    start, go_on = CTX.Event(), CTX.Event()
    proc = CTX.Process(target=drain, args=(q, start, go_on), daemon=True)
    proc.start()
    assert q.empty() and not q.full()
    q.put(1)
    q.put(2, True)
    q.put(3, True, None)
    q.put(4, False)
    q.put(5, False, None)
    q.put_nowait(6)
    assert q.full()
    assert readable(q)
    for call in (lambda: q.put(7, False), lambda: q.put(7, False, None), lambda: q.put_nowait(7),
                 lambda: q.put(7, True, SHORT), lambda: q.put(7, False, SHORT),
                 lambda: q.put(7, True, timeout=SHORT)):
        with pytest.raises(pyqueue.Full):
            call()
    start.set()
    assert go_on.wait(TIMEOUT)
    assert q.empty() and not q.full()
    join(proc)
    close_queue(q)


def test_queue_get_returns_what_a_child_put_and_raises_empty():
    q = CTX.Queue()
    start, go_on = CTX.Event(), CTX.Event()
    proc = CTX.Process(target=fill, args=(q, start, go_on), daemon=True)
    proc.start()
    assert q.empty()
    start.set()
    assert go_on.wait(TIMEOUT)
    assert q.get(True, None) == 2
    assert q.get(True) == 3
    assert q.get(timeout=TIMEOUT) == 4
    assert readable(q)
    assert q.get_nowait() == 5
    assert q.empty()
    for call in (lambda: q.get(False), lambda: q.get(False, None), q.get_nowait,
                 lambda: q.get(True, SHORT), lambda: q.get(False, SHORT),
                 lambda: q.get(timeout=SHORT)):
        with pytest.raises(pyqueue.Empty):
            call()
    join(proc)
    close_queue(q)


def test_a_child_can_use_a_queue_whose_feeder_thread_runs_here():
    q = CTX.Queue()
    for i in range(10):
        q.put(i)
    proc = CTX.Process(target=put_range, args=(q,), daemon=True)
    proc.start()
    assert [q.get(timeout=TIMEOUT) for _ in range(20)] == list(range(20))
    with pytest.raises(pyqueue.Empty):
        q.get(False)
    join(proc)
    close_queue(q)


def test_queue_qsize_counts_items():
    q = CTX.Queue()
    assert q.qsize() == 0
    q.put(1)
    assert q.qsize() == 1
    q.put(5)
    assert q.qsize() == 2
    q.get(timeout=TIMEOUT)
    q.get(timeout=TIMEOUT)
    assert q.qsize() == 0
    close_queue(q)


def test_joinable_queue_join_waits_for_task_done_of_children():
    q = CTX.JoinableQueue()
    workers = [CTX.Process(target=do_tasks, args=(q,), daemon=True) for _ in range(4)]
    for proc in workers:
        proc.start()
    for i in range(10):
        q.put(i)
    q.join()
    for _ in workers:
        q.put(None)
    for proc in workers:
        assert join(proc) == 0
    close_queue(q)


def test_simple_queue_carries_objects_both_ways():
    q = CTX.SimpleQueue()
    proc = CTX.Process(target=put_one, args=(q, {"x": [1, 2]}))
    proc.start()
    assert q.get() == {"x": [1, 2]}
    join(proc)
    assert q.empty()
    q.close()
