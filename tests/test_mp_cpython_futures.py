"""CPython's own ProcessPoolExecutor tests, run with forkserver.mp_context().

Where the interpreter ships its test suite (``test.test_concurrent_futures``:
a package in 3.12+, one module before; some builds leave it out, then this
is skipped), every class built for the ``forkserver`` start method --
``ProcessPoolForkserver*`` -- runs with its mixin's ``get_context()``
answering our context instead.  Nothing is copied: the tests are loaded
from the standard library and run as they are.

Known differences, skipped by name (``EXPECTED_DIFFERENT``): none of ours.
One of CPython's, on interpreters without its fix: ``test_processes_terminate``
submits a local function, which fails to pickle in the executor's feeder
thread; that thread's error handler takes the executor's shutdown lock while
``shutdown()`` holds it and joins the thread -- CPython's deadlock gh-125451,
fixed in 3.12.8 and 3.13.1.  It hangs there with the standard contexts too,
whenever the two threads meet (it hung a CI run on 3.13.0 here).

A hang in CPython's runner would swallow pytest-timeout's exception and hang
on, so this test uses the timeout's ``thread`` method: on a hang it dumps
every thread's stack and ends the run.
"""
from __future__ import annotations

import importlib
import io
import sys
import unittest
from typing import List

import pytest

import forkserver

PACKAGE_MODULES = ["executor", "test_process_pool", "test_init", "test_shutdown",
                   "test_deadlock", "test_wait", "test_as_completed"]
EXPECTED_DIFFERENT: List[str] = []
# CPython bugs of the interpreter running the tests (see the module docstring).
_GH125451 = sys.version_info < (3, 12, 8) or sys.version_info[:3] == (3, 13, 0)
CPYTHON_BUGS: List[str] = ["test_processes_terminate"] if _GH125451 else []


def _modules():
    """The modules holding the test classes, and the one defining the mixin."""
    try:
        util = importlib.import_module("test.test_concurrent_futures.util")
    except ImportError:
        pass
    else:
        names = [f"test.test_concurrent_futures.{m}" for m in PACKAGE_MODULES]
        return [importlib.import_module(n) for n in names], util, names
    try:
        single = importlib.import_module("test.test_concurrent_futures")
    except ImportError:
        pytest.skip("this Python has no test.test_concurrent_futures "
                    "(its test suite is not installed)")
    return [single], single, [single.__name__]


@pytest.mark.timeout(600, method="thread")
def test_cpythons_process_pool_tests_pass_with_our_context(capsys):
    try:
        modules, util, names = _modules()
    except ImportError as exc:  # pragma: no cover - e.g. test.support missing pieces
        pytest.skip(f"CPython's tests do not import here: {exc}")
    ctx = forkserver.mp_context(preload=names)
    mixin = util.ProcessPoolForkserverMixin
    saved = mixin.get_context
    mixin.get_context = lambda self: ctx
    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    for module in modules:
        for name in dir(module):
            cls = getattr(module, name)
            if (isinstance(cls, type) and issubclass(cls, mixin)
                    and issubclass(cls, unittest.TestCase)):
                for test in loader.loadTestsFromTestCase(cls):
                    if test.id().rsplit(".", 1)[-1] not in EXPECTED_DIFFERENT + CPYTHON_BUGS:
                        suite.addTest(test)
    stream = io.StringIO()
    try:
        result = unittest.TextTestRunner(stream=stream, verbosity=2).run(suite)
    finally:
        mixin.get_context = saved
        ctx.close()
    with capsys.disabled():
        print(f"\nCPython's ProcessPoolExecutor tests with mp_context(): {result.testsRun} run, "
              f"{len(result.skipped)} skipped, {len(result.failures)} failed, "
              f"{len(result.errors)} errors")
        for test, reason in result.skipped:
            print(f"  skipped {test.id()}: {reason}")
        for name in CPYTHON_BUGS:
            print(f"  left out {name}: CPython's deadlock gh-125451 (fixed in 3.12.8, 3.13.1)")
    assert result.testsRun > 20
    assert result.wasSuccessful(), stream.getvalue()
