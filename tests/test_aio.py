"""forkserver.aio: awaiting templates and children on the default event loop."""
from __future__ import annotations

import asyncio
import subprocess

import pytest

import forkserver.aio as aio
from forkserver import Template

pytestmark = pytest.mark.usefixtures("no_leaks")

W = "tests._workers"


def test_200_children_awaited_concurrently_while_the_loop_keeps_ticking():
    async def main():
        with Template() as tpl:
            await aio.require(tpl, W)
            ticks = 0
            stop = asyncio.Event()

            async def ticker():
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0.001)

            tick_task = asyncio.ensure_future(ticker())
            children = [await aio.run(tpl.fork().send_arg(i % 5), f"{W}:exit_with") for i in range(200)]
            ticks_before_wait = ticks
            codes = await asyncio.wait_for(asyncio.gather(*(c.wait() for c in children)), 60)
            stop.set()
            await tick_task
            for c in children:
                c.control.close()
            return codes, ticks, ticks_before_wait

    codes, ticks, before = asyncio.run(main())
    assert codes == [i % 5 for i in range(200)]
    assert ticks > before, "the event loop was blocked while children were awaited"


def test_async_require_and_eval_raise_remote_errors_and_return_the_template():
    async def main():
        with Template() as tpl:
            assert await aio.eval(tpl, "X = args[0] * 2", 21) is tpl
            with pytest.raises(ImportError):
                await aio.require(tpl, "no_such_module_for_aio")
            with pytest.raises(ZeroDivisionError):
                await aio.eval(tpl, "1/0")
            await aio.require(tpl, W)
            child = await aio.run(tpl.fork(), f"{W}:return_quietly")
            assert await child.wait(20) == 0
            child.control.close()

    asyncio.run(main())


def test_async_with_waits_on_success_checks_and_stops_on_error():
    async def main():
        with Template().require(W) as tpl:
            async with await aio.run(tpl.fork(), f"{W}:return_quietly", check=True) as ok:
                pass
            assert ok.returncode == 0
            with pytest.raises(subprocess.CalledProcessError):
                async with await aio.run(tpl.fork().send_arg(4), f"{W}:exit_with", check=True):
                    pass
            with pytest.raises(KeyError):
                async with await aio.run(tpl.fork(), f"{W}:ready_then_wait") as child:
                    child.control.setblocking(True)
                    assert child.control.recv(1) == b"r"
                    raise KeyError("x")
            assert child.returncode == -15
            late = await aio.run(tpl.fork(), f"{W}:ready_then_wait")
            with pytest.raises(subprocess.TimeoutExpired):
                await late.wait(0.05)
            late.control.setblocking(True)
            assert late.control.recv(1) == b"r"
            late.control.close()  # EOF: the worker ends
            assert await late.wait(20) == 0

    asyncio.run(main())


def test_run_of_a_fork_waits_for_a_big_queued_send_arg_without_blocking_the_loop():
    import os
    import signal

    from ._workers import recv_obj

    async def main():
        with Template().require(W) as tpl:
            os.kill(tpl.pid, signal.SIGSTOP)  # it reads nothing: 16 MiB stay queued here
            try:
                tpl.send_arg(b"x" * (16 << 20))

                async def resume():  # runs only if aio.run leaves the loop free
                    os.kill(tpl.pid, signal.SIGCONT)

                resumer = asyncio.ensure_future(resume())
                # Awaited directly, so it starts before the resumer can run.
                child = await aio.run(tpl.fork(), f"{W}:arg_sizes")
                await resumer
            finally:
                os.kill(tpl.pid, signal.SIGCONT)
            child.control.setblocking(True)
            child.control.settimeout(20)
            sizes = recv_obj(child.control)
            code = await child.wait(20)
            child.control.close()
            return sizes, code

    assert asyncio.run(main()) == ([16 << 20], 0)
