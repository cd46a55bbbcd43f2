"""forkserver.stream and forkserver.aio.stream: back-pressured program output."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import itertools
import os
import signal
import subprocess
import time

import psutil
import pytest

import forkserver
import forkserver.aio as aio

pytestmark = pytest.mark.usefixtures("no_leaks")

MIB = 1 << 20


def collect(s) -> bytes:
    return b"".join(s)


def written_by(pid: int) -> int:
    """Bytes the process has written so far (its write syscalls, /proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])


# -- output, input, stdin closing ---------------------------------------------------------


def test_chunks_are_the_programs_stdout_and_the_exit_is_awaited():
    s = forkserver.stream(["sh", "-c", "echo one; echo two"])
    assert collect(s) == b"one\ntwo\n"
    assert s.returncode == 0
    assert list(s) == []  # exhausted


def test_chunk_size_bounds_every_chunk():
    chunks = list(forkserver.stream(["head", "-c", "100000", "/dev/zero"], chunk_size=1000))
    assert sum(map(len, chunks)) == 100000 and max(map(len, chunks)) <= 1000


@pytest.mark.parametrize("kind", ["bytes", "iterable", "file", "generator"])
def test_base64_gets_its_input_then_eof_and_flushes(kind):
    data = os.urandom(300_000)
    source = {
        "bytes": data,
        "iterable": [data[i : i + 7000] for i in range(0, len(data), 7000)],
        "file": io.BytesIO(data),
        "generator": (data[i : i + 65536] for i in range(0, len(data), 65536)),
    }[kind]
    out = collect(forkserver.stream(["base64", "-w", "0"], input=source))
    assert base64.b64decode(out) == data  # the last block is flushed only on EOF


def test_no_input_means_dev_null_and_empty_chunks_are_skipped():
    assert collect(forkserver.stream(["cat"])) == b""
    assert collect(forkserver.stream(["cat"], input=[b"", b"a", b"", b"b"])) == b"ab"


def test_a_program_that_stops_reading_its_input_is_not_an_error():
    endless = itertools.repeat(b"x" * 65536)  # EPIPE once head exits: tolerated
    s = forkserver.stream(["head", "-c", "10"], input=endless)
    assert collect(s) == b"x" * 10
    assert s.returncode == 0


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="encode"):
        forkserver.stream(["cat"], input="text")
    s = forkserver.stream(["cat"], input=[b"ok", "text"])
    with pytest.raises(TypeError, match="chunks must be bytes"):
        collect(s)
    assert s.returncode is not None  # stopped and reaped


def test_an_exec_failure_raises_at_the_call():
    with pytest.raises(FileNotFoundError):
        forkserver.stream(["no-such-program-forkserver"])


def test_env_and_cwd_are_passed_on(tmp_path):
    out = collect(
        forkserver.stream(
            ["sh", "-c", 'echo "$X"; pwd'], env={"X": "y", "PATH": os.defpath}, cwd=tmp_path
        )
    )
    assert out.decode().split() == ["y", str(tmp_path)]


# -- back-pressure -------------------------------------------------------------------------


def test_a_fast_producer_waits_for_a_slow_consumer_and_memory_stays_flat():
    me = psutil.Process()
    s = forkserver.stream(["head", "-c", str(8 << 30), "/dev/zero"])  # 8 GiB, never finished
    consumed = 0
    rss_before = None
    for i, chunk in enumerate(s):
        consumed += len(chunk)
        if i == 20:
            rss_before = me.memory_info().rss
        if i >= 400:
            break
        time.sleep(0.002)  # the slow consumer (not synchronisation)
    # What the producer managed to write is what we read plus what the pipe holds.
    assert written_by(s.pid) - consumed <= 2 * MIB
    assert me.memory_info().rss - rss_before < 4 * MIB
    s.close()
    assert s.returncode == -signal.SIGPIPE


@pytest.mark.slow
def test_reading_4_gib_at_full_speed_keeps_memory_flat():
    me = psutil.Process()
    rss_before = me.memory_info().rss
    peak = 0
    total = 0
    for i, chunk in enumerate(forkserver.stream(["head", "-c", str(4 << 30), "/dev/zero"])):
        total += len(chunk)
        if i % 1024 == 0:
            peak = max(peak, me.memory_info().rss - rss_before)
    assert total == 4 << 30
    assert peak < 4 * MIB


# -- stopping early, the exit -------------------------------------------------------------


@pytest.mark.parametrize("how", ["break", "exception", "close", "with"])
def test_stopping_early_stops_and_reaps_the_program(how):
    s = forkserver.stream(["yes"])
    pid = s.pid
    if how == "break":
        for _ in s:
            break
        del s  # the loop's iterator dropped: stopped like a generator's finally
        gc.collect()
    elif how == "exception":
        with pytest.raises(RuntimeError):
            with s:
                for _ in s:
                    raise RuntimeError("consumer failed")
        assert s.returncode == -signal.SIGPIPE
    elif how == "close":
        next(s)
        s.close()
        s.close()  # idempotent
        assert s.returncode == -signal.SIGPIPE
    else:
        with s:
            next(s)
        assert s.returncode == -signal.SIGPIPE
    assert pid not in {p.pid for p in psutil.Process().children()}  # reaped, not a zombie


def test_a_program_that_ignores_its_closed_pipes_gets_the_stop_ladder():
    s = forkserver.stream(["sh", "-c", "echo started; exec sleep 30"])
    assert next(s) == b"started\n"
    t0 = time.monotonic()
    s.close()  # sleep writes nothing: no SIGPIPE; CLOSE_GRACE, then SIGTERM
    assert s.returncode == -signal.SIGTERM
    assert time.monotonic() - t0 < 10


def test_a_program_about_to_exit_0_after_its_last_chunk_is_never_terminated():
    # typed-process's race: it closed stdout and exits 0 a moment later.
    script = "echo last; exec >&-; sleep 0.3; exit 0"
    s = forkserver.stream(["sh", "-c", script])
    assert next(s) == b"last\n"
    s.close()  # the consumer stops after the last chunk, before seeing the end
    assert s.returncode == 0
    s = forkserver.stream(["sh", "-c", script])
    assert collect(s) == b"last\n" and s.returncode == 0


def test_a_non_zero_exit_raises_with_the_returncode_and_piped_stderr():
    s = forkserver.stream(["sh", "-c", "echo partial; echo why >&2; exit 3"], stderr="pipe")
    got = []
    with pytest.raises(forkserver.CalledProcessError) as info:
        for chunk in s:
            got.append(chunk)
    assert got == [b"partial\n"]
    assert (info.value.returncode, info.value.stderr, s.stderr) == (3, b"why\n", b"why\n")
    assert isinstance(info.value, subprocess.CalledProcessError)


def test_a_program_killed_by_a_signal_raises_with_a_negative_returncode():
    with pytest.raises(forkserver.CalledProcessError) as info:
        collect(forkserver.stream(["sh", "-c", "echo x; kill -9 $$"]))
    assert info.value.returncode == -signal.SIGKILL


def test_timeout_bounds_each_wait_for_the_program_then_stops_it():
    s = forkserver.stream(["sleep", "30"], timeout=0.3)
    with pytest.raises(subprocess.TimeoutExpired):
        next(s)
    assert s.returncode == -signal.SIGTERM


# -- stderr modes ---------------------------------------------------------------------------


SCRIPT = "echo out; echo err >&2"


def test_stderr_inherit_goes_to_the_callers_stderr(capfd):
    assert collect(forkserver.stream(["sh", "-c", SCRIPT])) == b"out\n"
    assert capfd.readouterr().err == "err\n"


def test_stderr_stdout_merges_it_into_the_chunks():
    assert collect(forkserver.stream(["sh", "-c", SCRIPT], stderr="stdout")) == b"out\nerr\n"


def test_stderr_discard_drops_it(capfd):
    assert collect(forkserver.stream(["sh", "-c", SCRIPT], stderr="discard")) == b"out\n"
    assert capfd.readouterr().err == ""


def test_stderr_pipe_is_drained_so_a_chatty_program_never_blocks_on_it():
    script = "head -c 3000000 /dev/zero >&2; echo out"  # 3 MB: far more than a pipe holds
    s = forkserver.stream(["sh", "-c", script], stderr="pipe", timeout=30)
    assert collect(s) == b"out\n"
    assert len(s.stderr) == 3000000


def test_an_unknown_stderr_mode_is_refused():
    with pytest.raises(ValueError, match="pipe"):
        forkserver.stream(["true"], stderr="capture")


# -- asyncio --------------------------------------------------------------------------------


def test_async_stream_reads_chunks_feeds_async_input_and_awaits_the_exit():
    async def source():
        for i in range(50):
            yield bytes([65 + i % 26]) * 10000
            await asyncio.sleep(0)

    async def main():
        s = aio.stream(["base64", "-w", "0"], input=source())
        out = b"".join([chunk async for chunk in s])
        return out, s.returncode

    out, code = asyncio.run(asyncio.wait_for(main(), 60))
    assert code == 0
    assert base64.b64decode(out) == b"".join(bytes([65 + i % 26]) * 10000 for i in range(50))


def test_async_stream_keeps_the_loop_free_while_the_program_is_slow():
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(ticker())
        out = [c async for c in aio.stream(["sh", "-c", "sleep 0.5; echo late"])]
        task.cancel()
        return out, ticks

    out, ticks = asyncio.run(asyncio.wait_for(main(), 60))
    assert out == [b"late\n"] and ticks >= 10


def test_async_stream_errors_early_stop_and_stderr_pipe():
    async def main():
        s = aio.stream(["sh", "-c", "echo x; echo why >&2; exit 5"], stderr="pipe")
        with pytest.raises(forkserver.CalledProcessError) as info:
            async for _ in s:
                pass
        assert (info.value.returncode, s.stderr) == (5, b"why\n")
        async with aio.stream(["yes"]) as y:
            async for _ in y:
                break
        assert y.returncode == -signal.SIGPIPE
        t = aio.stream(["sleep", "30"], timeout=0.3)
        with pytest.raises(subprocess.TimeoutExpired):
            async for _ in t:
                pass
        assert t.returncode == -signal.SIGTERM
        with pytest.raises(FileNotFoundError):
            async for _ in aio.stream(["no-such-program-forkserver"]):
                pass

    asyncio.run(asyncio.wait_for(main(), 60))


def test_async_back_pressure_bounds_what_the_producer_writes():
    async def main():
        s = aio.stream(["head", "-c", str(8 << 30), "/dev/zero"])
        consumed = 0
        async with s:
            async for chunk in s:
                consumed += len(chunk)
                if consumed > 20 * MIB:
                    break
                await asyncio.sleep(0.0005)
            return written_by(s.pid) - consumed

    assert asyncio.run(asyncio.wait_for(main(), 60)) <= 2 * MIB


def test_aio_spawn_returns_an_awaitable_child():
    async def main():
        child = await aio.spawn(["sh", "-c", "exit 7"])
        return await child.wait(20)

    assert asyncio.run(main()) == 7


def test_cancelling_an_async_stream_stops_and_reaps_the_program():
    async def main():
        s = aio.stream(["sh", "-c", "echo started; exec sleep 30"])
        first = asyncio.Event()

        async def consume():
            async for _ in s:
                first.set()  # then waits in __anext__ for output that never comes

        task = asyncio.ensure_future(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return s.returncode

    assert asyncio.run(asyncio.wait_for(main(), 60)) == -signal.SIGTERM
