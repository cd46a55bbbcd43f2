"""Run the ```python blocks of one Markdown page, in order, like the cells of a notebook.

    python tests/_snippet_runner.py PAGE.md

Run by tests/test_snippets.py in a fresh interpreter whose working directory
is a temporary copy of tests/snippets/ (the stand-in modules the snippets
import).  The blocks share one ``__main__`` namespace; each is compiled with
the page's name and its own line numbers, so a traceback points into the page.
Exit status: 0 when every block ran and the page left no process running,
1 when a block raised, 2 when a process was left behind.
"""
from __future__ import annotations

import atexit
import os
import sys
import traceback
import types


def _left_running() -> None:
    """At the very end (registered first, so it runs after forkserver's own exit
    handler has ended its templates): fail if a process the page started still runs."""
    import psutil

    me = psutil.Process()
    kids = [p for p in me.children() if _alive(p) and not _resource_tracker(p)]
    if not kids:
        return
    _, alive = psutil.wait_procs(kids, timeout=2)  # a worker may be on its way out
    if alive:
        names = ", ".join(f"{p.pid} {p.cmdline()!r}" for p in alive if _alive(p))
        print(f"snippets: the page left processes running: {names}; wait for them or stop "
              "them in the snippet", file=sys.stderr)
        for p in alive:
            p.kill()
        sys.stderr.flush()
        os._exit(2)


def _resource_tracker(proc) -> bool:
    """multiprocessing's resource tracker: started by any page that uses a multiprocessing
    context, it is meant to outlive the pages' code and exits when this process does."""
    import psutil

    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(page: str) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from _snippets import parse

    sys.path.remove(here)
    # As for `python script.py` run from the stand-ins' directory: the working
    # directory first on sys.path (templates adopt sys.path, so they see it too).
    sys.path[0] = os.getcwd()
    blocks, _ = parse(__import__("pathlib").Path(page))
    atexit.register(_left_running)
    main_module = types.ModuleType("__main__")
    main_module.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main_module
    for block in blocks:
        if block.file is not None:  # a module the page has the reader save
            os.makedirs(os.path.dirname(block.file) or ".", exist_ok=True)
            with open(block.file, "w") as f:
                f.write(block.code)
            continue
        if block.skip is not None:
            continue
        code = compile("\n" * (block.line - 1) + block.code, page, "exec")
        try:
            exec(code, main_module.__dict__)
        except BaseException:
            print(f"snippets: the block at {page}:{block.line} raised:", file=sys.stderr)
            traceback.print_exc()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
