"""Tasks of the executor benchmarks (``python -m forkserver bench --only executor_*``).

They run in the workers of every contender -- forkserver.Executor,
ProcessPoolExecutor, loky -- which find them by module and name.  The module
imports the preload module (numpy by default), so every contender's workers
have it loaded: in forkserver's template, in a forked parent, or at their
first task (a spawned or forkserver'd ProcessPoolExecutor worker).
"""
from __future__ import annotations

import importlib
import os

importlib.import_module(os.environ.get("FORKSERVER_BENCH_PRELOAD", "json"))


def noop() -> None:
    """A task that does nothing: what is measured is the round trip."""


def ident(x: object) -> object:
    return x
