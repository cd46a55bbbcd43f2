"""Interrupt a call at every line it runs in forkserver's own code (``sys.settrace``).

``count_events(call)`` runs ``call()`` once, tracing the calling thread, and
counts the *line* events in modules of the ``forkserver`` package.
``run_injected(call, n, mode)`` runs it again and interrupts it at the
``n``-th such event:

* ``"signal"``: ``signal.raise_signal(SIGINT)`` -- a Ctrl-C exactly as a
  terminal sends it.  Python runs the handler at its next check; where
  forkserver defers ``KeyboardInterrupt`` (``forkserver._interrupts``) it
  comes at the end of that region instead.  This is what users meet.
* ``"raise"``: ``Injected``, a ``MemoryError``, raised right at that line,
  even inside a deferred region -- any statement can fail so.  The library
  must stay consistent, though it may give a template up as broken, and
  where an error is no failure of the call (the next spare could not be
  asked for) the call goes on.  In a coroutine, only in the task's own code
  (raised in an event loop callback, the loop would log and drop it).
* ``"cancel"`` (coroutines): ``task.cancel()`` of the running task, so the
  next ``await`` raises ``CancelledError`` -- the only place a cancellation
  can come from.

In mode ``raise`` a line that begins with a ``NOP`` (``try:`` on 3.11+) is
skipped (see ``_at_nop``).  The statements of ``forkserver/_interrupts.py`` (the mask) are not
interrupted: they stand for an atomic mask.  An event inside a finalizer (``__del__``, run by the garbage collector
wherever it strikes) is skipped: the interpreter ignores exceptions raised
there.  Only the calling thread is traced (the reaper thread never sees
``KeyboardInterrupt``: Python raises it in the main thread only).  Event
counts differ a little between Python versions and runs (a spare may or may
not have greeted yet): an ``n`` past the end just runs the call unharmed.
"""
from __future__ import annotations

import asyncio
import dis
import os
import signal
import sys
from typing import Any, Callable, Optional

import forkserver

PACKAGE = os.path.dirname(os.path.abspath(forkserver.__file__)) + os.sep
# The mask itself plays the part of an atomic instruction: interrupting its
# own few statements would test Python, not us (see forkserver/_interrupts.py).
MASK = os.path.join(PACKAGE, "_interrupts.py")


class Injected(MemoryError):
    """The exception of mode ``raise``: a statement that ran out of memory."""


class _Tracer:
    def __init__(self, target: Optional[int], mode: str, task: Any = None) -> None:
        self.target = target  # None: only count
        self.mode = mode
        self.task = task
        self.events = 0
        self.fired = False
        self.where = ""  # file:line it fired at

    def global_trace(self, frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(PACKAGE) and name != MASK:
            return self.local_trace
        return None

    def local_trace(self, frame, event, arg):
        if event != "line" or self.fired:
            return self.local_trace
        self.events += 1
        if (
            self.target is not None
            and self.events >= self.target
            and not _in_finalizer(frame)
            and not (self.mode in ("raise", "signal") and _unrealistic(frame))
            and not (self.mode == "raise" and self.task is not None and _current_task() is not self.task)
        ):
            self.fired = True
            self.where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
            sys.settrace(None)
            if self.mode == "signal":
                signal.raise_signal(signal.SIGINT)
            elif self.mode == "raise":
                raise Injected(f"injected at event {self.events}")
            elif self.mode == "cancel":
                self.task.cancel()
            return None
        return self.local_trace


# Instructions a real exception cannot come from: a NOP (3.11+ give one to
# ``try:`` lines), and 3.9/3.10's set-up of a ``try``/``with`` block.
_CANNOT_RAISE = {"NOP", "SETUP_FINALLY", "SETUP_WITH", "SETUP_ASYNC_WITH", "RETURN_CONST"}
_LOADS = {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_DEREF", "LOAD_CONST"}
_starts: dict = {}  # code object -> {offset: (opname, argval) of it and the next three}


def _unrealistic(frame) -> bool:
    """Whether raising at this line event would be an artifact, not a statement failing.

    Three kinds: a ``return x`` line; an instruction that cannot raise (a ``NOP``: 3.11+ give
    ``try:`` lines one, and raising there skips the enclosing ``with``'s
    ``__exit__``; 3.9's ``SETUP_FINALLY``), and (3.11+) the implicit call of a
    ``with`` block's ``__exit__``, which carries the ``with`` line again
    (raising there leaves the lock held).  Real code raises neither: a NOP
    raises nothing, and Python offers no way to guard the ``__exit__`` call
    itself.  Raising waits for the next line instead.  Mode ``signal`` skips
    them too: ``signal.raise_signal`` runs the handler at once, inside the
    trace function, so a handler that raises (inside ``allowed()``) would
    raise at that very event -- where a real signal is never handled, as the
    interpreter checks for signals at calls and backward jumps only.
    """
    code = frame.f_code
    table = _starts.get(code)
    if table is None:
        ops = [(i.offset, i.opname, i.argval) for i in dis.get_instructions(code)]
        table = _starts[code] = {
            off: [(op, val) for _, op, val in ops[k : k + 4]] for k, (off, _, _) in enumerate(ops)
        }
    seq = table.get(frame.f_lasti, [])
    if seq and seq[0][0] in _CANNOT_RAISE:
        return True
    ops = [op for op, _ in seq]
    if len(ops) >= 2 and ops[0] in _LOADS and ops[1] == "RETURN_VALUE":
        return True  # "return x": it cannot fail once the line is reached
    if seq and seq[0][0] == "SWAP":  # a ``return`` inside the block: its value moved under __exit__
        seq = seq[1:]
    seq = seq[:3]
    return len(seq) == 3 and all(op == "LOAD_CONST" and val is None for op, val in seq)


def _current_task():
    try:
        return asyncio.current_task()
    except RuntimeError:  # no loop running
        return None


def _in_finalizer(frame) -> bool:
    """Whether ``frame`` runs inside a ``__del__``: Python ignores what a finalizer raises
    (a Ctrl-C landing there is lost by the interpreter itself), so the injector moves on
    to the next event outside it."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def count_events(call: Callable[[], Any]) -> "tuple":
    """(line events of ``call()`` in forkserver's modules, its result)."""
    tracer = _Tracer(None, "count")
    sys.settrace(tracer.global_trace)
    try:
        result = call()
    finally:
        sys.settrace(None)
    return tracer.events, result


def run_injected(call: Callable[[], Any], n: int, mode: str) -> "tuple":
    """Run ``call()`` interrupted at its ``n``-th event: (fired, exception or None, result)."""
    tracer = _Tracer(n, mode)
    result = exc = None
    try:
        sys.settrace(tracer.global_trace)
        try:
            result = call()
        finally:
            sys.settrace(None)
        # A Ctrl-C raised at the very last event may be delivered right here.
        for _ in range(3):
            pass
    except BaseException as e:  # noqa: B036 - the injected interrupt, whatever it became
        exc = e
    last_where[0] = tracer.where
    return tracer.fired, exc, result


last_where = [""]  # where the last injection fired (for messages)


def run_injected_async(make_coro: Callable[[], Any], n: int, mode: str) -> "tuple":
    """The same for a coroutine, run as a task on a new event loop."""
    loop = asyncio.new_event_loop()
    tracer = _Tracer(n, mode)
    result = exc = None
    try:
        task = loop.create_task(make_coro())
        tracer.task = task
        sys.settrace(tracer.global_trace)
        try:
            result = loop.run_until_complete(task)
        finally:
            sys.settrace(None)
    except BaseException as e:  # noqa: B036
        exc = e
    try:
        _shutdown(loop)  # a cancelled task's clean-up may raise the interrupt late: still ours
    except BaseException as e:  # noqa: B036
        exc = exc or e
    last_where[0] = tracer.where
    return tracer.fired, exc, result


def _shutdown(loop) -> None:
    """What ``asyncio.run`` does at its end: cancel what is left, let it finish, close.

    A ``KeyboardInterrupt`` raised outside the task (in a callback, in the
    selector) stops the loop with the task suspended at an ``await``; the
    cancellation resumes it there, as ``asyncio.run`` would.
    """
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def count_events_async(make_coro: Callable[[], Any]) -> "tuple":
    loop = asyncio.new_event_loop()
    tracer = _Tracer(None, "count")
    try:
        task = loop.create_task(make_coro())
        sys.settrace(tracer.global_trace)
        try:
            result = loop.run_until_complete(task)
        finally:
            sys.settrace(None)
    finally:
        loop.close()
    return tracer.events, result


def sample(total: int, most: int, seed: int) -> "list":
    """Up to ``most`` event numbers in 1..total, evenly spread from a seeded offset."""
    if total <= most:
        return list(range(1, total + 1))
    import random

    step = total / most
    offset = random.Random(seed).random() * step
    return sorted({1 + int(offset + i * step) for i in range(most)})
