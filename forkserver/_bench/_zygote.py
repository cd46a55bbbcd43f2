"""The ``zygote`` scenario of ``python -m forkserver bench``: a script's start, warm vs cold.

A script that imports the preload module and prints one line, run to its
end ``ROUNDS`` times by each contender, interleaved:

* ``forkserver run`` (the console script) and the launcher
  (``forkserver launcher``: the same client under ``python -IS``), both
  against a zygote that has the module preloaded, started once before;
* ``python script.py``, what the zygote replaces;
* ``python -IS -c pass``: the floor of any Python client, for reference.

Everything runs against a private zygote directory, stopped at the end.
``benchmarks/zygote.py`` is the same measurement with more detail.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Dict, Iterator, List, Optional

from . import _core as B

FS_RUN, FS_LAUNCHER = "forkserver run", "forkserver launcher (-IS)"
PYTHON, FLOOR = "python script.py", "python -IS -c pass"
ROUNDS = 20
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "forkserver")


class ZygoteBench:
    """A private zygote directory, the script, a launcher, and one sampler per contender."""

    def __init__(self, preload: str, directory: str) -> None:
        self.preload = preload
        self.dir = directory
        self.env = dict(os.environ, FORKSERVER_RUNTIME_DIR=os.path.join(directory, "rt"))
        self.env.pop("FORKSERVER_PRELOAD", None)
        os.mkdir(self.env["FORKSERVER_RUNTIME_DIR"], 0o700)
        self.script = os.path.join(directory, "script.py")
        with open(self.script, "w") as f:
            f.write(f"import {preload}\nprint('{preload} imported')\n")
        self.launcher = os.path.join(directory, "fsrun")
        self.argv: Dict[str, Optional[List[str]]] = {
            FS_RUN: [CONSOLE_SCRIPT, "run", "--preload", preload, self.script],
            FS_LAUNCHER: [self.launcher, self.script],
            PYTHON: [sys.executable, self.script],
            FLOOR: [sys.executable, "-IS", "-c", "pass"],
        }
        if not os.path.exists(CONSOLE_SCRIPT):
            self.argv[FS_RUN] = self.argv[FS_LAUNCHER] = None
            return
        self._cli("launcher", self.launcher, "--preload", preload)
        self._run([sys.executable, "-c", "pass"])  # the interpreter's files cached
        self._run([CONSOLE_SCRIPT, "run", "--preload", preload, self.script])  # starts the
        # zygote: the preload is paid here, once

    def _cli(self, *args: str) -> None:
        subprocess.run([CONSOLE_SCRIPT, *args], env=self.env, check=True,
                       stdout=subprocess.DEVNULL, timeout=B.TIMEOUT)

    def _run(self, argv: List[str]) -> int:
        """posix_spawn ``argv`` (stdout to /dev/null) and wait: its exit status."""
        actions = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
        pid = os.posix_spawn(argv[0], argv, self.env, file_actions=actions)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def sampler(self, name: str) -> Optional[Callable[[], float]]:
        argv = self.argv[name]
        if argv is None:
            return None
        return B.timed(name, lambda: self._run(argv))

    def contenders(self) -> List[B.Contender]:
        note = None if self.argv[FS_RUN] else f"no console script at {CONSOLE_SCRIPT}"
        return [B.Contender(name, self.sampler(name), note=note if self.argv[name] is None else None)
                for name in (FS_RUN, FS_LAUNCHER, PYTHON, FLOOR)]

    def close(self) -> None:
        if self.argv[FS_RUN] is not None:
            self._cli("stop", "--wait")


@contextlib.contextmanager
def zygote_bench(preload: str) -> Iterator[ZygoteBench]:
    """A ``ZygoteBench`` in a temporary directory; its zygote stopped, the directory removed."""
    directory = tempfile.mkdtemp(prefix="fs-bench-zygote-")
    try:
        zb = ZygoteBench(preload, directory)
        try:
            yield zb
        finally:
            zb.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def zygote(bench) -> B.Scenario:
    """The ``zygote`` scenario: ``ROUNDS`` runs of the script by each contender, and its goal."""
    sc = B.Scenario("zygote", f"script start: import {bench.s.preload}, print a line", "ms")
    with zygote_bench(bench.s.preload) as zb:
        sc.contenders = zb.contenders()
        bench.measure(sc.contenders, rounds=min(ROUNDS, bench.s.rounds))
    sc.notes = [f"{FS_LAUNCHER} = the same client without site or package import "
                "(`forkserver launcher PATH`)",
                f"{FLOOR} = the start-up floor of any client written in Python"]
    python, launcher = sc.median(PYTHON), sc.median(FS_LAUNCHER)
    sc.goals.append(dict(text=f"zygote: launcher >= 10x faster than {PYTHON}",
                         value=None if python is None or launcher is None else python / launcher,
                         limit=10.0, unit="x", at_least=True))
    return sc
