"""Pools of workers (parent side), and their worker loops (the ``*_worker.py`` modules).

``_executor.py``: ``forkserver.Executor``, a ``concurrent.futures`` executor of warm workers.
"""
