"""The ``forkserver`` console script: ``run`` goes straight to the lean client.

``forkserver run ...`` must start fast: it imports ``_zygote._client`` only
(no argparse, no parser for ``bench``, nothing of the parent side).  Every
other command goes to the full command line of ``python -m forkserver``.
"""
import sys


def main() -> int:
    """Entry point of the ``forkserver`` console script."""
    argv = sys.argv[1:]
    if argv[:1] == ["run"]:
        from ._zygote._client import exit_now, main as run

        exit_now(run(argv[1:]))
    from .__main__ import main as full

    return full(argv)
