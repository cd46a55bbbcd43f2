"""Pools of processes built on templates (parent side, with their worker sides in ``*_worker.py``).

* ``_executor.py`` (with ``_dispatch``, ``_loop``, ``_workers``, ``_map``):
  ``forkserver.Executor``, a ``concurrent.futures`` executor of warm workers
  (``_executor_worker.py`` is its worker loop).
* ``_mp*.py``: ``forkserver.mp_context()``, a ``multiprocessing`` start method
  (``_mp_worker.py`` runs in its templates and children).
"""
