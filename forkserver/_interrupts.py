"""Ctrl-C at a safe moment: deferring ``KeyboardInterrupt`` around steps that must not be cut.

Python runs a signal's handler in the main thread, between two bytecodes of
whatever it is executing; the default SIGINT handler raises
``KeyboardInterrupt`` there.  A few steps of ours must not be cut in two by
that: the syscall that sends part of a frame and the statement that records
it, ``waitpid`` and the statement that stores the exit status, ``close`` of
an fd and the statement that forgets it.  ``deferred()`` is the smallest
mask we know for those: in the main thread it swaps the SIGINT handler for
one that only notes the signal, and on exit restores it and, if a SIGINT
came meanwhile, calls the real handler there, at a point where our state is
whole again.  Blocking waits inside a deferred region are wrapped in
``allowed()``, so a Ctrl-C during a wait is delivered at once.

Why not the alternatives: ``signal.pthread_sigmask`` masks the signal for the
calling thread only -- the kernel then hands it to any other thread, whose
C handler still makes Python raise in the main thread.  A permanent handler
of our own would change what the user sees in ``signal.getsignal``.  The
swap costs two ``sigaction`` calls (~0.3 us with ``_signal``; the ``signal``
module's enum wrappers would cost 10 times more).

Other threads never get ``KeyboardInterrupt`` (Python signal handlers run in
the main thread only), so there nothing is swapped.  A handler that is not
a Python callable (``SIG_IGN``, ``SIG_DFL``, one installed from C) is left
alone: nothing of ours runs in it.  ``asyncio``'s handlers are deferred
like any other (``loop.add_signal_handler`` and ``asyncio.run`` install
Python callables).
"""
from __future__ import annotations

import _signal
import _thread
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from typing import Literal

__all__ = ["deferred", "allowed"]

_SIGINT = int(_signal.SIGINT)
_MAIN = threading.main_thread().ident


class _State:
    depth = 0  # nesting of deferred() in the main thread
    saved = None  # the handler we swapped out (None: nothing swapped)
    original = None  # the last handler swapped out, kept to repair a region cut short
    pending = False  # a SIGINT came while deferred
    allowed = False  # inside allowed(): deliver at once


_st = _State()


def _deferring(signum, frame):  # the handler while deferred
    if _st.allowed and _st.saved is not None:
        _st.saved(signum, frame)
    else:
        _st.pending = True


class deferred:
    """``with deferred(): ...``: a SIGINT in the block is delivered when it ends."""

    __slots__ = ()

    def __enter__(self) -> "deferred":
        if _thread.get_ident() != _MAIN:
            return self
        st = _st
        if st.depth == 0:
            current = _signal.getsignal(_SIGINT)
            if current is _deferring and st.saved is None:
                current = st.original  # a region's exit was cut short: repair it
            if callable(current) and current is not _deferring:
                _signal.signal(_SIGINT, _deferring)
                st.saved = st.original = current
        st.depth += 1
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        if _thread.get_ident() != _MAIN:
            return False
        st = _st
        st.depth -= 1
        if st.depth == 0 and st.saved is not None:
            handler, st.saved = st.saved, None
            _signal.signal(_SIGINT, handler)
            if st.pending:
                st.pending = False
                handler(_SIGINT, None)  # the default handler raises KeyboardInterrupt here
        return False


class allowed:
    """Inside ``deferred()``: ``with allowed(): <wait>`` takes a Ctrl-C at once (the state is whole)."""

    __slots__ = ("_set",)

    def __enter__(self) -> "allowed":
        self._set = False
        st = _st
        if st.saved is not None and _thread.get_ident() == _MAIN:
            if st.pending:
                st.pending = False
                st.saved(_SIGINT, None)
            st.allowed = self._set = True
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        if self._set:
            _st.allowed = False
        return False


def reset_after_fork() -> None:
    """A forked child starts with nothing deferred (``os.register_at_fork``).

    The forking thread is the child's main thread; if the parent's main
    thread was in a deferred region, the child got our handler: give it back
    the real one.
    """
    global _MAIN
    _MAIN = _thread.get_ident()
    saved, _st.saved = _st.saved, None
    _st.depth, _st.pending, _st.allowed = 0, False, False
    if saved is not None and _signal.getsignal(_SIGINT) is _deferring:
        try:
            _signal.signal(_SIGINT, saved)
        except (ValueError, OSError):
            pass


import os as _os  # noqa: E402 - only for the hook

_os.register_at_fork(after_in_child=reset_after_fork)
