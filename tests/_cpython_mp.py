"""CPython's own multiprocessing tests, installed here so that children can import their classes.

``test._test_multiprocessing.install_tests_in_module_dict`` builds the test
classes (``WithProcessesTestQueue``...) into a module's globals; their
targets are methods of those classes, pickled by name, so that module must
be importable in every child: this one (``test_mp_cpython_multiprocessing.py``
runs them).  Empty when the interpreter's test suite is not installed.
"""
try:
    import test._test_multiprocessing as _cpython
except ImportError:  # pragma: no cover - a Python built without its tests
    _cpython = None
else:
    _cpython.install_tests_in_module_dict(globals(), "forkserver")
