"""The zygote for scripts: ``forkserver serve`` / ``forkserver run`` (docs/zygote.md).

* ``_wire.py``    the socket's records, the per-user directory, the zygote's key
                  (shared by the client and the daemon; stdlib C modules only)
* ``_client.py``  ``forkserver run``: lean, runnable without this package
                  (``python -IS``); forwards signals, reports the exit status
* ``_serve.py``   ``forkserver serve``: start (or become) the daemon, safely
* ``_daemon.py``  the daemon's event loop: connections, runs, reaping
* ``_zygotes.py`` the daemon's templates: preloading, staleness, which one a run uses
* ``_child.py``   runs INSIDE the template and the forked run (stdio, signals, runpy)
* ``_cli.py``     the ``serve``/``status``/``stop``/``launcher`` subcommands
"""
