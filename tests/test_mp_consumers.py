"""Real consumers of a multiprocessing context, given forkserver.mp_context().

* ``concurrent.futures.ProcessPoolExecutor(mp_context=ctx)`` and
  ``multiprocessing.Pool`` through ``ctx.Pool()`` (more in
  ``test_mp_futures.py`` / ``test_mp_stdlib.py``);
* dask's multiprocessing scheduler (``scheduler="processes"``): it takes a
  context only by *name* (its ``multiprocessing.context`` setting goes to
  ``multiprocessing.get_context``), so it is handed a pool instead
  (``pool=``: an Executor or a ``multiprocessing.Pool``), which it accepts;
* PyTorch's ``DataLoader(num_workers=2, multiprocessing_context=ctx)``
  (skipped when torch is not installed; it is not in the test extra).
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from forkserver._pool._mp import TemplateContext

from ._mp_helpers import module_context, mp_no_leaks, mp_tracker  # noqa: F401

pytestmark = pytest.mark.usefixtures("mp_no_leaks")

TIMEOUT = 60.0
CTX = TemplateContext(preload=[__name__])  # built by the module fixture, not at import


@pytest.fixture(scope="module", autouse=True)
def _built_then_closed():
    with module_context(CTX):
        yield


def pid_and_parent(x):
    return x, os.getpid(), os.getppid()


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def test_process_pool_executor_runs_on_our_children():
    with ProcessPoolExecutor(2, mp_context=CTX) as ex:
        results = list(ex.map(pid_and_parent, range(8)))
    assert [x for x, _, _ in results] == list(range(8))
    assert {ppid for _, _, ppid in results} == {os.getpid()}


def test_multiprocessing_pool_runs_on_our_children():
    with CTX.Pool(2) as pool:
        results = pool.map(pid_and_parent, range(8))
        pool.close()
        pool.join()
    assert {ppid for _, _, ppid in results} == {os.getpid()}


def _graph():
    return {"a": 1, "b": (inc, "a"), "c": (inc, "b"), "d": (add, "b", "c")}


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_dasks_multiprocessing_scheduler_runs_on_a_pool_of_ours(kind):
    pytest.importorskip("dask")
    import dask
    import dask.multiprocessing

    pool = ProcessPoolExecutor(2, mp_context=CTX) if kind == "executor" else CTX.Pool(2)
    try:
        assert dask.multiprocessing.get(_graph(), "d", pool=pool) == 5
        with dask.config.set(pool=pool):
            assert dask.get(_graph(), ["c", "d"], scheduler="processes") == (3, 5)
    finally:
        if kind == "executor":
            pool.shutdown(wait=True)
        else:
            pool.close()
            pool.join()


class Squares:
    """A map-style dataset (torch.utils.data.Dataset is duck-typed by DataLoader)."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        import torch

        return torch.tensor([i * i, os.getppid()])


def test_pytorch_dataloader_takes_our_context():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    loader = DataLoader(Squares(), batch_size=4, num_workers=2, multiprocessing_context=CTX)
    batches = list(loader)
    values = torch.cat(batches)
    assert values[:, 0].tolist() == [i * i for i in range(16)]
    # The workers are ours (PyTorch's own checks: its SIGCHLD handler waits for
    # their pids, its watchdog compares os.getppid() in them with ours).
    assert set(values[:, 1].tolist()) == {os.getpid()}
    del loader, batches
