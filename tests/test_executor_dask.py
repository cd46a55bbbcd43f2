"""A real consumer: dask computes bag and array graphs with forkserver.Executor as its scheduler.

dask accepts any ``concurrent.futures.Executor`` (``scheduler=ex``): it
submits batches of its tasks and reads ``_max_workers`` for how many to
keep in flight.  The graphs' functions must be picklable by name (no
lambdas), as with ``ProcessPoolExecutor``.
"""
from __future__ import annotations

import operator
from functools import partial

import pytest

dask = pytest.importorskip("dask", reason="dask is not installed (pip install -e '.[test]')")
pytest.importorskip("dask.array", reason="dask.array needs numpy (pip install 'dask[array]')")

import dask.array as da  # noqa: E402
import dask.bag as db  # noqa: E402
import numpy  # noqa: E402

from forkserver import Executor  # noqa: E402

from . import _executor_tasks as T  # noqa: E402


@pytest.fixture(scope="module")
def ex():
    # dask's modules are loaded once, in the template, not in each worker; both
    # workers are up before the tests' leak checks take their snapshots
    modules = ["dask", "dask.bag", "dask.array", "numpy"]
    with Executor(2, min_workers=2, preload=modules) as executor:
        assert executor._pool.wait_until(lambda pool: len(pool.idle) == 2, 30)
        yield executor


def test_dask_computes_a_bag_graph_on_the_executor(ex, no_leaks):
    bag = db.from_sequence(range(100), npartitions=4)
    tripled = bag.map(partial(operator.mul, 3)).filter(partial(operator.lt, 30))
    total, count, largest = dask.compute(tripled.sum(), tripled.count(), tripled.max(),
                                         scheduler=ex)
    expected = [3 * i for i in range(100) if 3 * i > 30]
    assert (total, count, largest) == (sum(expected), len(expected), max(expected))


def test_dask_computes_an_array_graph_on_the_executor(ex, no_leaks):
    plain = numpy.arange(10_000).reshape(100, 100)
    x = da.from_array(plain, chunks=25)
    product, means = dask.compute((x @ x.T).sum(), x.mean(axis=0), scheduler=ex)
    assert product == (plain @ plain.T).sum()
    assert numpy.allclose(means, plain.mean(axis=0))


def test_dask_tasks_really_run_in_the_workers(ex, no_leaks):
    import os

    pids = db.from_sequence(range(8), npartitions=8).map(T.pid_of).compute(scheduler=ex)
    assert os.getpid() not in pids and 1 <= len(set(pids)) <= 2


def test_a_failing_dask_task_raises_its_own_exception(ex, no_leaks):
    bag = db.from_sequence(["ok", "bad"], npartitions=2).map(T.fail_on_bad)
    with pytest.raises(ValueError, match="bad item"):
        bag.compute(scheduler=ex)
