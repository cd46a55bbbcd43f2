"""External programs (parent side): ``spawn``, ``communicate``, ``run_program``, streams.

A template starts the program (``forkserver/_server/_exec.py``); everything
else -- argument and environment encoding, pipes, waiting, back-pressure --
runs here, in the caller's process.
"""
