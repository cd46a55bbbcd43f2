"""Records each import of itself (the importing pid, appended to $FORKSERVER_TEST_PROBE_LOG)."""
import os
import pickle
import sys

_log = os.environ.get("FORKSERVER_TEST_PROBE_LOG")
if _log:
    with open(_log, "a") as f:
        f.write(f"{os.getpid()}\n")


def report_modules(control):
    """forkserver worker: send back which of the mp context's modules this process has."""
    names = ["forkserver._pool._mp_worker", "multiprocessing.spawn"]
    control.sendall(pickle.dumps({name: name in sys.modules for name in names}))


def send_forkserver_modules(conn):
    """multiprocessing target: send back the forkserver modules this child has."""
    conn.send(sorted(name for name in sys.modules if name.startswith("forkserver")))
