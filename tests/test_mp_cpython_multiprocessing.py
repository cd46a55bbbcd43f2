"""CPython's own ``Lib/test/_test_multiprocessing.py``, run with forkserver.mp_context().

The ``processes`` flavour of every test class (``WithProcesses*``), loaded
from the interpreter's own test suite (``tests/_cpython_mp.py`` installs the
classes) and run as they are, with our context made the default context
(``multiprocessing.Process``, ``multiprocessing.Queue``... are the default
context's, which the classes use).  Nothing is copied.  Skipped where the
interpreter ships no test suite.

By default a subset runs (``QUICK``: the classes that start processes but do
not sleep); ``-m slow`` runs them all (about 40 s here).
``test_mp_stdlib.py`` has our own adaptation of the same parts.
"""
from __future__ import annotations

import io
import multiprocessing
import unittest

import pytest

import forkserver

from . import _cpython_mp

QUICK = ["WithProcessesTestQueue", "WithProcessesTestLock", "WithProcessesTestSemaphore",
         "WithProcessesTestEvent", "WithProcessesTestValue", "WithProcessesTestArray",
         "WithProcessesTestConnection", "WithProcessesTestPool",
         "WithProcessesTestSubclassingProcess"]


def _run(names=None):
    if _cpython_mp._cpython is None:
        pytest.skip("this Python has no test._test_multiprocessing "
                    "(its test suite is not installed)")
    ns = vars(_cpython_mp)
    classes = {name: cls for name, cls in ns.items()
               if name.startswith("WithProcesses") and isinstance(cls, type)
               and issubclass(cls, unittest.TestCase)}
    loader = unittest.TestLoader()
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(classes[name])
                               for name in sorted(classes) if names is None or name in names)
    ns["setUpModule"]()  # sets the standard forkserver as the start method ...
    ctx = forkserver.mp_context(preload=[_cpython_mp.__name__])
    multiprocessing.context._default_context._actual_context = ctx  # ... then ours instead
    stream = io.StringIO()
    try:
        result = unittest.TextTestRunner(stream=stream, verbosity=2).run(suite)
    finally:
        ctx.close()
        ns["tearDownModule"]()  # restores the start method, stops the tracker and server
    return result, stream.getvalue()


def _check(result, output, capsys):
    with capsys.disabled():
        print(f"\nCPython's _test_multiprocessing with mp_context(): {result.testsRun} run, "
              f"{len(result.skipped)} skipped, {len(result.failures)} failed, "
              f"{len(result.errors)} errors")
        for test, reason in result.skipped:
            print(f"  skipped {test.id()}: {reason}")
    assert result.wasSuccessful(), output


@pytest.mark.timeout(600, method="thread")  # CPython's runner would swallow a signal timeout
def test_cpythons_multiprocessing_tests_pass_with_our_context(capsys):
    result, output = _run(QUICK)
    assert result.testsRun > 50
    _check(result, output, capsys)


@pytest.mark.slow
@pytest.mark.timeout(1800, method="thread")
def test_all_of_cpythons_processes_tests_pass_with_our_context(capsys):
    result, output = _run()
    assert result.testsRun > 100
    _check(result, output, capsys)
