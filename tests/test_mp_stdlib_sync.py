"""What every multiprocessing context offers, with forkserver.mp_context(): synchronisation,
shared memory, managers, pools, connections.

The second half of ``test_mp_stdlib.py`` (see its docstring: what is adapted from
CPython's ``_test_multiprocessing.py``, what is left out and why): ``_TestLock``,
``_TestSemaphore``, ``_TestCondition``, ``_TestEvent``, ``_TestBarrier``,
``_TestValue``, ``_TestArray``, ``_TestContainers``, ``_TestPool``,
``_TestPoolWorkerLifetime``, ``_TestConnection``, ``_TestPicklingConnections``,
``_TestSharedMemory``.
"""
from __future__ import annotations

import array
import contextlib
import os
import threading
from multiprocessing import BufferTooShort, reduction, shared_memory

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


def put_one(q, value):
    q.put(value)


def cond_wait(cond, sleeping, woken, timeout=None):
    with cond:
        sleeping.release()
        cond.wait(timeout)
        woken.release()


def cond_wait_for(cond, state, done):
    with cond:
        result = cond.wait_for(lambda: state.value == 4, TIMEOUT)
        done.put(result)


def set_after(event, delay):
    threading.Event().wait(delay)
    event.set()


def barrier_lockstep(barrier, before, after, passes):
    for i in range(passes):
        with before.get_lock():
            before.value += 1
        barrier.wait()
        assert before.value == (i + 1) * barrier.parties
        with after.get_lock():
            after.value += 1
        barrier.wait()
        assert after.value == (i + 1) * barrier.parties


def barrier_wait_put(barrier, q):
    q.put(barrier.wait())


def barrier_abort(barrier, q):
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        q.put("broken")


def barrier_timeout(barrier, q):
    try:
        barrier.wait(SHORT)
    except threading.BrokenBarrierError:
        q.put("broken")


CODES = [("i", 4343, 24234), ("d", 3.625, -4.25), ("h", -232, 234), ("q", 2 ** 33, 2 ** 34),
         ("c", b"x", b"y")]


def set_values(values):
    for shared, (_, _, new) in zip(values, CODES):
        shared.value = new


def prefix_sums(seq):
    for i in range(1, len(seq)):
        seq[i] += seq[i - 1]


def use_manager_list(shared):
    shared.append("from the child")


def use_manager_dict(shared):
    shared["child"] = os.getpid()


def use_namespace(ns):
    ns.name = "child"


def square(x):
    return x * x


def multiply(x, y):
    return x * y


def fail_with(x):
    raise KeyError(x)


def pid_after(x):
    return os.getpid()


def echo(conn):
    for msg in iter(conn.recv_bytes, b"STOP"):
        conn.send_bytes(msg)
    conn.close()


def write_to_fd(conn, data):
    fd = reduction.recv_handle(conn)
    with open(fd, "wb") as f:
        f.write(data)


def write_shared_memory(name, data):
    shm = shared_memory.SharedMemory(name)
    try:
        shm.buf[: len(data)] = data
    finally:
        shm.close()


# -- locks, semaphores, conditions, events, barriers ------------------------------------


def test_lock_and_rlock():
    lock = CTX.Lock()
    assert lock.acquire() is True and lock.acquire(False) is False
    assert lock.release() is None
    with pytest.raises((ValueError, threading.ThreadError)):
        lock.release()
    rlock = CTX.RLock()
    assert rlock.acquire() and rlock.acquire() and rlock.acquire()
    for _ in range(3):
        assert rlock.release() is None
    with pytest.raises((AssertionError, RuntimeError)):
        rlock.release()
    with CTX.Lock():
        pass


@pytest.mark.parametrize("factory", ["Semaphore", "BoundedSemaphore"])
def test_semaphores_count(factory):
    sem = getattr(CTX, factory)(2)
    for expected in (1, 0):
        assert sem.acquire() is True
        assert sem.get_value() == expected
    assert sem.acquire(False) is False
    sem.release()
    sem.release()
    assert sem.get_value() == 2


def test_semaphore_acquire_times_out():
    sem = CTX.Semaphore(0)
    assert sem.acquire(False) is False
    assert sem.acquire(False, None) is False
    assert sem.acquire(True, SHORT) is False
    assert sem.acquire(timeout=SHORT) is False


def test_a_semaphore_is_shared_with_children_by_name():
    sem = CTX.Semaphore(0)
    assert sem._semlock.name is not None  # named and tracked, as under forkserver
    proc = CTX.Process(target=release, args=(sem,))
    proc.start()
    assert sem.acquire(timeout=TIMEOUT)
    join(proc)


def release(sem):
    sem.release()


def test_condition_notify_wakes_one_then_notify_all_the_rest():
    cond = CTX.Condition()
    sleeping, woken = CTX.Semaphore(0), CTX.Semaphore(0)
    procs = [CTX.Process(target=cond_wait, args=(cond, sleeping, woken), daemon=True)
             for _ in range(3)]
    for proc in procs:
        proc.start()
    for _ in procs:
        assert sleeping.acquire(timeout=TIMEOUT)
    with cond:  # all three wait on the condition now (they released the lock in wait)
        cond.notify()
    assert woken.acquire(timeout=TIMEOUT)
    assert not woken.acquire(timeout=SHORT)
    with cond:
        cond.notify_all()
    for _ in range(2):
        assert woken.acquire(timeout=TIMEOUT)
    for proc in procs:
        join(proc)


def test_condition_wait_times_out():
    cond = CTX.Condition()
    with cond:
        assert cond.wait(SHORT) is False


def test_condition_wait_for_a_shared_state():
    cond = CTX.Condition()
    state = CTX.Value("i", -1)
    done = CTX.Queue()
    proc = CTX.Process(target=cond_wait_for, args=(cond, state, done))
    proc.start()
    for i in range(5):
        with cond:
            state.value = i
            cond.notify()
    assert done.get(timeout=TIMEOUT) is True
    join(proc)
    close_queue(done)


def test_event_set_by_a_child():
    event = CTX.Event()
    assert not event.is_set()
    assert event.wait(0.0) is False and event.wait(SHORT) is False
    event.set()
    assert event.is_set() and event.wait() is True and event.wait(SHORT) is True
    event.clear()
    proc = CTX.Process(target=set_after, args=(event, 0.05), daemon=True)
    proc.start()
    assert event.wait(TIMEOUT) is True
    join(proc)


N = 5


def run_parties(target, args, parties=N):
    procs = [CTX.Process(target=target, args=args, daemon=True) for _ in range(parties)]
    for proc in procs:
        proc.start()
    return [join(proc) for proc in procs]


@pytest.mark.parametrize("passes", [1, 10])
def test_a_barrier_is_passed_in_lockstep(passes):
    barrier = CTX.Barrier(N, timeout=TIMEOUT)
    before, after = CTX.Value("i", 0), CTX.Value("i", 0)
    assert run_parties(barrier_lockstep, (barrier, before, after, passes)) == [0] * N
    assert (before.value, after.value) == (N * passes, N * passes)
    assert barrier.n_waiting == 0 and not barrier.broken


def test_barrier_wait_returns_each_index_once():
    barrier = CTX.Barrier(N, timeout=TIMEOUT)
    q = CTX.Queue()
    assert run_parties(barrier_wait_put, (barrier, q)) == [0] * N
    assert sorted(q.get(timeout=TIMEOUT) for _ in range(N)) == list(range(N))
    close_queue(q)


def test_barrier_action_runs_once():
    ran = CTX.Value("i", 0)
    barrier = CTX.Barrier(N, action=AddOne(ran), timeout=TIMEOUT)
    q = CTX.Queue()
    run_parties(barrier_wait_put, (barrier, q))
    assert ran.value == 1
    close_queue(q)


class AddOne:
    def __init__(self, value):
        self.value = value

    def __call__(self):
        with self.value.get_lock():
            self.value.value += 1


def test_abort_breaks_a_barrier_for_its_waiters():
    barrier = CTX.Barrier(N + 1, timeout=TIMEOUT)
    q = CTX.Queue()
    procs = [CTX.Process(target=barrier_abort, args=(barrier, q), daemon=True) for _ in range(N)]
    for proc in procs:
        proc.start()
    assert wait_until(lambda: barrier.n_waiting == N)
    barrier.abort()
    assert [q.get(timeout=TIMEOUT) for _ in range(N)] == ["broken"] * N
    for proc in procs:
        join(proc)
    assert barrier.broken
    barrier.reset()
    assert not barrier.broken
    close_queue(q)


def test_a_barrier_wait_times_out_and_breaks():
    barrier = CTX.Barrier(N)
    q = CTX.Queue()
    run_parties(barrier_timeout, (barrier, q), parties=2)
    assert [q.get(timeout=TIMEOUT) for _ in range(2)] == ["broken"] * 2
    close_queue(q)


# -- shared values and arrays ----------------------------------------------------------


@pytest.mark.parametrize("raw", [False, True])
def test_values_set_by_a_child(raw):
    make = CTX.RawValue if raw else CTX.Value
    values = [make(code, value) for code, value, _ in CODES]
    assert [v.value for v in values] == [value for _, value, _ in CODES]
    proc = CTX.Process(target=set_values, args=(values,), daemon=True)
    proc.start()
    join(proc)
    assert [v.value for v in values] == [new for _, _, new in CODES]


def test_value_locks():
    assert CTX.Value("i", 5).get_lock() is not None
    lock = CTX.Lock()
    assert CTX.Value("i", 5, lock=lock).get_lock() is lock
    assert not hasattr(CTX.Value("i", 5, lock=False), "get_lock")
    with pytest.raises(AttributeError):
        CTX.Value("i", 5, lock="navalue")
    assert not hasattr(CTX.RawValue("i", 5), "get_obj")


@pytest.mark.parametrize("raw", [False, True])
def test_arrays_changed_by_a_child(raw):
    seq = [680, 626, 934, 821, 150, 233, 548, 982, 714, 831]
    arr = (CTX.RawArray if raw else CTX.Array)("i", seq)
    assert len(arr) == len(seq) and arr[3] == seq[3] and list(arr[2:7]) == seq[2:7]
    arr[4:8] = seq[4:8] = array.array("i", [1, 2, 3, 4])
    assert list(arr[:]) == seq
    prefix_sums(seq)
    proc = CTX.Process(target=prefix_sums, args=(arr,), daemon=True)
    proc.start()
    join(proc)
    assert list(arr[:]) == seq


def test_an_array_from_a_size_is_zeroed():
    for _ in range(3):
        arr = CTX.Array("i", 10)
        assert list(arr) == [0] * 10
        arr[:] = range(10)
        assert list(arr) == list(range(10))
        del arr


def test_array_locks():
    lock = CTX.Lock()
    assert CTX.Array("i", range(10), lock=lock).get_lock() is lock
    assert not hasattr(CTX.Array("i", range(10), lock=False), "get_lock")
    with pytest.raises(AttributeError):
        CTX.Array("i", range(10), lock="notalock")


# -- the manager -------------------------------------------------------------------


def test_a_manager_serves_lists_dicts_and_namespaces_to_children():
    with CTX.Manager() as manager:
        shared_list = manager.list([1, 2])
        shared_dict = manager.dict()
        ns = manager.Namespace()
        for target, arg in ((use_manager_list, shared_list), (use_manager_dict, shared_dict),
                            (use_namespace, ns)):
            proc = CTX.Process(target=target, args=(arg,))
            proc.start()
            assert join(proc) == 0
        assert list(shared_list) == [1, 2, "from the child"]
        assert set(shared_dict) == {"child"}
        assert ns.name == "child"
        q = manager.Queue()
        proc = CTX.Process(target=put_one, args=(q, "via the manager"))
        proc.start()
        assert q.get(timeout=TIMEOUT) == "via the manager"
        join(proc)
        server = manager._process
        assert isinstance(server, CTX.Process) and server.is_alive()
    assert server.exitcode == 0


# -- the pool -----------------------------------------------------------------------


@contextlib.contextmanager
def pool_of(n=4, **kwargs):
    """A pool, closed and joined afterwards (not a fixture: pytest keeps fixture
    values, and with them the workers' sentinels, until after the leak check)."""
    p = CTX.Pool(n, **kwargs)
    try:
        yield p
    finally:
        p.close()
        p.join()


def test_pool_apply_map_starmap():
    with pool_of() as pool:
        assert pool.apply(square, (5,)) == 25
        assert pool.apply(square, (), {"x": 3}) == 9
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
        assert pool.map(square, range(100), chunksize=20) == [x * x for x in range(100)]
        pairs = list(zip(range(10), range(9, -1, -1)))
        assert pool.starmap(multiply, pairs) == [x * y for x, y in pairs]
        assert pool.starmap_async(multiply, pairs).get(TIMEOUT) == [x * y for x, y in pairs]
        assert pool.map_async(square, range(10)).get(TIMEOUT) == [x * x for x in range(10)]


def test_pool_async_callbacks_and_errors():
    with pool_of() as pool:
        results, errors = [], []
        pool.map_async(square, [1, 2], callback=results.append).wait(TIMEOUT)
        pool.map_async(fail_with, [1], error_callback=errors.append).wait(TIMEOUT)
        assert wait_until(lambda: results and errors)
        assert results == [[1, 4]] and isinstance(errors[0], KeyError)
        res = pool.apply_async(square, (7,))
        assert res.get(TIMEOUT) == 49 and res.successful()
        with pytest.raises(KeyError) as info:
            pool.apply(fail_with, (3,))
        assert "fail_with" in str(info.value.__cause__)  # the remote traceback


def test_pool_imap_and_imap_unordered():
    with pool_of() as pool:
        it = pool.imap(square, range(10))
        assert [next(it) for _ in range(10)] == [x * x for x in range(10)]
        with pytest.raises(StopIteration):
            next(it)
        assert list(pool.imap(square, range(100), chunksize=7)) == [x * x for x in range(100)]
        unordered = pool.imap_unordered(square, range(100), chunksize=9)
        assert sorted(unordered) == [x * x for x in range(100)]
        assert pool.map(square, []) == [] and list(pool.imap(square, [])) == []


def test_pool_terminate_ends_its_workers():
    p = CTX.Pool(2)
    workers = list(p._pool)
    p.map_async(sleep_arg, [10] * 4)
    p.terminate()
    p.join()
    assert all(w.exitcode is not None for w in workers)


def sleep_arg(seconds):
    threading.Event().wait(seconds)


def test_pool_workers_are_replaced_after_maxtasksperchild():
    with CTX.Pool(2, maxtasksperchild=2) as p:
        pids = p.map(pid_after, range(20), chunksize=1)
        p.close()
        p.join()
    assert len(set(pids)) >= 10  # each worker ran at most 2 tasks


def test_pool_initializer_runs_in_each_worker():
    with CTX.Pool(2, initializer=set_env_marker, initargs=("initialized",)) as p:
        assert set(p.map(read_env_marker, range(8))) == {"initialized"}
        p.close()
        p.join()


def set_env_marker(value):
    os.environ["FS_MP_POOL_MARKER"] = value


def read_env_marker(_):
    return os.environ.get("FS_MP_POOL_MARKER")


# -- connections ---------------------------------------------------------------------


def test_a_pipe_carries_objects_and_bytes_to_a_child_and_back():
    conn, child_conn = CTX.Pipe()
    proc = CTX.Process(target=echo, args=(child_conn,), daemon=True)
    proc.start()
    child_conn.close()  # the child has its own copy
    conn.send_bytes(b"hello world")
    assert conn.recv_bytes() == b"hello world"
    arr = array.array("i", range(4))
    conn.send_bytes(arr)
    buffer = array.array("i", [0] * 10)
    assert conn.recv_bytes_into(buffer, 3 * buffer.itemsize) == len(arr) * buffer.itemsize
    assert list(buffer) == [0, 0, 0, 0, 1, 2, 3, 0, 0, 0]
    conn.send_bytes(b"x" * 80)
    with pytest.raises(BufferTooShort):
        conn.recv_bytes_into(bytearray(40))
    assert conn.poll() is False and conn.poll(SHORT) is False
    big = b"X" * (16 << 20)
    conn.send_bytes(big)
    assert conn.poll(TIMEOUT) and conn.recv_bytes() == big
    conn.send_bytes(b"STOP")
    with pytest.raises(EOFError):
        conn.recv()
    join(proc)
    conn.close()


def test_send_bytes_offsets():
    a, b = CTX.Pipe()
    msg = b"abcdefghijklmnopqrstuvwxyz"
    a.send_bytes(msg, 5)
    assert b.recv_bytes() == msg[5:]
    a.send_bytes(msg, 7, 8)
    assert b.recv_bytes() == msg[7:15]
    for args in ((27,), (22, 5), (26, 1)):
        with pytest.raises(ValueError):
            a.send_bytes(msg, *args)
    a.close()
    b.close()


def test_a_one_way_pipe():
    reader, writer = CTX.Pipe(duplex=False)
    writer.send(1)
    assert reader.recv() == 1
    flags = (reader.readable, reader.writable, writer.readable, writer.writable)
    assert flags == (True, False, False, True)
    with pytest.raises(OSError):
        reader.send(2)
    with pytest.raises(OSError):
        writer.recv()
    reader.close()
    writer.close()


def test_an_fd_sent_over_a_pipe_reaches_the_child(tmp_path):
    path = tmp_path / "out"
    conn, child_conn = CTX.Pipe()
    proc = CTX.Process(target=write_to_fd, args=(child_conn, b"written by the child"), daemon=True)
    proc.start()
    with open(path, "wb") as f:
        reduction.send_handle(conn, f.fileno(), proc.pid)
    join(proc)
    conn.close()
    child_conn.close()
    assert path.read_bytes() == b"written by the child"


def test_shared_memory_is_written_by_a_child():
    shm = shared_memory.SharedMemory(create=True, size=64)
    try:
        proc = CTX.Process(target=write_shared_memory, args=(shm.name, b"from the child"))
        proc.start()
        assert join(proc) == 0
        assert bytes(shm.buf[:14]) == b"from the child"
    finally:
        shm.close()
        shm.unlink()
