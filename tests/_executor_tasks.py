"""Tasks the executor tests run in workers (importable there: the template adopts sys.path)."""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from forkserver.worker import event

INIT_VALUE = "uninitialized"


def mul(x: Any, y: Any) -> Any:
    return x * y


def ident(x: Any) -> Any:
    return x


def noop() -> None:
    pass


def pid() -> int:
    return os.getpid()


def capture(*args: Any, **kwargs: Any) -> Any:
    return args, kwargs


def boom(message: str) -> None:
    raise ValueError(message)


def exit_now(code: int) -> None:
    os._exit(code)


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def wait_for_fd(fd: int) -> int:
    """Block until ``fd`` (inherited from the template, or sent) is readable; our pid."""
    import select

    select.select([fd], [], [])
    return os.getpid()


def announce_then_wait(seconds: float) -> int:
    """Tell the parent our pid (an event), then sleep: a task to kill from outside."""
    event(os.getpid())
    time.sleep(seconds)
    return os.getpid()


def events(n: int) -> str:
    for i in range(n):
        event(("progress", i))
    return "done"


def event_outside_task_raises() -> str:
    """event() from a thread after the task ended raises RuntimeError (checked in the worker)."""
    import threading

    errors = []

    def late() -> None:
        time.sleep(0.05)
        try:
            event("too late")
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=late)
    thread.start()
    return "started"


def set_init(value: Any) -> None:
    global INIT_VALUE
    INIT_VALUE = value


def get_init() -> Any:
    return INIT_VALUE


def init_fails() -> None:
    raise ValueError("error in initializer")


def modules() -> list:
    return sorted(sys.modules)


def nbytes(data: Any) -> int:
    return len(data) if isinstance(data, (bytes, bytearray)) else int(data.nbytes)


def array_sum(arr: Any) -> Any:
    return arr.sum()


def make_array(n: int) -> Any:
    import numpy

    return numpy.arange(n, dtype=numpy.int64)


def big_bytes(n: int) -> bytes:
    return b"x" * n


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("Unpicklable refuses to be pickled")


def return_unpicklable() -> Any:
    return Unpicklable()


class CustomError(Exception):
    pass


def raise_custom() -> None:
    raise CustomError("custom", 1)


def raise_local_type() -> None:
    class Local(Exception):
        pass

    raise Local("made in the worker")


def submit_from_worker_env() -> str:
    return os.environ.get("FORKSERVER_TEST_MARK", "")


def report_modules(control: Any) -> None:
    """A ``Template.run`` target: send back this process's module names, pickled, then EOF."""
    import pickle

    control.sendall(pickle.dumps(sorted(sys.modules)))


KEPT: Any = None


def keep(obj: Any) -> None:
    """An initializer: keep what the template was sent (an fd, say) for later tasks."""
    global KEPT
    KEPT = obj


def wait_on_kept() -> int:
    """Block until the kept fd (a pipe) has a byte for us; take it; our pid."""
    wait_for_fd(KEPT)
    os.read(KEPT, 1)
    return os.getpid()


def keep_all(*items: Any) -> None:
    global KEPT
    KEPT = items


def describe_kept() -> list:
    """What the initializer got: values as they are, fds as 'fd' if open here."""
    out = []
    for item in KEPT:
        if isinstance(item, int) and not isinstance(item, bool):
            os.fstat(item)  # open in this worker
            out.append("fd")
        else:
            out.append(item)
    return out


def print_after(seconds: float, text: str) -> None:
    time.sleep(seconds)
    print(text, flush=True)


def close_control_then_sleep(seconds: float) -> None:
    """Close this worker's socket to the parent, then keep running (the parent must kill us)."""
    from forkserver._pool import _executor_worker as W

    os.close(W._w.control.fileno())
    time.sleep(seconds)


def announce_then_work(seconds: float) -> int:
    """Tell the parent our pid, then work in short steps (a signal is seen within one step).

    A single long ``time.sleep`` would miss a SIGINT that lands between the
    last check for signals and the sleep's system call (the handler only
    runs once the sleep ends): the classic race of signals and blocking calls.
    """
    event(os.getpid())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def pid_of(_: Any) -> int:
    return os.getpid()


def fail_on_bad(item: str) -> str:
    if item == "bad":
        raise ValueError("bad item")
    return item


def wait_on_kept_arg(_: Any) -> int:
    """map(): consume one byte of the kept pipe, then report our pid."""
    import select

    select.select([KEPT], [], [])
    os.read(KEPT, 1)
    return os.getpid()
