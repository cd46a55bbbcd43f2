"""What one supervised member is: a worker forked from a template, or a program (parent side).

``start_spec(start)`` checks what the caller gave ``Supervisor()`` or
``reload()`` and returns an object whose ``start()`` makes one new member
and returns its ``Child``.
"""

from __future__ import annotations

import errno
import os
import shutil
from subprocess import PIPE
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from .. import _protocol as P
from .._process import Child
from .._programs._spawn import spawn
from .._template import Template

WRAPPER = "forkserver._supervise._member_worker:serve"
_CHECK = "import forkserver._supervise._member_worker as _m\n_m.check(*args)"
STREAMS = ("stdout", "stderr")


class WorkerStart:
    """Members are fresh forks of ``template`` running ``target(control, *sent)``."""

    kind = "worker"

    def __init__(self, template: Template, target: Any) -> None:
        module, qualname = P.split_target(target, main_ok=template._main_ok)
        # Loads the wrapper and the target's module into the template once
        # (every fork then has both) and raises a wrong target here, with
        # its own type, instead of as a crash loop of members.
        template.eval(_CHECK, module, qualname)
        self.template = template
        self.target = (module, qualname)

    def start(self) -> Child:
        return self.template.fork().send_arg(self.target).run(WRAPPER)

    def __repr__(self) -> str:
        return f"{self.target[0]}:{self.target[1]} on {self.template!r}"


class ProgramStart:
    """Members are runs of the program ``argv`` (``forkserver.spawn``)."""

    kind = "program"

    def __init__(
        self, argv: Sequence[Any], spawn_kwargs: Mapping[str, Any], watch: Optional[str]
    ) -> None:
        self.argv = list(argv)
        self.kwargs: Dict[str, Any] = dict(spawn_kwargs)
        _check_program(self.argv[0], self.kwargs.get("env"), self.kwargs.get("cwd"))
        if watch is not None:
            if self.kwargs.get(watch) is not None:
                raise ValueError(
                    f"Supervisor(): spawn_kwargs[{watch!r}] is taken: the supervisor reads the "
                    f"program's {watch} for progress lines"
                )
            self.kwargs[watch] = PIPE
        self.watch = watch

    def start(self) -> Child:
        return spawn(self.argv, **self.kwargs)

    def output_fd(self, child: Child) -> Optional[int]:
        """The fd of the stream the supervisor watches (non-blocking), or None."""
        if self.watch is None:
            return None
        stream = getattr(child, self.watch)
        fd = stream.fileno()
        os.set_blocking(fd, False)
        return fd

    def __repr__(self) -> str:
        return f"program {self.argv!r}"


def _check_program(program: Any, env: Optional[Mapping[str, str]], cwd: Any) -> None:
    """Raise FileNotFoundError now for a program that cannot be found (not a crash loop later)."""
    name = os.fsdecode(program)
    if "/" in name:
        path = os.path.join(os.fsdecode(cwd) if cwd is not None else os.getcwd(), name)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, f"Supervisor(): no program {name!r}", name)
        return
    search = (env if env is not None else os.environ).get("PATH", os.defpath)
    if shutil.which(name, path=search) is None:
        raise FileNotFoundError(errno.ENOENT, f"Supervisor(): no program {name!r} on PATH", name)


def start_spec(
    start: Any,
    *,
    progress: Optional[Callable[[str], Any]],
    stale_timeout: Optional[float],
    output: str,
    spawn_kwargs: Optional[Mapping[str, Any]],
    what: str = "Supervisor",
) -> Any:
    """A ``WorkerStart`` for ``(template, target)``, a ``ProgramStart`` for an argv list."""
    if isinstance(start, tuple) and len(start) == 2 and isinstance(start[0], Template):
        if spawn_kwargs:
            raise TypeError(
                f"{what}(): spawn_kwargs apply to programs (an argv), not to template workers"
            )
        if progress is not None:
            raise TypeError(
                f"{what}(): progress= parses a program's output lines; a worker calls "
                "forkserver.worker.heartbeat() instead"
            )
        return WorkerStart(start[0], start[1])
    if isinstance(start, Template):
        raise TypeError(
            f"{what}({start!r}): say what the members run: (template, 'module:function')"
        )
    if isinstance(start, (str, bytes, os.PathLike)):
        raise TypeError(
            f"{what}({start!r}): a program is a list, e.g. {str(start).split()!r} "
            "(no shell), and a worker is (template, 'module:function')"
        )
    if isinstance(start, (list, tuple)) and start and not isinstance(start[0], Template):
        if output not in STREAMS:
            raise ValueError(f"{what}(output={output!r}): 'stdout' or 'stderr'")
        watch = output if (progress is not None or stale_timeout is not None) else None
        return ProgramStart(start, spawn_kwargs or {}, watch)
    raise TypeError(
        f"{what}({start!r}): expected (template, 'module:function') for workers "
        "or an argv list for a program"
    )
