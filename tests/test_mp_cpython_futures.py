"""CPython's own ProcessPoolExecutor tests, run with forkserver.mp_context().

Where the interpreter ships its test suite (``test.test_concurrent_futures``:
a package in 3.12+, one module before; some builds leave it out, then this
is skipped), every class built for the ``forkserver`` start method --
``ProcessPoolForkserver*`` -- runs with its mixin's ``get_context()``
answering our context instead.  Nothing is copied: the tests are loaded
from the standard library and run as they are.

Known differences, skipped by name (``EXPECTED_DIFFERENT``): none so far.
"""
from __future__ import annotations

import importlib
import io
import unittest
from typing import List

import pytest

import forkserver

PACKAGE_MODULES = ["executor", "test_process_pool", "test_init", "test_shutdown",
                   "test_deadlock", "test_wait", "test_as_completed"]
EXPECTED_DIFFERENT: List[str] = []


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
                    if test.id().rsplit(".", 1)[-1] not in EXPECTED_DIFFERENT:
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
    assert result.testsRun > 20
    assert result.wasSuccessful(), stream.getvalue()
