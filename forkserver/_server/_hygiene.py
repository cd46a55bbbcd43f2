"""Template hygiene (docs/design.md): thread-pool limits, the thread check, titles.

``fork_sibling`` is a raw ``clone``: glibc's ``pthread_atfork`` handlers do
not run, so a template may only fork while it is single-threaded.  Libraries
that start thread pools at import (OpenBLAS, MKL, OpenMP, numexpr) size them
from standard environment variables read at load time; setting those to 1
while a template imports keeps it single-threaded, and the children can
still raise their pools at run time (threadpoolctl).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, List

from .._errors import ThreadedTemplateError
from .._fds import set_name
from .._protocol import THREAD_LIMIT_VARS


@contextlib.contextmanager
def thread_limits() -> Iterator[None]:
    """Set the thread-pool variables the user did not set to 1, then restore them."""
    added = [name for name in THREAD_LIMIT_VARS if name not in os.environ]
    for name in added:
        os.environ[name] = "1"
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def thread_count() -> int:
    """The number of OS threads of this process (``Threads:`` in /proc/self/status)."""
    fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 16384)
    finally:
        os.close(fd)
    start = data.find(b"\nThreads:")
    if start < 0:  # pragma: no cover - every Linux since 2.6 has the line
        return len(os.listdir("/proc/self/task"))
    return int(data[start + 9 : data.index(b"\n", start + 1)])


def thread_names() -> List[str]:
    """OS names of our threads (``/proc/self/task/*/comm``) and Python's own thread names."""
    names = []
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f"{f.read().strip()} (tid {tid})")
        except OSError:
            continue  # the thread ended meanwhile
    threading = sys.modules.get("threading")  # not imported: no Python-level threads
    if threading is not None:
        names += [f"Python thread {t.name!r}" for t in threading.enumerate() if t is not threading.main_thread()]
    return names


def check_single_threaded(culprits: List[str]) -> None:
    """Raise ThreadedTemplateError unless this process has exactly one OS thread."""
    count = thread_count()
    if count == 1:
        return
    started = ", ".join(culprits) if culprits else "something run in this template"
    raise ThreadedTemplateError(
        f"template process {os.getpid()} runs {count} threads and cannot fork safely "
        f"(a forked child would inherit locks held by threads that do not exist there). "
        f"Threads: {'; '.join(thread_names())}. Started by: {started}. "
        "Remedy: don't start threads at import time in modules you require (start them in "
        "the worker function instead), stop them before forking, or limit the library's "
        "pool (e.g. OMP_NUM_THREADS=1); run() on this template still works, fork() does not."
    )


def set_title(title: str) -> None:
    """Name this process in ``ps -o comm`` / ``top`` (the kernel keeps 15 bytes).

    Cosmetic: a failure is ignored.  Called from the main thread only, so
    the thread name the kernel sets is the process's.
    """
    set_name(title.encode(errors="replace")[:15])


def watch_parent(sig: int, parent: int) -> None:
    """Send ourselves ``sig`` when our parent *process* exits (``die_with_parent``).

    ``PR_SET_PDEATHSIG`` fires when the parent *thread* that created us
    exits — with ``clone(CLONE_PARENT)`` that is whichever thread of the
    user's process started the template, possibly long gone.  A pidfd of
    the parent process becomes readable only when the whole process exits,
    so a small daemon thread polls it instead.
    """
    import select
    import threading  # in the worker only: templates never import it (see _loop)

    try:
        pidfd = os.pidfd_open(parent)
    except OSError:
        os.kill(os.getpid(), sig)  # the parent is already gone
        return
    if os.getppid() != parent:  # it died before we looked: we were reparented
        os.close(pidfd)
        os.kill(os.getpid(), sig)
        return

    def wait_then_signal() -> None:
        select.select([pidfd], [], [])
        os.kill(os.getpid(), sig)

    threading.Thread(target=wait_then_signal, name="forkserver-parent-watch", daemon=True).start()
