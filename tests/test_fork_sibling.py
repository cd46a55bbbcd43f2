"""fork_sibling(): a template-like process creates children that belong to *its* parent."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from ._helpers import wait_exitcode

pytestmark = pytest.mark.usefixtures("no_leaks")

# Run by a subprocess of the test: it creates one sibling per behaviour, prints
# their pids and exits.  The test process (the grandparent) must reap them.
TEMPLATE_LIKE = textwrap.dedent(
    """
    import json, os, signal, sys, threading
    from forkserver._fds import fork_sibling

    go = int(sys.argv[1])
    behaviours = json.loads(sys.argv[2])
    pids = []
    for how in behaviours:
        pid = fork_sibling()
        if pid == 0:
            # let the grandparent see EOF on the template's stdout
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.read(go, 1)          # wait until the grandparent has looked at us
            kind, value = how
            if kind == "exit":
                os._exit(value)
            if kind == "sys.exit":
                sys.exit(value)     # normal interpreter shutdown in the clone
            if kind == "thread":
                out = []
                t = threading.Thread(target=out.append, args=(value,))
                t.start(); t.join()
                os._exit(out[0])
            if kind == "signal":
                os.kill(os.getpid(), value)
            os._exit(99)
        pids.append(pid)
    print(json.dumps(pids), flush=True)
    """
)

BEHAVIOURS = [
    ("exit", 0),
    ("exit", 3),
    ("exit", 255),
    ("sys.exit", 4),
    ("thread", 17),
    ("signal", int(signal.SIGTERM)),
    ("signal", int(signal.SIGKILL)),
    ("signal", int(signal.SIGUSR1)),
]


def expected_returncode(how):
    kind, value = how
    return -value if kind == "signal" else value


def test_the_grandparent_reaps_siblings_with_their_exact_exit_codes_and_signals():
    go_r, go_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", TEMPLATE_LIKE, str(go_r), json.dumps(BEHAVIOURS)],
        stdout=subprocess.PIPE,
        pass_fds=[go_r],
    )
    os.close(go_r)
    try:
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        pids = json.loads(out)
        assert len(pids) == len(BEHAVIOURS)
        me = os.getpid()
        for pid in pids:
            # The template-like process has exited; its clones are still ours.
            assert psutil.Process(pid).ppid() == me
            assert pid != proc.pid
    finally:
        os.close(go_w)  # EOF: every sibling proceeds to its exit
    codes = [wait_exitcode(pid) for pid in pids]
    assert codes == [expected_returncode(how) for how in BEHAVIOURS]


def test_a_sibling_reports_its_own_pid_and_our_pid_as_its_parent():
    script = textwrap.dedent(
        """
        import os, sys
        from forkserver._fds import fork_sibling, gettid
        pid = fork_sibling()
        if pid == 0:
            os.write(1, b"%d %d %d\\n" % (os.getpid(), os.getppid(), gettid()))
            os._exit(0)
        os.write(1, b"%d\\n" % pid)  # one write: print() may split it around the sibling's line
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, timeout=30, check=True
    ).stdout.decode()
    lines = sorted(out.split("\n")[:2], key=len)
    created = int(lines[0])
    pid, ppid, tid = map(int, lines[1].split())
    assert pid == created == tid
    assert ppid == os.getpid()
    assert wait_exitcode(created) == 0
