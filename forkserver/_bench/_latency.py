"""Bench scenarios of first moments: start -> ran, and a new template's first reply (parent side).

``start_ran``: from ``fork().run()`` to the first line of the worker's
function, from a ready spare clone (goal: 0.2 ms).  The worker sends the
moment it began (``_workers.ran``); ``time.perf_counter`` is
``CLOCK_MONOTONIC`` on Linux, one clock for all processes, so the parent
subtracts its own reading from before the call.  The floor is ``os.fork``
in a small helper, timed the same way.

``first_reply``: from ``Template()`` to the reply of its first command
(``eval("pass")``).  A new template is a clone of the default template's
spare that adopts the caller's environment, directory, ``sys.path`` and
stdio; a ``fork()`` of a ready template is the same clone without that
set-up, so its first reply is the base that set-up is judged against.  This
is where CPython 3.13 once added ~20 ms (``importlib.invalidate_caches``
importing ``importlib.metadata``: see ``forkserver/_server/_namespace.py``).
"""
from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Callable

from . import _core as B
from ._workers import MODULE, settle

if TYPE_CHECKING:  # pragma: no cover
    from ._scenarios import Bench

FS, FS_FORK = "forkserver Template()", "a fork() of a ready template"
FS_EXEC = "Template.new_exec()"
RAN_FS, RAN_MP, RAN_FLOOR = "forkserver", "mp forkserver + preload", "os.fork, small process"
RAN_LIMIT_MS = 0.2  # DESIGN.md "Numbers to beat": start -> ran
FIRST_REPLY_RATIO = 2.0  # Template()'s first reply <= 2x a fork()'s: its set-up costs little

# The multiprocessing worker of start -> ran: say when it began, on the pipe ``conn``.
MP_RAN_SOURCE = "import time\nconn.send_bytes(time.perf_counter_ns().to_bytes(8, 'little'))\n"


def start_ran(bench: "Bench") -> B.Scenario:
    """start -> ran: the worker's function begins; forkserver from a ready spare."""
    s = bench.s
    sc = B.Scenario("start_ran", f"start -> ran (the function begins), {s.preload} preloaded", "ms")
    sc.contenders = [
        B.Contender(RAN_FS, lambda: _forkserver_ran(bench.tpl)),
        B.Contender(RAN_MP, lambda: _mp_ran(bench.mp_fs)),
        B.Contender(RAN_FLOOR, bench.helpers["fork_ran"].once),
    ]
    bench.measure(sc.contenders)
    sc.notes.append("from the call to the first line of the worker's function; forkserver's "
                    "template has its spare clone ready (made, untimed, after each sample)")
    sc.goals.append(dict(text=f"start -> ran: forkserver <= {RAN_LIMIT_MS:g} ms",
                         value=sc.median(RAN_FS), limit=RAN_LIMIT_MS, unit="ms"))
    return sc


def _forkserver_ran(tpl) -> float:
    t0 = time.perf_counter_ns()
    child = tpl.fork().run(f"{MODULE}:ran")
    try:
        child.control.setblocking(True)
        child.control.settimeout(B.TIMEOUT)
        begin = int.from_bytes(_recv_exact(child.control, 8), "little")
        status = B.reap(child)
    finally:
        child.close()
    if status != 0:
        raise RuntimeError(f"{RAN_FS}: the worker exited with status {status}")
    settle(tpl)  # untimed: the next spare is ready before the next sample
    return (begin - t0) / 1e6


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError("the worker closed its socket before saying when it began")
        data += chunk
    return data


def _mp_ran(ctx) -> float:
    ours, theirs = ctx.Pipe(duplex=False)
    try:
        t0 = time.perf_counter_ns()
        proc = ctx.Process(target=exec, args=(MP_RAN_SOURCE, {"conn": theirs}))
        proc.start()
        theirs.close()
        if not ours.poll(B.TIMEOUT):
            raise RuntimeError(f"{RAN_MP}: the worker did not begin")
        begin = int.from_bytes(ours.recv_bytes(), "little")
        proc.join(B.TIMEOUT)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        code = proc.exitcode
        proc.close()
    finally:
        ours.close()
        theirs.close()
    if code != 0:
        raise RuntimeError(f"{RAN_MP}: the worker exited with status {code}")
    return (begin - t0) / 1e6


def first_reply(bench: "Bench") -> B.Scenario:
    """A new template's first reply: Template(), a fork of a ready template, a fresh interpreter."""
    from .._template import Template, default_template

    s = bench.s
    sc = B.Scenario("first_reply", "new template -> first reply (eval('pass'))", "ms")
    base = default_template()
    sc.contenders = [
        B.Contender(FS, _first_reply(Template, lambda: settle(base))),
        B.Contender(FS_FORK, _first_reply(bench.tpl.fork, lambda: settle(bench.tpl))),
        B.Contender(FS_EXEC, _first_reply(Template.new_exec), max(3, s.rounds // 10)),
    ]
    bench.measure(sc.contenders)
    sc.notes.append(f"{FS_FORK} = the same clone without Template()'s set-up "
                    "(environment, directory, sys.path, stdio)")
    sc.notes.append(f"{FS_EXEC} = a freshly started interpreter, for scale")
    sc.goals.append(dict(
        text=f"first reply: Template() <= {FIRST_REPLY_RATIO:g}x a fork()",
        value=_ratio(sc.median(FS), sc.median(FS_FORK)), limit=FIRST_REPLY_RATIO, unit="x",
    ))
    return sc


def _first_reply(make: Callable[[], object], after: Callable[[], None] = lambda: None):
    """Sampler: ms from ``make()`` to its eval's reply; then closed, ``after`` (untimed)."""

    def once() -> float:
        t0 = time.perf_counter()
        tpl = make()
        try:
            tpl.eval("pass")  # type: ignore[attr-defined]
            elapsed = time.perf_counter() - t0
        finally:
            tpl.close()  # type: ignore[attr-defined]
        after()
        return elapsed * 1e3

    return once


def _ratio(a, b):
    return None if a is None or b is None else a / b
