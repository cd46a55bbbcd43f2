"""Supervision: keep N workers or programs alive (parent side, ``forkserver.Supervisor``).

The public names are re-exported lazily by ``forkserver/__init__.py``; this
package's ``__init__`` stays empty because templates and workers import its
worker-side module ``_member_worker`` (and so this package).
"""
