"""Worker functions run by the tests (imported by name in template processes)."""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import sys


def send_obj(control: socket.socket, obj) -> None:
    data = pickle.dumps(obj)
    control.sendall(len(data).to_bytes(4, "big") + data)


def recv_obj(control: socket.socket):
    head = recv_exact(control, 4)
    return pickle.loads(recv_exact(control, int.from_bytes(head, "big")))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def report(control, *args):
    """Send back what the worker sees: its args, pid, parent, context."""
    described = []
    for a in args:
        if isinstance(a, socket.socket):
            described.append(("socket", a.family, a.type))
        elif hasattr(a, "read") or hasattr(a, "write"):
            described.append(("file", a.mode, type(a).__name__))
        else:
            described.append(("value", a))
    import gc

    send_obj(
        control,
        {
            "args": described,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "sys_path": list(sys.path),
            "control_blocking": control.getblocking(),
            "control_inheritable": control.get_inheritable(),
            "comm": open("/proc/self/comm").read().strip(),
            "gc_frozen": gc.get_freeze_count() if hasattr(gc, "get_freeze_count") else None,
            "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        },
    )


def echo_args(control, *args):
    send_obj(control, args)


def read_files(control, *files):
    """Read each passed file/pipe handle to EOF and send the contents back."""
    out = []
    for f in files:
        if isinstance(f, int):
            chunks = []
            while True:
                c = os.read(f, 65536)
                if not c:
                    break
                chunks.append(c)
            out.append(b"".join(chunks))
        else:
            out.append(f.read())
    send_obj(control, out)


def write_text(control, f, text):
    f.write(text)
    f.flush()


def accept_loop(control, listener, worker_no):
    """Accept connections on a shared listener until the control socket says stop."""
    import select

    listener.setblocking(False)
    while True:
        ready, _, _ = select.select([listener, control], [], [], 30)
        if not ready:
            return 2
        if control in ready:
            return  # EOF or any byte: stop
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue  # another worker took it
        with conn:
            conn.setblocking(True)
            conn.sendall(b"worker %d pid %d\n" % (worker_no, os.getpid()))


def exit_with(control, code):
    sys.exit(code)


def raise_value_error(control):
    raise ValueError("raised on purpose")


def kill_self(control, signo):
    os.kill(os.getpid(), signo)


def return_quietly(control):
    return None


def matmul(control):
    import numpy

    a = numpy.ones((200, 200))
    send_obj(control, float((a @ a).sum()))


def print_and_exit(control, text):
    print(text, end="")


def env_at_import(control):
    from tests import _env_probe

    send_obj(control, _env_probe.SEEN)


def count_threads(control):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                send_obj(control, int(line.split()[1]))


def wait_for_eof(control):
    control.recv(1)


def main_thread_json(control):
    control.sendall(json.dumps({"pid": os.getpid()}).encode())


def ignore_sigterm(control):
    """Ignore SIGTERM, say so, then wait for EOF (or a SIGKILL)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control.sendall(b"r")
    control.recv(1)


def ready_then_wait(control):
    """Say we are running (default signal handling), then wait for EOF."""
    control.sendall(b"r")
    control.recv(1)


def echo_until_eof(control):
    """cat: echo everything from the control socket until EOF, then exit 0."""
    while True:
        data = control.recv(65536)
        if not data:
            return
        control.sendall(data)


def wait_on_pipe(control, fd):
    """Block until the pipe ``fd`` has data or EOF (independent of the parent)."""
    os.read(fd, 1)


def mark(control, *args):
    """Send back ``MARK``, a global an ``eval`` in the template may have set here."""
    send_obj(control, globals().get("MARK"))


def arg_sizes(control, *args):
    """Send back the length of each sent item."""
    send_obj(control, [len(a) for a in args])


def namespace_get(control, *names):
    """Send back the values of ``names`` in the template's namespace, read as a module."""
    import forkserver.template as namespace  # the template's module, in a worker

    send_obj(control, [getattr(namespace, name, "<missing>") for name in names])


def module_names(control):
    """Send back the names of the modules loaded in the worker."""
    send_obj(control, sorted(sys.modules))


def report_fd_table(control, *args):
    """Send back ``TABLE``, what an ``eval`` in the template measured of its fd table."""
    send_obj(control, globals().get("TABLE"))


def interrupt_parent_when_released(inode, seconds):
    """In a template: wait for a byte on the pipe ``inode`` (sent with ``send_fh``), then
    Ctrl-C the test process and stay busy ``seconds``."""
    import time

    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == f"pipe:[{inode}]":
                os.read(int(name), 1)  # the test writes it once it is where it wants the Ctrl-C
                break
        except OSError:
            continue
    os.kill(int(os.environ.get("FORKSERVER_TEST_PARENT", os.getppid())), signal.SIGINT)
    time.sleep(seconds)


class InterruptWhenReleased:
    """A value whose unpickling in a template waits for a byte on a pipe, then sends SIGINT
    to the test process and takes a while (so the Ctrl-C lands exactly where the test says)."""

    def __init__(self, read_end, seconds):
        self.inode = os.fstat(read_end).st_ino
        self.seconds = seconds

    def __reduce__(self):
        return (interrupt_parent_when_released, (self.inode, self.seconds))


def refuse_to_load():
    raise RuntimeError("this pickle refuses to load")


class RaisesOnLoad:
    """Pickles fine; unpickling it (in a template) raises RuntimeError."""

    def __reduce__(self):
        return (refuse_to_load, ())
