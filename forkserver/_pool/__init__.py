"""Pools of processes built on templates (parent side, with their worker sides in ``*_worker.py``).

* ``_mp*.py``: ``forkserver.mp_context()``, a ``multiprocessing`` start method
  (``_mp_worker.py`` runs in its templates and children).
"""
