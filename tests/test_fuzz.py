"""Protocol fuzzing of a template's command loop (hypothesis).

Random and mutated frames -- wrong kinds, payloads, call ids and fd counts,
pickles that raise, truncated frames, raw garbage -- are written straight to
a template's command socket, behind its ``Template`` object's back.  Then:

* **complete frames**: a probe ``EVAL`` (a call id of our own) must get its
  reply -- a result, or an error -- or the template must exit, within a
  deadline: never a hang.  A frame that does not follow the protocol is never
  executed: no process appears, an ``EVAL`` hidden in it does not run.
* **truncated frames and garbage, then EOF**: the template exits, with
  status 0 and nothing on its stderr (no traceback).
* either way the parent's next call on the ``Template`` returns or raises a
  typed error (a ``ForkserverError``, or the remote error a decodable but bad
  command raised), and nothing leaks (``no_leaks``).
"""
from __future__ import annotations

import os
import pickle
import select
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkserver import ForkserverError, RemoteTraceback, Template
from forkserver import _protocol as P
from forkserver._fds import HEADER, FdChannel

from ._workers import RaisesOnLoad
from .conftest import child_pids

pytestmark = pytest.mark.usefixtures("no_leaks")

W = "tests._workers"
DEADLINE = 20.0
PROBE = 0x5EED_0000_0000_0001  # a call id nobody else uses

KINDS = [P.SETUP, P.REQUIRE, P.EVAL, P.SEND_ARG, P.SEND_FH, P.FORK, P.RUN, P.SPAWN]
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def base():
    with Template().require(W) as tpl:
        yield tpl


class _Fuzzed:
    """A fresh clone of ``base`` whose stderr is a pipe we read (for tracebacks)."""

    def __init__(self) -> None:
        self.err_r, err_w = os.pipe()
        self.tpl = Template(stderr=err_w, spare=False)
        os.close(err_w)
        self.tpl.pid
        self.sock = self.tpl._chan.sock
        self.kids = child_pids()

    def stderr(self) -> bytes:
        out = b""
        while select.select([self.err_r], [], [], 0)[0]:
            chunk = os.read(self.err_r, 65536)
            if not chunk:
                break
            out += chunk
        return out

    def close(self) -> None:
        self.tpl.close()
        os.close(self.err_r)


# -- strategies ----------------------------------------------------------------------


def _valid_body(kind: int, draw) -> bytes:
    if kind == P.EVAL:
        return P.dumps(("import tests._workers as w; w.FUZZ_RAN = True", ()))
    if kind == P.REQUIRE:
        return P.dumps(("json",))
    if kind == P.SEND_ARG:
        return P.dumps([draw(st.integers())])
    if kind == P.SETUP:
        return P.dumps({"cwd": "/", "stdio": []})
    return P.dumps(draw(st.integers()))


@st.composite
def payloads(draw, kind: int) -> bytes:
    """A payload for ``kind``: valid, garbage, mutated, or a pickle that raises."""
    how = draw(st.sampled_from(["valid", "garbage", "mutated", "raising", "empty"]))
    if how == "garbage":
        body = draw(st.binary(max_size=64))
    elif how == "raising":
        body = pickle.dumps(RaisesOnLoad())
    elif how == "empty":
        body = b""
    else:
        body = _valid_body(kind, draw)
        if how == "mutated" and body:
            data = bytearray(body)
            for _ in range(draw(st.integers(1, 4))):
                i = draw(st.integers(0, len(data) - 1))
                data[i] = draw(st.integers(0, 255))
            body = bytes(data[: draw(st.integers(0, len(data)))])
    if kind in P.REPLYING and draw(st.booleans()):
        return P.with_call(draw(st.integers(1, 2**64 - 1)), body)
    return body


@st.composite
def frames(draw):
    """(kind, payload, number of pipe fds attached): well framed, not necessarily well formed."""
    kind = draw(st.one_of(st.sampled_from(KINDS), st.integers(0, 255)))
    return kind, draw(payloads(kind)), draw(st.integers(0, 3))


@st.composite
def torn(draw):
    """Raw bytes: a valid frame cut short, a header lying about its length or fds, garbage."""
    kind, payload, _ = draw(frames())
    how = draw(st.sampled_from(["cut", "long", "fds", "garbage"]))
    if how == "garbage":
        return draw(st.binary(min_size=1, max_size=64))
    if how == "long":
        return HEADER.pack(len(payload) + draw(st.integers(1, 1 << 20)), 0, kind) + payload
    if how == "fds":  # fds announced, none sent: the next byte is not a carrier
        return HEADER.pack(len(payload), draw(st.integers(1, 300)), kind) + payload + b"G"
    whole = HEADER.pack(len(payload), 0, kind) + payload
    return whole[: draw(st.integers(1, len(whole) - 1))] if len(whole) > 1 else whole


# -- the properties ----------------------------------------------------------------------


def _send_frame(fz: _Fuzzed, kind: int, payload: bytes, nfds: int) -> None:
    pipes = [os.pipe() for _ in range(nfds)]
    fds = [r for r, _ in pipes]
    try:
        chan = FdChannel(socket.socket(fileno=os.dup(fz.sock.fileno())))
        chan.sock.setblocking(True)
        try:
            chan.send(kind, payload, fds)
        finally:
            chan.close()
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def _probe(fz: _Fuzzed) -> str:
    """Send an EVAL with our own call id; "reply" or "exited" within the deadline, never a hang."""
    chan = fz.tpl._chan
    try:
        chan.send(P.EVAL, P.with_call(PROBE, P.dumps(("probe = 1", ()))))
    except ForkserverError:
        return "exited"
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            chan.flush()
            frame = chan.receive()
        except ForkserverError:
            return "exited"
        if frame is None:
            select.select([chan], [], [], max(0.0, deadline - time.monotonic()))
            continue
        if frame.kind in P.REPLIES and P.split_call(frame.payload)[0] == PROBE:
            return "reply"
        # a reply to a fuzzed command, a greeting, last words (call id 0): go on
    raise AssertionError("the template neither answered nor exited: it hangs")


def _exited_cleanly(fz: _Fuzzed) -> None:
    pid = fz.tpl._pid
    pidfd = os.pidfd_open(pid)
    try:
        assert select.select([pidfd], [], [], DEADLINE)[0], "the template did not exit"
        info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT)
        assert (info.si_code, info.si_status) == (os.CLD_EXITED, 0), info
    finally:
        os.close(pidfd)


def _typed_next_call(fz: _Fuzzed, source: str = "x = 1") -> None:
    """The parent's next call returns, or raises a typed error."""
    try:
        fz.tpl.eval(source)
    except ForkserverError:
        pass  # broken, closed, or a remote ProtocolError: typed
    except AssertionError:
        raise
    except Exception as exc:
        # a decodable but bad pipelined command answers every later call with
        # its own error (UnpicklingError, a pickle's RuntimeError...), the
        # remote traceback attached
        assert isinstance(exc.__cause__, RemoteTraceback), repr(exc)


@SETTINGS
@given(frame=frames())
def test_a_fuzzed_frame_gets_an_answer_or_a_clean_exit_and_is_never_run_malformed(frame, base):
    kind, payload, nfds = frame
    fz = _Fuzzed()
    try:
        _send_frame(fz, kind, payload, nfds)
        outcome = _probe(fz)
        if outcome == "exited":
            _exited_cleanly(fz)
        assert child_pids() - fz.kids == set(), "a fuzzed frame made a process"
        assert b"Traceback" not in fz.stderr()
        _typed_next_call(fz)
        if outcome == "reply" and not _well_formed_eval(kind, payload, nfds):
            # a malformed EVAL never ran: its code would have set FUZZ_RAN
            _typed_next_call(fz, "import tests._workers as w; assert not getattr(w, 'FUZZ_RAN', False)")
    finally:
        fz.close()


def _well_formed_eval(kind: int, payload: bytes, nfds: int) -> bool:
    if kind != P.EVAL or nfds:
        return False
    try:
        _, body = P.split_call(payload)
        source, args = pickle.loads(body)
        return isinstance(source, str)
    except Exception:
        return False


@SETTINGS
@given(data=torn())
def test_a_torn_frame_then_eof_makes_the_template_exit_cleanly(data, base):
    fz = _Fuzzed()
    try:
        fz.sock.setblocking(True)
        fz.sock.sendall(data)
        fz.sock.shutdown(socket.SHUT_WR)
        _exited_cleanly(fz)
        assert b"Traceback" not in fz.stderr()
        _typed_next_call(fz)
    finally:
        fz.close()


def test_a_frame_of_an_unknown_kind_breaks_the_template_with_a_protocol_error():
    fz = _Fuzzed()
    try:
        _send_frame(fz, 77, b"", 2)
        with pytest.raises(ForkserverError, match="unknown command kind 77"):
            fz.tpl.eval("x = 1")
        assert b"Traceback" not in fz.stderr()
    finally:
        fz.close()


def test_a_fork_without_a_socket_is_refused_and_makes_no_process():
    fz = _Fuzzed()
    try:
        _send_frame(fz, P.FORK, b"", 1)  # a pipe where the clone's socket should be
        with pytest.raises(ForkserverError, match="without a socket"):
            fz.tpl.eval("x = 1")
        assert child_pids() - fz.kids == set()
    finally:
        fz.close()


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames())
def test_many_fuzzed_frames_get_an_answer_or_a_clean_exit(frame, base):
    test_a_fuzzed_frame_gets_an_answer_or_a_clean_exit_and_is_never_run_malformed.hypothesis.inner_test(frame, base)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=torn())
def test_many_torn_frames_make_the_template_exit_cleanly(data, base):
    test_a_torn_frame_then_eof_makes_the_template_exit_cleanly.hypothesis.inner_test(data, base)
