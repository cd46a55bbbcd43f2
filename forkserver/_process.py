"""``Child``: a running worker or program, in the parent."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from typing import IO, Any, Callable, Iterator, Optional, Sequence, Tuple

from ._errors import ReapedElsewhereError
from ._interrupts import deferred
from ._wait import lost_status, open_pidfd, wait_readable


class Child:
    """A process started by ``Template.run`` or ``spawn``: your direct child.

    You do not make one yourself: ``run`` and ``spawn`` return it.  ``pid``
    and ``returncode`` (None until the process is reaped) are attributes.
    For a worker, ``control`` is the process's end of its command socket
    turned control socket (non-blocking, close-on-exec here; the worker got
    the other end as its first argument).  For a program (``spawn``),
    ``control`` is None, ``args`` is its argument list, and ``stdin``,
    ``stdout``, ``stderr`` are file objects for the streams asked as
    ``subprocess.PIPE`` (else None): binary, or text when the program was
    spawned in text mode (``text``/``encoding``/``errors``; then ``encoding``
    and ``errors`` say the codec, as on ``Popen``).  ``wait``/``poll``/
    ``returncode``/``communicate`` follow ``subprocess.Popen``: a negative
    returncode is the signal that ended it.

    ``check`` (``Template.run(check=True)``): ``wait()`` and the end of a
    ``with`` block raise ``forkserver.CalledProcessError`` when the process
    exits non-zero; ``poll()``, ``returncode`` and ``communicate()`` only
    report the status, as on ``Popen``.
    """

    def __init__(
        self,
        pid: int,
        control: Optional[socket.socket],
        target: str = "",
        pidfd: Optional[int] = None,
        *,
        check: bool = False,
        exit_timeout: Optional[float] = None,
        args: Any = None,
        stdin: Optional[IO[bytes]] = None,
        stdout: Optional[IO[bytes]] = None,
        stderr: Optional[IO[bytes]] = None,
    ) -> None:
        self.pid = pid
        self.control = control
        self.target = target
        self.args = args
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self._comm: Any = None  # communicate()'s state across a TimeoutExpired
        # Set by the program path (forkserver._programs), which owns the pipes:
        # this layer does not import the rooms above it.
        self._communicate: Optional[Callable[..., Tuple[Optional[bytes], Optional[bytes]]]] = None
        #: ``wait()`` and ``with child:`` raise CalledProcessError for a non-zero exit
        self.check = check
        #: how long ``with child:`` waits for the exit when the block ends normally
        self.exit_timeout = exit_timeout
        #: text mode's codec (``spawn(text=True)`` / ``encoding=``), else None
        self.encoding: Optional[str] = None
        self.errors: Optional[str] = None
        self.text_mode = False
        self.returncode: Optional[int] = None
        self._lock = threading.Lock()
        self._waiters = 0  # threads polling the pidfd right now
        self._waited: Optional[Tuple[int, int]] = None  # what waitpid(WNOHANG) said last
        # Last, and in one statement: the Child owns the pidfd from the statement
        # that opens or takes it (an error before leaves it with the caller).
        # None: reaped by someone else already (SIGCHLD=SIG_IGN): wait() says so.
        # (One line, too: a statement over several lines has a line event at each.)
        self._pidfd: Optional[int] = open_pidfd(pid, gone_ok=True) if pidfd is None else pidfd

    def __repr__(self) -> str:
        return f"<forkserver.Child pid={self.pid} {self._state()}>"

    def _state(self) -> str:
        code = self.returncode
        if code is None:
            return "running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited {code}"

    def _release_pidfd(self) -> None:  # lock held
        # Close the pidfd once reaped, but never under a thread polling it:
        # its number could be reused by an unrelated fd meanwhile.
        if self.returncode is not None and self._waiters == 0 and self._pidfd is not None:
            # os.close returns None: closed and forgotten at once
            self._pidfd = os.close(self._pidfd)  # type: ignore[func-returns-value]

    def poll(self) -> Optional[int]:
        """The returncode if the process has exited (reaping it), else None."""
        # Ctrl-C deferred: between the waitpid and storing its status, it would lose the status.
        # And the waitpid's result is stored by the statement that calls it, so
        # an error striking in between (a MemoryError) loses nothing either:
        # the next poll() finishes the job from the stored record.
        with deferred(), self._lock:
            if self.returncode is None:
                if self._waited is None or self._waited[0] == 0:
                    try:
                        self._waited = os.waitpid(self.pid, os.WNOHANG)
                    except ChildProcessError:
                        raise ReapedElsewhereError(lost_status(self.pid)) from None
                if self._waited[0] != 0:
                    self.returncode = os.waitstatus_to_exitcode(self._waited[1])
            self._release_pidfd()
            return self.returncode

    @property
    def universal_newlines(self) -> bool:
        """``Popen``'s old name for ``text_mode``."""
        return self.text_mode

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the process to exit and return its returncode.

        Raises ``subprocess.TimeoutExpired`` if it is still running after
        ``timeout`` seconds (the process is left running; the exception's
        ``timeout`` is the one given).  With ``check`` (see the class docs),
        a non-zero returncode raises ``forkserver.CalledProcessError``.
        A status someone else reaped first raises ``ReapedElsewhereError``.
        """
        code = self._wait(timeout)
        self._check_status(code)
        return code

    def _wait(self, timeout: Optional[float] = None, reported: Any = None) -> int:
        """``wait`` without ``check``; a TimeoutExpired says ``reported`` if given."""
        with self._waiting() as pidfd:
            if pidfd is not None and not wait_readable(pidfd, timeout):
                raise self._timeout(timeout if reported is None else reported)
        return self._reap_after_wait()

    def _check_status(self, code: int) -> None:
        if self.check and code != 0:
            from ._errors import CalledProcessError

            raise CalledProcessError(code, self._cmd())

    @contextlib.contextmanager
    def _waiting(self) -> Iterator[Optional[int]]:
        """Yield the pidfd to wait on (None once reaped), kept open meanwhile."""
        counted = False
        try:
            with self._lock:
                pidfd = None if self.returncode is not None else self._pidfd
                self._waiters, counted = self._waiters + 1, True
            yield pidfd
        finally:
            if counted:
                with self._lock:
                    self._waiters -= 1
                    self._release_pidfd()

    def _timeout(self, timeout: Optional[float]) -> Exception:
        import subprocess

        return subprocess.TimeoutExpired(self._cmd(), timeout)  # type: ignore[arg-type]  # None never times out

    def _cmd(self) -> Any:
        """What errors name the process by: its args, its target, or its pid."""
        if self.args is not None:
            return self.args
        return self.target or str(self.pid)

    def _reap_after_wait(self) -> int:
        code = self.poll()
        assert code is not None
        return code

    def communicate(
        self, input: Optional[bytes] = None, timeout: Optional[float] = None
    ) -> Tuple[Optional[bytes], Optional[bytes]]:
        """Send ``input`` to stdin, read stdout and stderr to their end, wait for the exit.

        As ``subprocess.Popen.communicate``: returns ``(stdout, stderr)``
        (None for a stream that is not a pipe); after ``timeout`` seconds
        raises ``subprocess.TimeoutExpired`` and the child keeps running --
        call ``communicate()`` again (nothing read is lost) or ``kill()`` it.
        The same after a ``KeyboardInterrupt``; passing the same ``input``
        object again is fine, it is not written twice.
        """
        if self._communicate is None:  # no pipes to serve (a worker): just the wait
            if input is not None:
                raise ValueError(
                    f"communicate() on {self!r}: input given but stdin is not a pipe; "
                    "spawn with stdin=PIPE"
                )
            self._wait(timeout)
            return None, None
        return self._communicate(self, input, timeout)

    # -- signals -----------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` through the pidfd; a no-op once the child has been reaped.

        A pidfd names this process, never a later one that reuses its pid.
        """
        with self._lock:
            if self.returncode is not None or self._pidfd is None:
                return
            signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        """SIGTERM (see ``send_signal``)."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (see ``send_signal``)."""
        self.send_signal(signal.SIGKILL)

    def stop(self, grace: float = 5.0, signals: Sequence[int] = (signal.SIGTERM,)) -> int:
        """Send each of ``signals`` in turn, waiting ``grace`` seconds after each,
        then SIGKILL; return the returncode.  Never waits forever.

        ``signals=(signal.SIGINT,)`` suits programs that stop on Ctrl-C (ffmpeg);
        ``(signal.SIGTERM, signal.SIGTERM)`` those that want it twice (GNU parallel).
        On a child that already exited it just returns its returncode.
        """
        import subprocess

        for sig in signals:
            if self.poll() is not None:
                return self.returncode  # type: ignore[return-value]
            self.send_signal(sig)
            try:
                return self._wait(grace)
            except subprocess.TimeoutExpired:
                continue
        self.kill()
        return self._wait()

    # -- context manager: wait on success, stop on failure ---------------------

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Block ended normally: wait for the exit (``exit_timeout``) and, with
        ``check``, raise ``CalledProcessError`` on a failure.  Block raised:
        ``stop()`` the child.  A child is never terminated on the success path.
        Pipes to a program are closed first, as ``Popen`` does (stdin last,
        flushed, so the program sees its end of input).
        """
        import subprocess

        try:
            self._close_pipes()
            if exc_type is not None:
                self.stop()
                return
            try:
                code = self._wait(self.exit_timeout)
            except subprocess.TimeoutExpired:
                self.stop()
                raise
            self._check_status(code)
        finally:
            self.close()

    def _close_pipes(self) -> None:
        for stream in (self.stdout, self.stderr, self.stdin):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass  # the program exited without reading what stdin still buffered

    def close(self) -> None:
        """Close our ends of the control socket and of the pipes (the process keeps running)."""
        if self.control is not None:
            self.control.close()
        self._close_pipes()

    def __del__(self) -> None:
        # Dropped while running: the reaper waits for it, so no zombie stays.
        try:
            if self.returncode is None and self._pidfd is not None:
                from ._reaper import reaper

                # handed over and forgotten at once (adopt returns None)
                self._pidfd = reaper.adopt(self.pid, self._pidfd)  # type: ignore[func-returns-value]
        except Exception:
            pass  # interpreter shutdown: the kernel reparents what is left
