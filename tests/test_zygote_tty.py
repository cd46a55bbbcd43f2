"""``forkserver run`` at a real terminal: a pty, Ctrl-C, SIGWINCH, Ctrl-Z and ``fg``.

The client runs as the session leader of a new pty (``os.openpty``; a small
leader opens the slave, so it becomes its controlling terminal, then execs
the client), the test types into the master.  The run gets the *client's*
pty fds, so ``isatty()`` is true there, and keys typed at the terminal
signal the client (the terminal's foreground group), which forwards them.

Job control needs a shell: ``test_ctrl_z_stops_the_run_and_fg_continues_it``
runs a tiny one as the session leader, which puts the client in a
foreground process group of its own and waits for it with ``WUNTRACED``,
as bash does.  Not covered here: a run reading the terminal while its
client is in the *background* -- the kernel cannot stop it with SIGTTIN,
because it is not in the terminal's session (docs/zygote.md, "Limits").
"""
from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time

import pytest

from tests._zygote import DEADLINE, FORKSERVER, read_until, zygotes  # noqa: F401

LEADER = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
          "[os.dup2(fd, i) for i in range(3)]; fd > 2 and os.close(fd); "
          "os.execv(sys.argv[2], sys.argv[2:])")


class Terminal:
    """A pty whose session leader execs ``argv``; the test holds the master."""

    def __init__(self, argv, env):
        self.master, self.slave = os.openpty()
        name = os.ttyname(self.slave)
        self.proc = subprocess.Popen([sys.executable, "-c", LEADER, name, *argv], env=env,
                                     start_new_session=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.seen = b""
        self.cursor = 0

    def expect(self, needle: bytes) -> bytes:
        """Read until ``needle`` appears after the previous match; everything seen so far."""
        found = self.seen.find(needle, self.cursor)
        if found < 0:
            self.seen += read_until(self.master, needle)  # reads until it is in the new bytes
            found = self.seen.find(needle, self.cursor)
        self.cursor = found + len(needle)
        self._drop_slave()
        return self.seen

    def _drop_slave(self) -> None:
        # Held until the leader surely has the slave open: a master whose
        # slave nobody holds reads as EOF (EIO).  Dropped so that the end reads as EOF.
        if self.slave is not None:
            os.close(self.slave)
            self.slave = None

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def rest(self) -> bytes:
        """Everything up to the end (all slave ends closed)."""
        self._drop_slave()
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if not select.select([self.master], [], [], deadline - time.monotonic())[0]:
                break
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: every slave end is closed
                break
            if not chunk:
                break
            self.seen += chunk
        return self.seen

    def close(self) -> int:
        """Wait for the leader's exit (killed after a deadline); its returncode. Idempotent."""
        self._drop_slave()
        try:
            return self.proc.wait(DEADLINE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.master is not None:
                os.close(self.master)
                self.master = None


def tty_env(zygotes):
    """The tests' environment, without PYTHONUNBUFFERED: buffering then follows isatty()."""
    return {k: v for k, v in zygotes.env.items() if k != "PYTHONUNBUFFERED"}


@pytest.fixture
def terminal(zygotes):
    made = []

    def start(*args):
        term = Terminal([FORKSERVER, "run", "--preload", "json", *args], tty_env(zygotes))
        made.append(term)
        return term

    yield start
    for term in made:
        if term.proc.poll() is None:
            term.proc.kill()
        term.close()


def test_in_a_pty_the_run_sees_a_terminal_and_ctrl_c_raises_keyboardinterrupt(terminal):
    term = terminal("-c", textwrap.dedent("""\
        import os, sys, time
        print("tty", [os.isatty(fd) for fd in (0, 1, 2)], sys.stdout.line_buffering)
        try:
            print("ready")
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted")
            raise
        """))
    term.expect(b"ready")
    term.type(b"\x03")  # Ctrl-C: SIGINT to the terminal's foreground group (the client)
    out = term.rest()
    assert b"tty [True, True, True] True" in out  # line-buffered: it is a terminal
    assert b"interrupted" in out and b"KeyboardInterrupt" in out
    assert term.close() == -signal.SIGINT  # the client died of the run's signal


def test_input_typed_at_the_terminal_reaches_the_run(terminal):
    term = terminal("-c", "print('got', input('name? '))")
    term.expect(b"name? ")
    term.type(b"zygote\n")
    assert b"got zygote" in term.rest()
    assert term.close() == 0


def test_sigwinch_is_forwarded_and_the_run_reads_the_new_size(terminal):
    term = terminal("-c", textwrap.dedent("""\
        import os, signal
        # os.write: a handler's print could land inside the main code's print (reentrant).
        signal.signal(signal.SIGWINCH,
                      lambda *a: os.write(1, b"size %r\\n" % (tuple(os.get_terminal_size()),)))
        print("ready")
        while True:
            signal.pause()
        """))
    term.expect(b"ready")
    # A new size on the pty: the kernel sends SIGWINCH to its foreground group (the client).
    fcntl.ioctl(term.master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    term.expect(b"size (111, 33)")
    term.type(b"\x03")
    assert term.close() == -signal.SIGINT


def test_ctrl_z_in_an_orphaned_group_leaves_the_run_running(terminal):
    # The client here is a session leader whose parent is in another session:
    # its group is orphaned, and POSIX has the kernel discard a terminal's
    # SIGTSTP for it.  The run must not be left stopped either.
    term = terminal("-c", "print('ready'); print('got', input())")
    term.expect(b"ready")
    term.type(b"\x1a")
    term.type(b"go\n")
    assert b"got go" in term.rest()
    assert term.close() == 0


SHELL = textwrap.dedent("""\
    # A minimal job-control shell: the client in its own foreground group, waited for
    # with WUNTRACED; on a stop, check the run is stopped too, then `fg` it.
    import os, signal, sys, time
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # tcsetpgrp from the background
    argv, pidfile = sys.argv[1:-1], sys.argv[-1]
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.tcsetpgrp(0, os.getpgrp())
        signal.signal(signal.SIGTTOU, signal.SIG_DFL)
        os.execv(argv[0], argv)
    try:
        os.setpgid(pid, pid)  # both sides, as shells do (EACCES: it has exec'd already)
    except PermissionError:
        pass
    os.tcsetpgrp(0, pid)
    _, status = os.waitpid(pid, os.WUNTRACED)
    print("client stopped:", os.WIFSTOPPED(status), flush=True)
    run = int(open(pidfile).read())
    deadline = time.monotonic() + 20
    def state():
        return open(f"/proc/{run}/stat").read().rpartition(")")[2].split()[0]
    while state() != "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    print("run state:", state(), flush=True)
    os.tcsetpgrp(0, pid)
    os.killpg(pid, signal.SIGCONT)  # fg
    _, status = os.waitpid(pid, 0)
    print("client exit:", os.waitstatus_to_exitcode(status), flush=True)
    """)


def test_ctrl_z_stops_the_run_and_fg_continues_it(zygotes, tmp_path):
    pidfile = tmp_path / "run.pid"
    code = (f"import os, sys; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
            "print('ready', flush=True); print('resumed with', sys.stdin.readline().strip())")
    client = [FORKSERVER, "run", "--preload", "json", "-c", code]
    term = Terminal([sys.executable, "-c", SHELL, *client, str(pidfile)], tty_env(zygotes))
    try:
        term.expect(b"ready")
        term.type(b"\x1a")  # Ctrl-Z: SIGTSTP to the foreground group (the client's)
        term.expect(b"client stopped: True")
        term.expect(b"run state: T")  # stopped, not just its client
        term.type(b"go\n")  # after fg
        out = term.expect(b"client exit:")
        assert b"resumed with go" in out
        assert b"client exit: 0" in term.rest()
    finally:
        assert term.close() == 0
