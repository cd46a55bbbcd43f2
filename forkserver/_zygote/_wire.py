"""The zygote's socket: its records, its per-user directory, its key (client and daemon).

Stdlib C modules only (``posix``, ``_socket``), no ``os``: the client runs
this under ``python -IS``, where even ``import os`` costs a millisecond.  It
is importable as ``forkserver._zygote._wire`` and, for the launcher, as a
top-level ``_wire`` (``_client.py`` picks whichever works).

**Records.**  Both directions carry *records*: one tag byte, a 4-byte
little-endian length, the data.  No pickle ever crosses this socket: the
daemon checks its peer's uid before it reads a byte, and what it reads is
parsed as plain bytes.  A request is ``MAGIC``, then records, then ``END``;
the client sends it with one ``sendmsg`` whose SCM_RIGHTS carry its stdio
fds and the write end of its status pipe.

**Directory.**  ``$FORKSERVER_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/forkserver``,
else ``/tmp/forkserver-$UID``: created mode 0700 and refused unless it is a
real directory (not a symlink) owned by us with no group or other access.
Sockets live there under their key's name, never in the abstract namespace
(anyone on the host can connect to an abstract socket: CVE-2022-42919).

**Key.**  One zygote per interpreter (directory, version), forkserver version,
preload set and the environment variables the interpreter or a preloaded
library reads at start-up (``PYTHON*``, ``LC_*``, ``LANG``, the thread-pool
limits): a run never gets a zygote started under a different one.
"""
import _socket
import posix
import sys

PROTOCOL = 1
MAGIC = b"FSZ" + bytes([PROTOCOL])
VERSION = "0.1.0.dev0"  # forkserver.__version__ (tests/test_zygote_wire.py checks they agree)
MAX_REQUEST = 16 << 20  # bytes: a request larger than this is refused
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL
# forkserver._protocol.THREAD_LIMIT_VARS (checked by the same test)
THREAD_LIMIT_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")

# client -> daemon
KEY = b"K"  # the identity string (see key())
PRELOAD = b"L"  # the modules the run wants preloaded, comma-separated
OP = b"O"  # b"run", b"status" or b"stop"
MODE = b"M"  # b"path" (a script, a directory, a zip), b"module" (-m) or b"code" (-c)
TARGET = b"T"  # the path, module name or code
ARG = b"A"  # one of the script's arguments (repeated)
ENV = b"E"  # one b"NAME=value" (repeated)
CWD = b"C"
UMASK = b"U"  # octal digits
IGNORED = b"I"  # comma-separated signal numbers ignored where the client started
STDIO = b"F"  # which of 0, 1, 2 the first SCM_RIGHTS fds are (b"012"); the status pipe follows
DETACH = b"D"
END = b"."
SIGNAL = b"S"  # after the request: forward this signal number to the run's process group

# daemon -> client
STARTED = b"P"  # the run's pid; SCM_RIGHTS: a pidfd of it
EXITED = b"X"  # b"c<code>" or b"s<signal number>"
FALLBACK = b"N"  # why this run cannot use the zygote: run plain python, say why in one line
REPLACE = b"R"  # this zygote is not the one the client needs (it retires): start a new one
INFO = b"J"  # a status reply: JSON text
STOPPING = b"Z"  # a stop reply: JSON text


Timeout = _socket.timeout  # a socket's timeout error (TimeoutError from Python 3.10 on)


class Unusable(Exception):
    """This zygote socket, or its directory, cannot be used (the message says why)."""


def fsencode(text):
    """``os.fsencode`` without ``os``."""
    if isinstance(text, bytes):
        return text
    return text.encode(sys.getfilesystemencoding(), "surrogateescape")


def fsdecode(data):
    """``os.fsdecode`` without ``os``."""
    return data.decode(sys.getfilesystemencoding(), "surrogateescape")


# -- records ---------------------------------------------------------------------


def record(tag, data=b""):
    """One record: tag byte, 4-byte little-endian length, data."""
    return tag + len(data).to_bytes(4, "little") + data


def parse_records(buf, start=0):
    """The complete records in ``buf[start:]`` and the offset after the last one."""
    out = []
    while len(buf) - start >= 5:
        size = int.from_bytes(buf[start + 1:start + 5], "little")
        if len(buf) - start - 5 < size:
            break
        out.append((bytes(buf[start:start + 1]), bytes(buf[start + 5:start + 5 + size])))
        start += 5 + size
    return out, start


FD_SPACE = _socket.CMSG_SPACE(8 * 4)  # room for up to 8 fds in one message


def recv_some(sock, size, fds):
    """Up to ``size`` bytes; any fds that came with them are appended to ``fds``.

    Every read on a zygote socket goes through here: a plain ``recv`` would
    drop (close) fds riding on the bytes it reads.  fds arrive close-on-exec.
    """
    data, ancdata, flags, _ = sock.recvmsg(size, FD_SPACE, _socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True)
                       for i in range(0, usable, 4))
    if flags & getattr(_socket, "MSG_CTRUNC", 8):
        raise Unusable("more file descriptors arrived than a zygote message carries")
    return data


class RecordReader:
    """Blocking reads of whole records from ``sock`` (the client's side)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.fds = []

    def next(self):
        """The next (tag, data), or None at EOF.  fds received meanwhile are in ``fds``."""
        while True:
            records, used = parse_records(self.buf)
            if records:
                self.buf = self.buf[5 + len(records[0][1]):]
                return records[0]
            chunk = recv_some(self.sock, 65536, self.fds)
            if not chunk:
                return None
            self.buf += chunk


def send_fds(sock, data, fds):
    """Send ``data`` with ``fds`` (SCM_RIGHTS) riding on its first bytes; all of it."""
    payload = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
    anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, payload)] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED: fixed at connect/listen)."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return tuple(int.from_bytes(raw[i:i + 4], sys.byteorder) for i in (0, 4, 8))


# -- the directory and the key -----------------------------------------------------


def runtime_dir(environ=None):
    """The per-user socket directory (bytes), created and checked (see the module docs).

    An ``$XDG_RUNTIME_DIR`` that is missing or not ours (``sudo`` keeps the
    invoking user's) is passed over for ``/tmp/forkserver-$UID``.
    """
    env = posix.environ if environ is None else environ
    path = env.get(b"FORKSERVER_RUNTIME_DIR")
    if path:
        ensure_private_dir(path)
        return path
    xdg = env.get(b"XDG_RUNTIME_DIR", b"")
    try:
        if not xdg.startswith(b"/"):
            raise Unusable("no absolute $XDG_RUNTIME_DIR")
        ensure_private_dir(xdg, create=False, strict=False)
    except Unusable:
        path = b"/tmp/forkserver-%d" % posix.geteuid()
    else:
        path = xdg.rstrip(b"/") + b"/forkserver"
    ensure_private_dir(path)
    return path


def ensure_private_dir(path, create=True, strict=True):
    """Make sure ``path`` is a directory of ours that nobody else can enter.

    ``strict=False`` only checks it is a real directory we own (for
    ``$XDG_RUNTIME_DIR`` itself, which the system makes).
    """
    if create:
        try:
            posix.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise Unusable(f"cannot create the zygote directory {fsdecode(path)}: {exc}") from None
    try:
        st = posix.lstat(path)
    except OSError as exc:
        raise Unusable(f"zygote directory {fsdecode(path)}: {exc}") from None
    shown = fsdecode(path)
    if st.st_mode & 0o170000 != 0o040000:
        raise Unusable(f"{shown} is not a directory (a symlink or a file?); remove it, "
                       "or set FORKSERVER_RUNTIME_DIR to a directory of yours")
    if st.st_uid != posix.geteuid():
        raise Unusable(f"{shown} belongs to uid {st.st_uid}, not to you (uid {posix.geteuid()}): "
                       "someone else made it; remove it or set FORKSERVER_RUNTIME_DIR")
    if strict and st.st_mode & 0o077:
        raise Unusable(f"{shown} has mode {st.st_mode & 0o777:#o}: others could reach the "
                       f"zygote's socket; chmod 700 it, or set FORKSERVER_RUNTIME_DIR")


def env_key(environ):
    """The start-up-relevant part of an environment (bytes -> bytes), as one string."""
    keep = []
    limits = {name.encode() for name in THREAD_LIMIT_VARS}
    for name, value in environ.items():
        if name.startswith(b"PYTHON") or name.startswith(b"LC_") or name == b"LANG" or name in limits:
            keep.append(name + b"=" + value)
    keep.sort()
    return b"\0".join(keep)


def identity(environ):
    """Everything a zygote must share with a client, but the preload set (bytes).

    The interpreter is named by its directory and version: ``bin/python``
    and ``bin/python3`` of one virtualenv are the same one, two virtualenvs
    are not.  (Not ``sys.prefix``: before 3.11, ``site`` sets it for a
    virtualenv, and the launcher runs without ``site``.)
    """
    exe = sys.executable
    parts = [str(PROTOCOL), VERSION, exe[:exe.rfind("/") + 1], sys.version]
    return fsencode("\n".join(parts)) + b"\n" + env_key(environ)


def split_preload(text):
    """The module names of a ``--preload`` list: in order, without blanks or repeats."""
    names = []
    for name in text.split(","):
        name = name.strip()
        if name and name not in names:
            names.append(name)
    return names


def zygote_name(ident, preload):
    """The file name stem of a zygote: FNV-1a (64 bit) of its identity and preload set."""
    h = 0xCBF29CE484222325
    for byte in ident + b"\n" + ",".join(sorted(preload)).encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return b"zygote-%016x" % h


def address(path):
    """(address to bind/connect, fd to close after) for socket ``path`` (bytes).

    A path longer than ``sun_path`` is reached through ``/proc/self/fd/N/name``,
    N an ``O_PATH`` descriptor of its directory; a file name that is itself
    too long raises ``Unusable``.
    """
    if len(path) <= SUN_PATH_MAX:
        return path, None
    directory, _, name = path.rpartition(b"/")
    fd = posix.open(directory or b"/", posix.O_PATH | posix.O_DIRECTORY | posix.O_CLOEXEC)
    short = b"/proc/self/fd/%d/%s" % (fd, name)
    if len(short) > SUN_PATH_MAX:
        posix.close(fd)
        raise Unusable(f"socket name {fsdecode(name)!r} is too long for a unix socket "
                       f"(at most {SUN_PATH_MAX - 20} bytes); choose a shorter --socket")
    return short, fd


def connect(path):
    """A socket connected to the zygote at ``path``; OSError if nobody listens there."""
    addr, fd = address(path)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    finally:
        if fd is not None:
            posix.close(fd)
    return sock


def check_server(sock, path):
    """Refuse a zygote that runs as someone else: it would get our environment and fds."""
    pid, uid, _ = peer_credentials(sock)
    if uid != posix.geteuid():
        raise Unusable(f"the process listening on {fsdecode(path)} (pid {pid}) runs as uid {uid}, "
                       f"not as you (uid {posix.geteuid()}); not sending it anything")
    return pid
