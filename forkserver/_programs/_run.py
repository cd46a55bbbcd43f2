"""``run_program``: ``subprocess.run`` for programs started by a template (parent side)."""

from __future__ import annotations

import subprocess
from subprocess import PIPE, CompletedProcess
from typing import Any, Optional

from .._errors import CalledProcessError
from ._spawn import Argv, spawn

__all__ = ["run_program"]


def run_program(
    argv: Argv,
    *,
    input: Any = None,
    capture_output: bool = False,
    check: bool = False,
    timeout: Optional[float] = None,
    **spawn_kwargs: Any,
) -> "CompletedProcess[Any]":
    """Run a program to its end, as ``subprocess.run``; returns a ``CompletedProcess``.

    ``input`` (bytes, or str in text mode) is its stdin; ``capture_output=True``
    pipes stdout and stderr (or pass ``stdout=PIPE`` etc.).  Other keywords
    go to ``spawn``: ``text=True`` (``universal_newlines``, ``encoding``,
    ``errors``) makes ``input`` and the captured output ``str``, as in
    ``subprocess``; also ``executable``, ``bufsize``, ``env``, ``cwd``...

    After ``timeout`` seconds the program is killed and
    ``subprocess.TimeoutExpired`` raised, with ``timeout`` the one given and
    the output read so far (bytes, as ``subprocess`` gives it).  That is
    bounded even when the program left a child of its own holding the pipes
    (``sh -c "sleep 9"``): what the pipes hold is collected without waiting
    for their end.  ``check=True`` raises ``forkserver.CalledProcessError``
    for a non-zero exit.  (Not named ``run``: ``Template.run`` runs a Python
    function.)
    """
    if input is not None:
        if spawn_kwargs.get("stdin") is not None:
            raise ValueError("run_program(): stdin and input exclude each other; pass one")
        spawn_kwargs["stdin"] = PIPE
    if capture_output:
        if spawn_kwargs.get("stdout") is not None or spawn_kwargs.get("stderr") is not None:
            raise ValueError(
                "run_program(): capture_output excludes stdout and stderr; pass one or the other"
            )
        spawn_kwargs["stdout"] = spawn_kwargs["stderr"] = PIPE
    child = spawn(argv, **spawn_kwargs)
    try:
        try:
            out, err = child.communicate(input, timeout)
        except subprocess.TimeoutExpired as exc:
            child.kill()
            child._wait()  # killed: its exit is near, whatever its own children do
            child._comm.drain_ready()
            exc.output, exc.stderr = child._comm.output()
            raise
        except BaseException:
            child.kill()
            child._wait()
            raise
    finally:
        child.close()
    code = child.returncode
    assert code is not None
    if check and code:
        raise CalledProcessError(code, child.args, out, err)
    return CompletedProcess(child.args, code, out, err)
