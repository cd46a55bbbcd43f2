"""asyncio support: await templates and children without blocking the event loop.

In a coroutine::

    import forkserver.aio as aio

    tpl = await aio.require(forkserver.Template(), "mymod")
    async with await aio.run(tpl.fork(), "mymod:work", check=True) as child:
        ...                                   # the block ends: await its exit
    code = child.returncode

    child = await aio.spawn(["convert", "in.png", "out.jpg"])   # an AsyncChild
    async for chunk in aio.stream(["gzip", "-c"], input=data):   # back-pressured
        ...

Waiting uses no threads: a child's exit is awaited on its pidfd, template
replies on their socket or reply pipe, and stream pipes, all with
``loop.add_reader``/``add_writer``.  ``Template()`` and ``fork()`` themselves
do not wait on anything long and stay synchronous.  Use one template either
from coroutines or from threads, not both at once.
"""
from ._async import AsyncChild, eval, require, run, wait
from ._programs._astream import AsyncStream, spawn, stream

__all__ = ["require", "eval", "run", "wait", "spawn", "stream", "AsyncChild", "AsyncStream"]
